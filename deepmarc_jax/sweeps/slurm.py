r"""A sweep as a SLURM job array: one array task per cell, `sbatch PATH` to submit it.

`write_script` writes a bash script for a loaded sweep (`deepmarc_jax/sweeps/grid.py`):

  * `#SBATCH --array=<indices>[%max_parallel]`, `--output=SWEEP_DIR/slurm/%A_%a.out`, a default
    `--job-name` (the sweep dir's name), then the caller's sbatch options, one `#SBATCH` line each
    (`parse_sbatch_options`: resources, partition, account, signals...).
  * One `case "$SLURM_ARRAY_TASK_ID"` entry per cell of the sweep (after --only), holding the cell's
    name, its final evaluation's file name and exactly the run.py command that
    `sweep.py --print_commands` prints for it (`grid.command_line`), as a bash array.
  * A cell's array index is its position in the whole declared grid (first axis slowest, as in
    sweep.json's full_grid), so that an index names the same cell in every script of the sweep,
    whatever --only picked. The `--array` line lists the cells that were unfinished when the
    script was written; the case holds the finished ones too, and a task whose cell has its final
    evaluation exits 0 at once. Re-submitting the same script therefore runs what is still
    unfinished, each cell resuming from its workdir's checkpoints (run.py resumes);
    `sbatch --array=3,5 PATH` submits chosen cells (the command line overrides `#SBATCH`).
  * A task runs its cell from the repository root with JAX_COMPILATION_CACHE_DIR set to the
    sweep's shared cache unless the environment names one (as the local runner does), appending
    run.py's output to the cell's log.txt, and passes a SIGTERM sent to the script alone (e.g.
    `sbatch --signal=B:TERM@300`) on to run.py, which checkpoints and exits. One task (the
    default, or `--ntasks=1`): one run.py process using all the task's GPUs, SLURM_NTASKS unset
    so that run.py does not start a JAX coordinator for it. More tasks (SLURM_NTASKS > 1, e.g.
    `--nodes=2 --ntasks-per-node=4 --gres=gpu:4`): the cell runs under `srun`, one run.py
    process per task, which jax.distributed.initialize() (called by run.py) gives the GPU of
    its SLURM_LOCALID: one task per GPU.
  * After run.py exits, the task records the cell's sweep_cell.json as the local runner does
    (`python -m deepmarc_jax.sweeps.slurm record ...`: wall seconds accumulated over attempts,
    exit status) and exits 0 only if the cell has its final evaluation.
  * SLURM_ARRAY_TASK_ID unset, or not the index of a cell of the script: the script exits 2 with
    one line on stderr. `SLURM_ARRAY_TASK_ID=INDEX bash PATH` runs one cell without SLURM.

No JAX or TensorFlow here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
from collections.abc import Sequence

from deepmarc_jax.sweeps import grid as sweep_grid
from deepmarc_jax.sweeps import runner as sweep_runner

OUTPUT_DIR = 'slurm'  # under the sweep dir: each array task's SLURM output, %A_%a.out
_ARRAY_REASON = ('the array is the grid\'s unfinished cells; cap how many run at once with '
                 '--slurm_max_parallel, and submit chosen cells with `sbatch --array=I,J PATH`')
_OUTPUT_REASON = (f'each array task\'s output goes to SWEEP_DIR/{OUTPUT_DIR}/%A_%a.out and '
                  'run.py\'s to the cell\'s log.txt')
# Options the script sets itself: option -> why it cannot be given.
_OWNED = {'--array': _ARRAY_REASON, '-a': _ARRAY_REASON,
          '--output': _OUTPUT_REASON, '-o': _OUTPUT_REASON}
_JOB_NAME = ('--job-name', '-J')
_UNSAFE_PATH = re.compile(r'[\s%"\'\\]')
_WHITESPACE = re.compile(r'\s')


@dataclasses.dataclass(frozen=True)
class SlurmScript:
  """A written job-array script.

  Attributes:
    path: the script's absolute path.
    indices: {cell name: array index} of the cells in the script, in grid order.
    array: the `#SBATCH --array` value, e.g. '0,4-6%2'.
    finished: names of the script's cells that were finished when it was written.
  """
  path: str
  indices: dict[str, int]
  array: str
  finished: list[str]


def _option_name(token: str) -> str:
  """Returns the option a token names: '--time' of '--time=1:00:00', '-p' of '-pgpu'."""
  return token.split('=', 1)[0] if token.startswith('--') else token[:2]


def _takes_next_word(option: Sequence[str]) -> bool:
  """Returns whether an option's words so far lack a value: '--time' or '-p', not '--time=1'."""
  if len(option) != 1:
    return False
  word = option[0]
  return '=' not in word if word.startswith('--') else len(word) == 2


