r"""Grid sweeps of run.py: `python sweep.py --config=experiments/FILE.py[:arg] [--sweep_dir=DIR]`.

The config file is an experiment file that also defines `get_sweep(arg) -> {field: [values]}`
(dotted config fields, as in `run.py --config.<field>=<value>`); the grid is their product, first
axis slowest. Each cell trains in DIR/<cell name>, e.g. DIR/type=resnet4__train_crops=gt__seed=0.

  python sweep.py --config=experiments/mask_head_sweep.py --sweep_dir=DIR
      Runs the unfinished cells one after another (a finished cell has its final
      eval_<train.total_steps>.json; an unfinished one resumes from its checkpoints), each as a
      subprocess logging to DIR/<cell>/log.txt; rewrites DIR/report.md and DIR/report.png after
      each cell. Exits non-zero if a cell failed (the others still run).
  --parallel=N
      Runs N cells at a time (default 1), starting them in grid order. On Linux each running cell
      is pinned to its own contiguous slice of the CPUs (N at most the CPU count), so the cells'
      XLA thread pools do not oversubscribe the cores: --parallel=2 on a 2-core machine pins each
      cell to one core, more throughput than one cell on both cores (docs/benchmarks.md,
      "Mask-head sweep cells"); elsewhere cells run unpinned. Ctrl-C sends the running cells
      SIGTERM (run.py checkpoints and exits, so they resume on the next run) and kills them if
      they have not exited after two minutes, or at once on a second Ctrl-C. Has no effect with
      --print_commands, --slurm_script or --report_only.
  SIGTERM (`kill PID`, also for a sweep started in the background with `&`, where SIGINT is
      ignored) stops the running cells the same way, in either mode, and exits with status 143.
  --only=type=hourglass20,default --only=seed=0
      Only these values of these axes (full field or its last component).
  --print_commands
      Prints one run.py command per cell (e.g. for a cluster), finished cells as comments
      '# finished: <cell>'; runs nothing.
  --slurm_script=PATH [--slurm_sbatch='--gres=gpu:1 --time=24:00:00 -p gpu']
                       [--slurm_max_parallel=N]
      Writes PATH, a SLURM job-array script (deepmarc_jax/sweeps/slurm.py), and runs nothing: one
      array task per cell, its index the cell's position in the whole grid, holding the command
      --print_commands prints for it; #SBATCH --array lists the unfinished cells (%N: at most N
      at once), --output goes to DIR/slurm/. A task whose cell has finished exits at once, any
      other resumes from its workdir, so `sbatch PATH` again runs what is left; then
      --report_only. --slurm_sbatch (repeatable) gives any sbatch options, one #SBATCH line each.
  --report_only
      Only rewrites the report from the cells finished so far.
  --compilation_cache=jax_cache
      JAX's persistent compilation cache the cells share, a folder under DIR: cells that
      differ only in values (e.g. seeds) load their compiled train and eval steps instead of
      compiling them again. '' turns it off; JAX_COMPILATION_CACHE_DIR in the environment wins.

The report always covers the whole declared grid; --only limits what is run, printed or put in
the SLURM script.
"""
import os
import shlex
import signal
import sys

from absl import app
from absl import flags

from deepmarc_jax.sweeps import grid as sweep_grid
from deepmarc_jax.sweeps import report as sweep_report
from deepmarc_jax.sweeps import runner as sweep_runner
from deepmarc_jax.sweeps import slurm as sweep_slurm

_CONFIG = flags.DEFINE_string(
    'config', None, 'Sweep config: an experiment file with get_config and get_sweep, '
    'e.g. experiments/mask_head_sweep.py[:arg].')
_SWEEP_DIR = flags.DEFINE_string(
    'sweep_dir', None, 'Folder of the cells\' workdirs and report. Default: sweeps/NAME in the '
    'repository (git-ignored), NAME being the config file\'s stem and its arg, e.g. '
    'sweeps/mask_head_sweep or sweeps/mask_head_sweep_quick.')
_ONLY = flags.DEFINE_multi_string(
    'only', [], 'FIELD=V1,V2: run only these values of one axis (repeatable, one per axis).')
_PRINT_COMMANDS = flags.DEFINE_bool(
    'print_commands', False,
    'Print the run.py command of each cell (finished ones as comments); run nothing.')
_REPORT_ONLY = flags.DEFINE_bool(
    'report_only', False, 'Only rewrite report.md and report.png from the finished cells.')
_PARALLEL = flags.DEFINE_integer(
    'parallel', 1, 'Cells run at a time; on Linux each is pinned to its own share of the CPUs. '
    'No effect with --print_commands, --slurm_script or --report_only.')
_SLURM_SCRIPT = flags.DEFINE_string(
    'slurm_script', None, 'Write a SLURM job-array script of the cells to this path (submit it '
    'with sbatch PATH); run nothing.')
_SLURM_SBATCH = flags.DEFINE_multi_string(
    'slurm_sbatch', [], "sbatch options of every array task, e.g. '--gres=gpu:1 --time=24:00:00 "
    "--cpus-per-task=8 -p gpu' (repeatable; one #SBATCH line per option). Needs --slurm_script.")
_SLURM_MAX_PARALLEL = flags.DEFINE_integer(
    'slurm_max_parallel', 0, 'At most this many array tasks run at once (--array=...%N); 0: no '
    'limit but SLURM\'s. Needs --slurm_script.')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', 'jax_cache', "JAX's persistent compilation cache for the cells run "
    "here or by --slurm_script's tasks, a folder under --sweep_dir; '' turns it off. "
    'JAX_COMPILATION_CACHE_DIR in the environment wins.')
flags.mark_flags_as_required(['config'])


