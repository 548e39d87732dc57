"""Runs a sweep's cells: each as a run.py subprocess, one after another or several at a time.

`run` runs the unfinished cells of a loaded sweep (`deepmarc_jax/sweeps/grid.py` defines the
grid, the cells, their commands and their sweep_cell.json records), each as a subprocess
appending to its workdir's log.txt, and records every cell that ran. A failed cell does not
stop the sweep.

Cells run one after another, or `parallel` at a time in grid order. On Linux each running cell is
then pinned to its own slice of the CPUs, so that the cells' XLA thread pools do not
oversubscribe the cores: a cell scales less than linearly with cores, so one core per cell
gives more throughput than one cell on all of them (docs/benchmarks.md, "Mask-head sweep
cells").

Ctrl-C: run one at a time, the running cell is killed, as by subprocess.run. Run in parallel, the
cells ignore the terminal's SIGINT; the runner sends them SIGTERM instead (run.py checkpoints and
exits, so they resume on the next run), waits up to STOP_GRACE_S for them (a second Ctrl-C cuts
that short) and kills what is left. Either way each interrupted cell's time is recorded and the
KeyboardInterrupt re-raised.

SIGTERM (e.g. `kill PID` of a sweep started in the background, where a non-interactive shell
leaves SIGINT ignored), once `handle_sigterm()` is installed, stops the sweep gracefully in both
modes: the running cells get SIGTERM, the runner waits up to STOP_GRACE_S for them to checkpoint
and exit, records them, and raises `Terminated` (a KeyboardInterrupt).

No JAX or TensorFlow here either.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, MutableMapping, Sequence
from concurrent import futures
from typing import Any

from deepmarc_jax.sweeps import grid as sweep_grid

# Seconds the parallel runner waits after SIGTERM for interrupted cells to checkpoint and exit
# (run.py stops at its next step, which can follow an evaluation) before it kills them.
STOP_GRACE_S = 120.0
# Seconds it then waits for killed cells' threads to finish.
KILL_WAIT_S = 10.0

# run_fn(command, cwd, log_path) -> exit status, or with parallel > 1
# run_fn(command, cwd, log_path, cpus) with cpus a tuple of CPU ids to pin to, or None.
# The default runs a subprocess; tests inject fakes.
RunFn = Callable[..., int]


class _Children:
  """The running children of `run_subprocess`.

  A KeyboardInterrupt reaches the main thread only, so the parallel runner's main thread stops the
  children that its worker threads started through this registry.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._running: dict[subprocess.Popen, bool] = {}  # process -> whether it was sent SIGTERM

  def add(self, process: subprocess.Popen) -> None:
    with self._lock:
      self._running[process] = False

  def remove(self, process: subprocess.Popen) -> None:
    with self._lock:
      self._running.pop(process, None)

  def count(self) -> int:
    """Returns the number of running children."""
    with self._lock:
      return len(self._running)

  def terminate(self) -> int:
    """Sends SIGTERM to each running child not sent one yet; returns how many were sent one."""
    with self._lock:
      fresh = [p for p, sent in self._running.items() if not sent]
      for process in fresh:
        self._running[process] = True
        process.terminate()  # no-op on a child that has already exited
    return len(fresh)

  def kill(self) -> int:
    """Sends SIGKILL to every running child; returns how many there were."""
    with self._lock:
      for process in self._running:
        process.kill()
      return len(self._running)


_CHILDREN = _Children()


class Terminated(KeyboardInterrupt):
  """Raised in the main thread by `handle_sigterm`'s handler; the runner then stops the cells."""


def handle_sigterm() -> Any:
  """Makes SIGTERM stop the sweep gracefully; returns the previous handler.

  The handler raises `Terminated` in the main thread (where Python runs every signal handler); the
  runner then sends the running cells SIGTERM (run.py checkpoints and exits), waits up to
  STOP_GRACE_S for them before it kills them, and records them as interrupted by SIGTERM.
  """
  def on_sigterm(signum, frame):
    del frame
    raise Terminated(f'signal {signum}')

  return signal.signal(signal.SIGTERM, on_sigterm)


