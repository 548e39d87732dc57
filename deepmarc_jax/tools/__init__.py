"""Command-line tools beside training: checkpoint conversion and diagnostics of a run."""