def parse_sbatch_options(texts: Sequence[str]) -> list[str]:
  """Returns sbatch options, one per #SBATCH line, from shell-quoted option texts.

  Args:
    texts: e.g. ['--gres=gpu:1 --time=24:00:00', '-p gpu']; an option's value is attached
      ('--time=24:00:00', '-pgpu') or is the next word ('-p gpu', '--time 24:00:00').
  Raises:
    ValueError: unbalanced quotes, a word that is neither an option nor its value, a word
      holding whitespace (an #SBATCH line cannot quote it), or an option the script sets itself
      (--array/-a, --output/-o).
  """
  options: list[list[str]] = []
  for text in texts:
    try:
      words = shlex.split(text)
    except ValueError as e:
      raise ValueError(f'--slurm_sbatch={text!r}: {e}') from e
    for word in words:
      if _WHITESPACE.search(word):
        raise ValueError(f'--slurm_sbatch={text!r}: {word!r} holds whitespace; an #SBATCH line '
                         'cannot quote it')
      if re.match(r'-[A-Za-z]|--[A-Za-z]', word):
        name = _option_name(word)
        if name in _OWNED:
          raise ValueError(f'--slurm_sbatch={text!r}: the script sets {name} itself: '
                           f'{_OWNED[name]}')
        options.append([word])
      elif options and _takes_next_word(options[-1]):
        options[-1].append(word)
      else:
        raise ValueError(f'--slurm_sbatch={text!r}: {word!r} is not an sbatch option (options '
                         "start with '-', e.g. --gres=gpu:1 --time=24:00:00 -p gpu)")
  return [' '.join(option) for option in options]


def index_ranges(indices: Sequence[int]) -> str:
  """Returns SLURM's array notation of indices: [0, 1, 2, 3, 6] -> '0-3,6'."""
  ranges: list[list[int]] = []
  for i in sorted(set(indices)):
    if ranges and i == ranges[-1][1] + 1:
      ranges[-1][1] = i
    else:
      ranges.append([i, i])
  return ','.join(str(a) if a == b else f'{a}-{b}' for a, b in ranges)


def cell_indices(sweep: sweep_grid.Sweep) -> dict[str, int]:
  """Returns {cell name: array index} of the sweep's cells: their positions in the whole grid."""
  position = {cell.name: i for i, cell in enumerate(sweep.all_cells)}
  return {cell.name: position[cell.name] for cell in sweep.cells}