def _stop_signal(error: BaseException) -> int:
  """Returns the signal an interrupted cell is recorded with (as a negative exit status)."""
  return -(signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT)


def _child_setup(cpus: tuple[int, ...] | None,
                 ignore_sigint: bool) -> Callable[[], None] | None:
  """Returns the preexec_fn of a child (None if it needs none)."""
  if cpus is None and not ignore_sigint:
    return None

  def setup():
    if ignore_sigint:
      # Python leaves an ignored SIGINT ignored, so a terminal's Ctrl-C (sent to the whole
      # process group) does not kill the child mid-step; the runner sends it SIGTERM instead.
      signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cpus is not None:
      os.sched_setaffinity(0, cpus)  # before exec: every thread the child creates inherits it

  return setup


def run_subprocess(argv: Sequence[str], cwd: str, log_path: str,
                   cpus: Sequence[int] | None = None) -> int:
  """Runs argv with stdout and stderr appended to log_path; returns its exit status.

  Args:
    argv: the command.
    cwd: its working directory.
    log_path: the file its output is appended to, after a '=== <time> sweep: <command>' line.
    cpus: CPU ids to pin the child to (Linux only), or None to leave it unpinned.

  Called from the main thread this behaves like subprocess.run (a KeyboardInterrupt kills the
  child), except on `Terminated` (SIGTERM, see handle_sigterm): the child gets SIGTERM and up to
  STOP_GRACE_S to exit before it is killed. Called from another thread (the parallel runner's
  workers), the child ignores SIGINT: such a caller cannot see Ctrl-C, so the runner's main
  thread stops the child with SIGTERM, which run.py answers with a checkpoint.

  Raises:
    ValueError: cpus given where os.sched_setaffinity does not exist, or empty.
  """
  if cpus is not None:
    if not hasattr(os, 'sched_setaffinity'):
      raise ValueError('cannot pin a subprocess to CPUs here: os.sched_setaffinity does not exist '
                       'on this platform; pass cpus=None')
    cpus = tuple(int(c) for c in cpus)
    if not cpus:
      raise ValueError('cpus must name at least one CPU, or be None')
  on_main_thread = threading.current_thread() is threading.main_thread()
  with open(log_path, 'a') as log:
    pinned = '' if cpus is None else f' (cpus {_cpus_text(cpus)})'
    log.write(f'\n=== {sweep_grid.utc_now()} sweep{pinned}: {shlex.join(argv)}\n')
    log.flush()
    with subprocess.Popen(list(argv), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                          preexec_fn=_child_setup(cpus, not on_main_thread)) as process:
      _CHILDREN.add(process)
      try:
        return process.wait()
      except BaseException as error:
        if isinstance(error, Terminated):  # pass SIGTERM on and let the child checkpoint
          process.terminate()
          try:
            process.wait(timeout=STOP_GRACE_S)
          except (subprocess.TimeoutExpired, KeyboardInterrupt):
            pass  # too slow, or interrupted again: kill it now
        process.kill()  # as subprocess.run does; Popen.__exit__ then reaps the child
        raise
      finally:
        _CHILDREN.remove(process)


def _cpus_text(cpus: Sequence[int]) -> str:
  """Returns CPU ids as '0', '0,1' etc."""
  return ','.join(str(c) for c in cpus)


def allowed_cpus() -> list[int] | None:
  """Returns the sorted CPU ids this process may run on, or None where cells cannot be pinned
  (no os.sched_setaffinity, e.g. macOS)."""
  if not hasattr(os, 'sched_setaffinity'):
    return None
  return sorted(os.sched_getaffinity(0))