def _fail(message: str) -> None:
  sys.stderr.write(f'FATAL: {message}\n')
  sys.exit(2)


def default_sweep_dir(config_flag: str) -> str:
  """sweeps/<config stem>[_<arg>] in the repository: run outputs stay out of git."""
  path, arg = sweep_grid.split_config_flag(config_flag)
  name = os.path.splitext(os.path.basename(path))[0] + (f'_{arg}' if arg else '')
  return os.path.join(sweep_grid.repo_root(), 'sweeps', name.replace(',', '_'))


def _write_report(sweep: sweep_grid.Sweep) -> dict:
  """Writes the report of the whole declared grid; returns write_report's dict."""
  # Relative to the repository when inside it, so that a report copied into docs/ says which
  # experiment file made it without naming this machine's folders.
  config = sweep.config_flag
  relative = os.path.relpath(config, sweep_grid.repo_root())
  if not relative.startswith('..'):
    config = relative
  return sweep_report.write_report(sweep.sweep_dir, sweep.full_grid, sweep.all_cells,
                                   config=config, contrasts=sweep.contrasts)


def _compilation_cache(sweep: sweep_grid.Sweep) -> str:
  """Returns the cells' shared compilation cache under the sweep dir ('' for none)."""
  return _COMPILATION_CACHE.value and os.path.join(sweep.sweep_dir, _COMPILATION_CACHE.value)


def _write_slurm_script(sweep: sweep_grid.Sweep, sbatch_options: list[str]) -> None:
  """Writes --slurm_script and prints how to submit it and how to report."""
  if all(c.finished(sweep.sweep_dir) for c in sweep.cells):
    print(f'all {len(sweep.cells)} cell(s) are finished: nothing to submit, no script written; '
          f'report: {shlex.join(_report_command(sweep))}')
    return
  try:
    script = sweep_slurm.write_script(sweep, _SLURM_SCRIPT.value, sbatch_options,
                                      _SLURM_MAX_PARALLEL.value, _compilation_cache(sweep))
  except (ValueError, OSError) as e:  # OSError: e.g. PATH is a folder, or not writable
    _fail(str(e))
  left_out = (f'; {len(script.finished)} finished cell(s) left out of --array'
              if script.finished else '')
  print(f'wrote {script.path}: a SLURM job array of {len(script.indices)} cell(s), '
        f'--array={script.array}{left_out}')
  print(f'submit: sbatch {shlex.quote(script.path)}   (again later: runs the unfinished cells, '
        'each resuming from its workdir)')
  print(f'report: {shlex.join(_report_command(sweep))}')


def _report_command(sweep: sweep_grid.Sweep) -> list[str]:
  """Returns the sweep.py --report_only command of the sweep."""
  return [sys.executable, os.path.join(sweep_grid.repo_root(), 'sweep.py'),
          f'--config={sweep.config_flag}', f'--sweep_dir={sweep.sweep_dir}', '--report_only']


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {argv[1:]}')
  modes = [name for name, given in (('--print_commands', _PRINT_COMMANDS.value),
                                     ('--slurm_script', _SLURM_SCRIPT.value is not None),
                                     ('--report_only', _REPORT_ONLY.value)) if given]
  if len(modes) > 1:
    _fail(f'{" and ".join(modes)} exclude each other; give one')
  if _SLURM_SCRIPT.value is None:
    for name, given in (('--slurm_sbatch', _SLURM_SBATCH.value),
                        ('--slurm_max_parallel', _SLURM_MAX_PARALLEL.value)):
      if given:
        _fail(f'{name} needs --slurm_script=PATH')
  elif not _SLURM_SCRIPT.value:
    _fail('--slurm_script: give the path of the script to write')
  try:
    sbatch_options = sweep_slurm.parse_sbatch_options(_SLURM_SBATCH.value)
    if _SLURM_MAX_PARALLEL.value < 0:
      raise ValueError(f'--slurm_max_parallel={_SLURM_MAX_PARALLEL.value}: must be >= 0 (0: no '
                       'limit)')
  except ValueError as e:
    _fail(str(e))
  try:
    sweep_runner.check_parallel(_PARALLEL.value, '--parallel')
  except ValueError as e:
    _fail(str(e))
  try:
    sweep_dir = _SWEEP_DIR.value or default_sweep_dir(_CONFIG.value)
    sweep = sweep_grid.load(_CONFIG.value, sweep_dir, _ONLY.value)
  except ValueError as e:
    _fail(str(e))
  sweep_grid.write_sweep_json(sweep, _ONLY.value)

  if _PRINT_COMMANDS.value:
    print('\n'.join(sweep_grid.command_lines(sweep)))
    return
  if _SLURM_SCRIPT.value:
    _write_slurm_script(sweep, sbatch_options)
    return
  if _REPORT_ONLY.value:
    report = _write_report(sweep)
    print(f'{len(report["rows"])} of {len(sweep.all_cells)} cells finished; '
          f'report: {report["markdown"]}')
    return

  cache = sweep_runner.share_compilation_cache(_compilation_cache(sweep))
  if cache:
    print(f'compilation cache: {cache}', flush=True)
  sweep_runner.handle_sigterm()
  try:
    failed = sweep_runner.run(sweep, after_cell=lambda: _write_report(sweep),
                              log=lambda line: print(line, flush=True),  # live even when piped
                              parallel=_PARALLEL.value)
  except sweep_runner.Terminated:
    _write_report(sweep)
    print('stopped by SIGTERM; re-run the same command to resume', flush=True)
    sys.exit(128 + signal.SIGTERM)
  report = _write_report(sweep)
  print(f'report: {report["markdown"]}')
  if failed:
    print(f'{len(failed)} cell(s) failed (see their log.txt): {", ".join(failed)}')
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