def script_text(sweep: sweep_grid.Sweep, script_path: str, sbatch_options: Sequence[str] = (),
                max_parallel: int = 0, cache_dir: str = '', python: str | None = None,
                run_py: str | None = None) -> tuple[str, SlurmScript]:
  """Returns the job-array script of the sweep's cells and what it holds (see the module doc).

  Args:
    sweep: the loaded sweep; its cells (after --only) are the script's.
    script_path: where the script will be written (named in its usage lines).
    sbatch_options: options from `parse_sbatch_options`.
    max_parallel: at most this many array tasks run at once (`%N`); 0 for SLURM's limit.
    cache_dir: the JAX compilation cache the tasks share unless their environment names one
      ('' for none).
    python, run_py: as in `grid.command` (default: this interpreter, this repository's run.py).
  Raises:
    ValueError: max_parallel < 0, no unfinished cell to submit, or a sweep dir that an #SBATCH
      line cannot hold (whitespace, quotes, backslashes or '%').
  """
  if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 0:
    raise ValueError(f'--slurm_max_parallel={max_parallel!r}: must be an integer >= 0 (0: no '
                     'limit)')
  if _UNSAFE_PATH.search(sweep.sweep_dir):
    raise ValueError(f'--sweep_dir={sweep.sweep_dir!r}: the job array\'s --output line cannot '
                     'hold whitespace, quotes, backslashes or \'%\'; choose another --sweep_dir')
  script_path = os.path.abspath(script_path)
  indices = cell_indices(sweep)
  finished = [c.name for c in sweep.cells if c.finished(sweep.sweep_dir)]
  todo = [indices[c.name] for c in sweep.cells if c.name not in finished]
  if not todo:
    raise ValueError(f'all {len(sweep.cells)} cells are finished; nothing to submit')
  array = index_ranges(todo) + (f'%{max_parallel}' if max_parallel else '')
  all_indices = index_ranges(list(indices.values()))
  quoted_path = shlex.quote(script_path)

  sbatch = []
  if not any(_option_name(o.split(' ', 1)[0]) in _JOB_NAME for o in sbatch_options):
    sbatch.append(f'--job-name={os.path.basename(sweep.sweep_dir) or "sweep"}')
  sbatch += [f'--array={array}',
             f'--output={os.path.join(sweep.sweep_dir, OUTPUT_DIR, "%A_%a.out")}',
             *sbatch_options]

  entries = []
  for cell in sweep.cells:
    line = sweep_grid.command_line(sweep, cell, python, run_py)
    final = os.path.basename(cell.eval_path(sweep.sweep_dir))
    entries.append(f'  {indices[cell.name]}) cell={shlex.quote(cell.name)} '
                   f'final={shlex.quote(final)}\n'
                   f'     cmd=({line}) ;;')
  usage = (f'SLURM_ARRAY_TASK_ID is not set: submit this script with `sbatch {quoted_path}`, or '
           f'run one cell here with `SLURM_ARRAY_TASK_ID=INDEX bash {quoted_path}`; '
           f'cell indices: {all_indices}')
  env = sweep_runner.CACHE_ENV
  cache = ('' if not cache_dir else f'cache_dir={shlex.quote(cache_dir)}\n'
           f'export {env}="${{{env}:-$cache_dir}}"  # the environment\'s wins\n')
  text = f'''#!/bin/bash
# The sweep {sweep.config_flag} as a SLURM job array, written by sweep.py --slurm_script:
# one array task per cell, its index the cell's position in the whole grid.
#   sbatch {quoted_path}                  the cells unfinished when this was written
#   sbatch --array=I,J {quoted_path}      chosen cells (indices: the case below)
#   SLURM_ARRAY_TASK_ID=I bash {quoted_path}   cell I here, without SLURM
# A cell with its final evaluation exits at once; any other resumes from its workdir's
# checkpoints, so re-submitting runs what is left. Then sweep.py --report_only writes the report.
{chr(10).join(f'#SBATCH {o}' for o in sbatch)}
set -eu

sweep_dir={shlex.quote(sweep.sweep_dir)}
config={shlex.quote(sweep.config_flag)}
case "${{SLURM_ARRAY_TASK_ID:-}}" in
  '') echo {shlex.quote('FATAL: ' + usage)} >&2
      exit 2 ;;
{chr(10).join(entries)}
  *) echo "FATAL: SLURM_ARRAY_TASK_ID=$SLURM_ARRAY_TASK_ID is not the index of a cell of \\
this script; its cells' indices: {all_indices}" >&2
     exit 2 ;;
esac

task="$SLURM_ARRAY_TASK_ID"
workdir="$sweep_dir/$cell"
log="$workdir/{sweep_grid.LOG_FILE}"
if [[ -f "$workdir/$final" ]]; then
  echo "cell $task ($cell) is finished ($workdir/$final); nothing to run"
  exit 0
fi
cd {shlex.quote(sweep_grid.repo_root())}
{cache}mkdir -p "$workdir"
echo "cell $task: $cell; run.py's output goes to $log"
printf '\\n=== %s slurm job %s: %s\\n' "$(date -u +%Y-%m-%dT%H:%M:%S+00:00)" \\
  "${{SLURM_JOB_ID:-none}}" "${{cmd[*]}}" >> "$log"
start=$SECONDS
if (( ${{SLURM_NTASKS:-1}} > 1 )); then  # one run.py process per task (multi-process JAX)
  srun "${{cmd[@]}}" >> "$log" 2>&1 &
else
  unset SLURM_NTASKS  # one process, all the task's GPUs: else run.py starts a JAX coordinator
  "${{cmd[@]}}" >> "$log" 2>&1 &
fi
pid=$!
# A SIGTERM sent to this shell alone (sbatch --signal=B:TERM@SECONDS) reaches run.py, which
# checkpoints and exits; scancel and the time limit signal run.py itself too.
trap 'kill -TERM "$pid" 2>/dev/null || true' TERM
status=
while [[ -z "$status" ]]; do
  if wait "$pid"; then
    status=0
  else
    code=$?  # > 128 also when the trap interrupted the wait: wait again while run.py runs
    if ! kill -0 "$pid" 2>/dev/null; then
      # run.py has ended. If the trap cut the wait short, its status is still to collect (a
      # second wait returns it); if not, the first wait had it (a second says 127).
      if wait "$pid" 2>/dev/null; then
        status=0
      else
        again=$?
        status=$(( again == 127 ? code : again ))
      fi
    fi
  fi
done
trap - TERM
"${{cmd[0]}}" -m deepmarc_jax.sweeps.slurm record --config="$config" --sweep_dir="$sweep_dir" \\
  --cell="$cell" --wall_seconds=$((SECONDS - start)) --returncode="$status" \\
  || echo "warning: could not record $workdir/{sweep_grid.CELL_FILE}" >&2
if [[ -f "$workdir/$final" ]]; then
  echo "cell $task ($cell) finished: $workdir/$final"
  exit 0
fi
echo "cell $task ($cell) FAILED: run.py exit status $status and no $final (see $log); \\
submit it again to resume from its checkpoints" >&2
exit $(( status == 0 ? 1 : status ))
'''
  script = SlurmScript(script_path, indices, array, finished)
  return text, script