def cpu_slots(cpus: Sequence[int], parallel: int) -> list[tuple[int, ...]]:
  """Returns `parallel` disjoint, contiguous slots of `cpus`, in order, sizes differing by <= 1.

  The first len(cpus) % parallel slots get the extra CPU, e.g. [0, 1, 2] into 2 slots gives
  [(0, 1), (2,)].

  Raises:
    ValueError: parallel < 1, or more slots than CPUs.
  """
  cpus = list(cpus)
  if parallel < 1:
    raise ValueError(f'parallel={parallel}: must be >= 1')
  if parallel > len(cpus):
    raise ValueError(f'parallel={parallel}: more cells at a time than the {len(cpus)} CPU(s) '
                     f'{cpus} this process may use; each running cell is pinned to its own CPUs')
  size, extra = divmod(len(cpus), parallel)
  slots, begin = [], 0
  for i in range(parallel):
    end = begin + size + (1 if i < extra else 0)
    slots.append(tuple(cpus[begin:end]))
    begin = end
  return slots


def check_parallel(parallel: int, name: str = 'parallel') -> None:
  """Checks that `parallel` cells can run at once here.

  Args:
    parallel: the number of cells to run at a time.
    name: how error messages call it, e.g. '--parallel'.
  Raises:
    ValueError: parallel is not an int >= 1, or exceeds the CPUs this process may use (where cells
      are pinned).
  """
  if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
    raise ValueError(f'{name}={parallel!r}: must be an integer >= 1')
  cpus = allowed_cpus()
  if cpus is not None and parallel > len(cpus):
    raise ValueError(f'{name}={parallel}: more cells at a time than the {len(cpus)} CPU(s) this '
                     f'process may use ({_cpus_text(cpus)}); each running cell is pinned to its '
                     'own CPUs')


CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'


def share_compilation_cache(cache_dir: str, environ: MutableMapping[str, str] = os.environ) -> str:
  """Points the cells (children inherit `environ`) at one JAX persistent compilation cache.

  Cells that differ only in values, not in shapes or programs (e.g. seeds), then load their
  train and evaluation executables from the cache instead of compiling them again. XLA's compile
  options, its flags included, are part of the cache key, so cells run with other XLA_FLAGS do
  not share entries. A JAX_COMPILATION_CACHE_DIR already in `environ` wins; '' turns it off.

  Args:
    cache_dir: the cache folder ('' for none).
    environ: the environment the cells will inherit.
  Returns:
    The cache folder the cells will use ('' for none).
  """
  if CACHE_ENV not in environ and cache_dir:
    environ[CACHE_ENV] = cache_dir
  return environ.get(CACHE_ENV, '')


def _finish_cell(sweep: sweep_grid.Sweep, cell: sweep_grid.Cell, argv: Sequence[str], wall: float,
                 returncode: int, cpus: Sequence[int] | None) -> tuple[bool, str]:
  """Records a cell that ran; returns (whether it failed, its status text for the end line)."""
  sweep_grid.record_cell(sweep, cell, argv, wall, returncode, cpus)
  status = f'exit status {returncode}'
  finished = cell.finished(sweep.sweep_dir)
  if returncode == 0 and not finished:
    status += f' but no {os.path.basename(cell.eval_path(sweep.sweep_dir))}'
  failed = returncode != 0 or not finished
  if failed:
    status += ', FAILED'
  return failed, status


