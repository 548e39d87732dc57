"""Grid sweeps of run.py: the grid and its cells (grid), running them (runner), the report."""