def write_script(sweep: sweep_grid.Sweep, path: str, sbatch_options: Sequence[str] = (),
                 max_parallel: int = 0, cache_dir: str = '') -> SlurmScript:
  """Writes the job-array script (executable) and creates SWEEP_DIR/slurm; see `script_text`.

  Raises:
    ValueError: as `script_text`, or `path` is a folder.
    OSError: the script cannot be written.
  """
  text, script = script_text(sweep, path, sbatch_options, max_parallel, cache_dir)
  os.makedirs(os.path.dirname(script.path), exist_ok=True)
  os.makedirs(os.path.join(sweep.sweep_dir, OUTPUT_DIR), exist_ok=True)  # sbatch does not
  if os.path.isdir(script.path):
    raise ValueError(f'--slurm_script={script.path}: a folder; give the path of a file')
  tmp = f'{script.path}.tmp'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, script.path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return script


def record(config_flag: str, sweep_dir: str, cell_name: str, wall_seconds: float,
           returncode: int) -> dict:
  """Writes a cell's sweep_cell.json after an array task ran it, as the local runner does.

  Raises:
    ValueError: the sweep no longer loads, or has no such cell.
  """
  sweep = sweep_grid.load(config_flag, sweep_dir)
  cells = [c for c in sweep.all_cells if c.name == cell_name]
  if not cells:
    raise ValueError(f'{config_flag}: the grid has no cell {cell_name!r} (was it edited?)')
  argv = sweep_grid.command(sweep, cells[0])
  return sweep_grid.record_cell(sweep, cells[0], argv, wall_seconds, returncode)


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m deepmarc_jax.sweeps.slurm record ...`: what an array task runs after run.py."""
  parser = argparse.ArgumentParser(prog='python -m deepmarc_jax.sweeps.slurm')
  commands = parser.add_subparsers(dest='command', required=True)
  rec = commands.add_parser('record', help="write a cell's sweep_cell.json")
  rec.add_argument('--config', required=True)
  rec.add_argument('--sweep_dir', required=True)
  rec.add_argument('--cell', required=True)
  rec.add_argument('--wall_seconds', type=float, required=True)
  rec.add_argument('--returncode', type=int, required=True)
  args = parser.parse_args(argv)
  try:
    record(args.config, args.sweep_dir, args.cell, args.wall_seconds, args.returncode)
  except ValueError as e:
    sys.stderr.write(f'FATAL: {e}\n')
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