def run(sweep: sweep_grid.Sweep, run_fn: RunFn = run_subprocess,
        after_cell: Callable[[], Any] | None = None, log: Callable[[str], Any] = print,
        parallel: int = 1) -> list[str]:
  """Runs the unfinished cells, `parallel` at a time; returns the names of those that failed.

  A cell fails if its command exits non-zero or exits 0 without writing its final eval (e.g.
  run.py stopped on SIGTERM after a checkpoint). A failure does not stop the sweep. Failed names
  are in grid order.

  With parallel > 1, cells start in grid order, the next one whenever one ends. On Linux the CPUs
  this process may use are split into min(parallel, cells to run) contiguous slots and each
  running cell is pinned to one; elsewhere cells run unpinned. A KeyboardInterrupt sends SIGTERM
  to the running cells (run.py checkpoints and exits, so they resume later), waits up to
  STOP_GRACE_S (a second KeyboardInterrupt cuts that short) and kills what is left, records each
  interrupted cell's time, then re-raises.

  Args:
    sweep: the loaded sweep; only `sweep.cells` are run.
    run_fn: runs a command from the repository root and returns its exit status; called as
      (argv, cwd, log_path) when parallel == 1 and (argv, cwd, log_path, cpus) otherwise, cpus
      being a tuple of CPU ids to pin to, or None. With parallel > 1 it is called from worker
      threads.
    after_cell: called after each cell that ran (e.g. to rewrite the report); never concurrently.
    log: where the one-line messages go; never called concurrently.
    parallel: how many cells run at once.
  Raises:
    ValueError: a bad `parallel` (see check_parallel).
  """
  check_parallel(parallel)
  todo = [c for c in sweep.cells if not c.finished(sweep.sweep_dir)]
  done = len(sweep.cells) - len(todo)
  if done:
    log(f'{done} of {len(sweep.cells)} cells already finished; {len(todo)} to run')
  if parallel == 1:
    return _run_sequential(sweep, todo, run_fn, after_cell, log)
  return _run_parallel(sweep, todo, run_fn, after_cell, log, parallel)


def _run_sequential(sweep: sweep_grid.Sweep, todo: Sequence[sweep_grid.Cell], run_fn: RunFn,
                    after_cell: Callable[[], Any] | None,
                    log: Callable[[str], Any]) -> list[str]:
  """Runs `todo` one after another (see `run`); returns the names of the failed cells."""
  failed = []
  for i, cell in enumerate(todo, 1):
    workdir = cell.workdir(sweep.sweep_dir)
    os.makedirs(workdir, exist_ok=True)
    argv = sweep_grid.command(sweep, cell)
    log(f'[{i}/{len(todo)}] start {cell.name}')
    start = time.monotonic()
    try:
      returncode = run_fn(argv, sweep_grid.repo_root(), os.path.join(workdir, sweep_grid.LOG_FILE))
    except KeyboardInterrupt as error:
      # Keep the time spent so far: the resumed cell adds to it.
      sweep_grid.record_cell(sweep, cell, argv, time.monotonic() - start, _stop_signal(error))
      log(f'[{i}/{len(todo)}] interrupted {cell.name}')
      raise
    wall = time.monotonic() - start
    cell_failed, status = _finish_cell(sweep, cell, argv, wall, returncode, None)
    if cell_failed:
      failed.append(cell.name)
    log(f'[{i}/{len(todo)}] end {cell.name}: {wall:.0f} s, {status}')
    if after_cell is not None:
      after_cell()
  return failed


def _run_parallel(sweep: sweep_grid.Sweep, todo: Sequence[sweep_grid.Cell], run_fn: RunFn,
                  after_cell: Callable[[], Any] | None, log: Callable[[str], Any],
                  parallel: int) -> list[str]:
  """Runs `todo` `parallel` at a time (see `run`); returns the names of the failed cells."""
  if not todo:
    return []
  workers = min(parallel, len(todo))  # fewer cells than slots: give each more CPUs
  cpus = allowed_cpus()
  slots = [None] * workers if cpus is None else cpu_slots(cpus, workers)
  log_lock, report_lock = threading.Lock(), threading.Lock()
  stopping = threading.Event()  # set by the main thread on an interrupt: start no more cells
  stopped_by = [-signal.SIGINT]  # the exit status interrupted cells are recorded with
  free_slots = list(slots)  # guarded by log_lock

  def say(line: str) -> None:
    with log_lock:
      log(line)

  if cpus is None:
    say(f'running {len(todo)} cell(s), {workers} at a time, unpinned: os.sched_setaffinity does '
        'not exist on this platform')
  else:
    say(f'running {len(todo)} cell(s), {workers} at a time, pinned to cpus '
        + ' | '.join(_cpus_text(s) for s in slots))

  def run_cell(i: int, cell: sweep_grid.Cell) -> bool | None:
    """Runs one cell on a free slot; returns whether it failed (None: not started)."""
    tag = f'[{i}/{len(todo)}]'
    workdir = cell.workdir(sweep.sweep_dir)
    argv = sweep_grid.command(sweep, cell)
    with log_lock:
      if stopping.is_set():
        return None
      # A worker holds at most one slot and there are as many slots as workers.
      slot = free_slots.pop(0)
      log(f'{tag} start {cell.name}' + ('' if slot is None else f' on cpus {_cpus_text(slot)}'))
    try:
      os.makedirs(workdir, exist_ok=True)
      start = time.monotonic()
      returncode = run_fn(argv, sweep_grid.repo_root(), os.path.join(workdir, sweep_grid.LOG_FILE),
                          slot)
      wall = time.monotonic() - start
    finally:
      with log_lock:
        free_slots.append(slot)
    if stopping.is_set() and not cell.finished(sweep.sweep_dir):
      # Stopped by the interrupt: keep the time spent so far, as the sequential runner does.
      sweep_grid.record_cell(sweep, cell, argv, wall, stopped_by[0], slot)
      say(f'{tag} interrupted {cell.name}: {wall:.0f} s')
      return True
    cell_failed, status = _finish_cell(sweep, cell, argv, wall, returncode, slot)
    say(f'{tag} end {cell.name}: {wall:.0f} s, {status}')
    if after_cell is not None:
      with report_lock:
        after_cell()
    return cell_failed

  executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix='sweep_cell')
  # The executor's queue is FIFO: cells start in grid order.
  jobs = [executor.submit(run_cell, i, cell) for i, cell in enumerate(todo, 1)]
  try:
    pending = jobs
    while pending:
      # The timeout only bounds how late the main thread notices a signal.
      finished, pending = futures.wait(pending, timeout=1.0,
                                       return_when=futures.FIRST_EXCEPTION)
      for job in finished:
        if job.exception() is not None:
          raise job.exception()  # run_fn or after_cell raised: stop like an interrupt
  except BaseException as error:
    stopped_by[0] = _stop_signal(error)
    stopping.set()
    executor.shutdown(wait=False, cancel_futures=True)
    _stop_running(jobs, say)
    raise
  executor.shutdown()
  return [cell.name for cell, job in zip(todo, jobs) if job.result()]


def _stop_running(jobs: Sequence[futures.Future], say: Callable[[str], Any]) -> None:
  """Stops the cells still running after an interrupt: SIGTERM, then SIGKILL after STOP_GRACE_S.

  Waits (boundedly) for their workers, which record each interrupted cell.
  """
  running = [job for job in jobs if not job.done()]
  if not running:
    return
  say(f'stopping: SIGTERM to {len(running)} running cell(s); waiting up to {STOP_GRACE_S:.0f} s '
      'for them to checkpoint and exit (interrupt again to kill them now)')
  deadline = time.monotonic() + STOP_GRACE_S
  try:
    while running and time.monotonic() < deadline:
      _CHILDREN.terminate()  # repeated: also reaches a child that was just being started
      _, running = futures.wait(running, timeout=0.5)
  except KeyboardInterrupt:
    pass  # a second interrupt: kill them now
  if running:
    killed = _CHILDREN.kill()
    say(f'killing {killed} cell process(es) that did not exit')
    _, running = futures.wait(running, timeout=KILL_WAIT_S)
  if running:
    say(f'{len(running)} cell(s) still running after SIGKILL; giving up waiting for them')
