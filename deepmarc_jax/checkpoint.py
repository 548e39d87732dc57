"""Checkpoints with orbax: the train state's, a run's workdir, and converted model variables.

Resume policy (big_vision's): an existing checkpoint in the workdir always wins; then the
variables of `config.init_from` (a converted official model, or an earlier run's); otherwise
the state is freshly initialised. Saves are asynchronous; `close()` waits for them.

A run's workdir (what run.py writes): `config.json` (the resolved config), `checkpoints/`
(one folder per kept step), `run.lock` (held while a run trains there) and, only after a
damaged checkpoint was found, `checkpoints_damaged/`. Converted variables (`save_variables`)
are one orbax checkpoint of {'params', 'batch_stats'}.

Faults (docs/reliability.md): orbax writes each step into a temporary folder and renames it
when complete, so a process killed at any moment leaves the kept steps intact;
`restore_latest_intact` skips damaged ones (moving them aside, never deleting) and refuses a
checkpoint of another config; a failed write (a full disk) is a `CheckpointWriteError` naming
the folder; `WorkdirLock` keeps a second run out of a workdir in use.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import threading

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from deepmarc_jax import atomic

CHECKPOINTS = 'checkpoints'
DAMAGED_CHECKPOINTS = 'checkpoints_damaged'
RUN_CONFIG = 'config.json'
RUN_LOCK = 'run.lock'


class CheckpointMismatchError(ValueError):
  """A kept checkpoint holds a train state of another shape (another config)."""


class DamagedCheckpointsError(RuntimeError):
  """Every kept checkpoint is unreadable: nothing to resume from, and training afresh would
  silently discard them."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. a full disk); the older ones are intact."""


class WorkdirInUseError(RuntimeError):
  """Another live process holds the workdir's run lock."""


class Checkpointer:
  """An orbax CheckpointManager for one pytree (the train state) in `directory`."""

  def __init__(self, directory: str, *, save_every_steps: int, max_to_keep: int = 3,
               writer: bool = False):
    """`writer`: this process trains here (it holds the workdir's lock). Only a writer clears
    the unfinished step folders a killed or failed save left: a reader (an evaluation of a
    workdir in training) would delete the trainer's save in progress."""
    # orbax restores only from absolute paths; run.py --workdir may be relative.
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every_steps, max_to_keep=max_to_keep, create=True,
            cleanup_tmp_directories=writer))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def kept_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, abstract_state, step: int | None = None):
    """Restores into the shapes, dtypes and shardings of `abstract_state`."""
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def step_directory(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore_latest_intact(self, abstract_state):
    """(state, step) of the newest kept checkpoint that restores, or (None, None) if none is
    kept.

    A checkpoint whose arrays do not match `abstract_state` (another config) raises
    CheckpointMismatchError naming the folder and the arrays. A damaged one (unreadable files,
    missing arrays) is skipped with a warning; once an older one restores, the damaged ones
    move to ../checkpoints_damaged/: left in place, the run's next save of that step would fail
    (orbax does not overwrite a step), and max_to_keep would count them as kept. If none
    restores, DamagedCheckpointsError, and nothing is moved. Errors that say nothing about the
    files (device memory, the runtime) are raised as they are, never taken for damage.

    With several processes, each tries the same steps in the same order and they agree on
    each outcome (a step is intact only if it restored everywhere); process 0 alone moves
    folders.
    """
    expected = _shapes(abstract_state)
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      folder = self.step_directory(step)
      stored = _stored_shapes(folder)
      if stored is not None:
        problems = _mismatches(stored, expected)
        if problems:
          raise CheckpointMismatchError(
              f'{folder} holds a train state of another config ({len(problems)} arrays '
              f'differ): {"; ".join(problems[:6])}{"; ..." if len(problems) > 6 else ""}. '
              'Resume it with the config that wrote it, or train this config in a new --workdir.')
      state, reason = None, None
      try:
        state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except (jax.errors.JaxRuntimeError, MemoryError):
        raise  # out of device or host memory, a runtime fault: not the files' doing
      except Exception as e:  # pylint: disable=broad-except  (tensorstore raises plain ones)
        reason = _first_line(e)
      if not _everywhere(reason is None):
        reason = reason or 'it did not restore in another process'
        logging.warning('checkpoint %s is damaged, trying an older one: %s', folder, reason)
        damaged.append((step, folder, reason))
        continue
      if damaged:
        self._move_aside([d[0] for d in damaged])
        logging.warning('resumed from step %d; the damaged checkpoints of steps %s are in %s',
                        step, [d[0] for d in damaged], self._damaged_root())
      return state, step
    if damaged:
      raise DamagedCheckpointsError(
          'no kept checkpoint restores: ' + '; '.join(f'{f}: {r}' for _, f, r in damaged)
          + '. To train afresh in this --workdir, move them out of its checkpoints/ folder.')
    return None, None

  def _damaged_root(self) -> str:
    return os.path.join(os.path.dirname(self.directory), DAMAGED_CHECKPOINTS)

  def _move_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      root = self._damaged_root()
      os.makedirs(root, exist_ok=True)
      for step in steps:
        target, n = os.path.join(root, str(step)), 1
        while os.path.exists(target):  # an earlier resume moved a damaged step of that number
          target, n = os.path.join(root, f'{step}.{n}'), n + 1
        shutil.move(self.step_directory(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('checkpoints moved aside')
    self.manager.reload()

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` saves without `force` (`step` is on the interval)."""
    return self.manager.should_save(step)

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it saved. The write
    continues in the background; its failure surfaces here at the next save or in `wait`, as
    CheckpointWriteError."""
    try:
      return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from e

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from e

  def _write_error(self, error: Exception) -> CheckpointWriteError:
    latest = self.manager.latest_step()
    kept = ('No earlier checkpoint is kept' if latest is None else
            f'The checkpoint of step {latest} ({self.step_directory(latest)}) is intact: the '
            'next run resumes from it')
    return CheckpointWriteError(
        f'could not write a checkpoint in {self.directory}: {_first_line(error)}. {kept}.')

  def close(self) -> None:
    self.manager.close()


class PreemptionFlag:
  """Set when SIGTERM arrives (preemption); the loop saves and stops at the next step.

  The previous handler is restored on `close()`. Only the main thread can install handlers;
  elsewhere (e.g. a test runner thread) the flag simply never fires.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._event.set()

  def set(self) -> None:
    self._event.set()

  def __bool__(self) -> bool:
    return self._event.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _everywhere(flag: bool) -> bool:
  """Whether `flag` holds in every process (itself with one process)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.asarray(flag)).all())


def _first_line(error: Exception) -> str:
  """A short reason: the OS error and its file where tensorstore reports one (its messages
  run to pages), else the error's first line."""
  text = str(error)
  code = re.search(r"os_error_code='(\d+)'", text)
  if code:
    path = re.search(r'(?:Failed writing|Error reading)[^"]*"([^"]+)"', text)
    return os.strerror(int(code.group(1))) + (f' (file {path.group(1)})' if path else '')
  lines = text.strip().splitlines()
  return f'{type(error).__name__}: {lines[0] if lines else ""}'[:500]


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'.params.conv.kernel'-style path: (shape, dtype)} of a pytree's array leaves."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in leaves if hasattr(leaf, 'shape')}


def _stored_shapes(folder: str):
  """The shapes and dtypes a step folder's metadata declares, or None where it cannot be read
  (then only a restore tells whether the folder is intact)."""
  try:
    with ocp.StandardCheckpointer() as reader:
      metadata = reader.metadata(os.path.join(folder, 'default'))
    tree = getattr(metadata, 'item_metadata', metadata)
    tree = getattr(tree, 'tree', tree)
    return None if tree is None else _shapes(tree)
  except Exception:  # pylint: disable=broad-except
    return None


def _mismatches(stored, expected) -> list[str]:
  """What differs between a checkpoint's arrays and the train state's, one line each. The
  paths are the state's: `.params['backbone']...`, `.opt_state...`."""
  # orbax stores a dataclass's fields as a dict: compare the paths without their bracket style.
  norm = lambda path: path.replace("['", '.').replace("']", '').lstrip('.')  # noqa: E731
  stored = {norm(k): v for k, v in stored.items()}
  expected = {norm(k): v for k, v in expected.items()}
  problems = [f'{k} {stored[k][0]} {stored[k][1]} in the checkpoint, {v[0]} {v[1]} in this '
              'config' for k, v in expected.items() if k in stored and stored[k] != v]
  problems += [f'{k} is missing from the checkpoint' for k in expected if k not in stored]
  problems += [f'{k} is in the checkpoint, not in this config' for k in stored
               if k not in expected]
  return problems


class WorkdirLock:
  """An exclusive lock on WORKDIR/run.lock for as long as a run trains there.

  `fcntl.flock` is held by the open file: the kernel releases it when the process ends, however
  it ends (kill -9 included), so a stale lock never blocks the next run. The file names the
  holder (pid, host, start time) for the message the second run prints.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir if '://' in workdir else os.path.abspath(workdir), RUN_LOCK)
    self._file = None

  def __enter__(self) -> WorkdirLock:
    if '://' in self.path:  # an object store: no flock
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    handle = open(self.path, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or 'another process'
      handle.close()
      raise WorkdirInUseError(
          f'{os.path.dirname(self.path)} is in use by {holder}: two runs would write the same '
          'checkpoints. Wait for it or stop it, or give this run another --workdir.') from None
    except OSError as e:  # a file system without flock: refusing every run would be worse
      logging.warning('cannot lock %s (%s): nothing stops a second run on this workdir',
                      self.path, e)
      handle.close()
      return self
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now().isoformat(timespec='seconds')
    handle.write(f'process {os.getpid()} on {socket.gethostname()} (started {started})\n')
    handle.flush()
    self._file = handle
    return self

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      self._file.close()  # releases the lock; the file stays, harmless
      self._file = None


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of jax.Arrays."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def for_workdir(workdir: str, save_every_steps: int = 1, writer: bool = False) -> Checkpointer:
  """The Checkpointer of a run's workdir (WORKDIR/checkpoints); `writer` for the trainer."""
  return Checkpointer(os.path.join(workdir, CHECKPOINTS), save_every_steps=save_every_steps,
                      writer=writer)


def kept_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints kept in a run's workdir, ascending ([] if none)."""
  if not os.path.isdir(os.path.join(workdir, CHECKPOINTS)):
    return []
  ckpt = for_workdir(workdir)
  try:
    return ckpt.kept_steps()
  finally:
    ckpt.close()


def write_run_config(config, workdir: str) -> str:
  """Writes the resolved config to WORKDIR/config.json (what run.py does first); returns the
  path. `read_run_config` and the masks-from-boxes tools read it back."""
  os.makedirs(workdir, exist_ok=True)
  return write_run_config_text(config.to_json_best_effort(indent=2), workdir)


def read_run_config_text(workdir: str) -> str | None:
  """WORKDIR/config.json's text, or None where there is none."""
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read()


def write_run_config_text(text: str, workdir: str) -> str:
  """Writes WORKDIR/config.json atomically (a full disk or a kill leaves the old one whole);
  returns its path."""
  path = os.path.join(workdir, RUN_CONFIG)
  atomic.write_text(path, text)
  return path



def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config that run.py wrote to WORKDIR/config.json."""
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: not a run.py workdir')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def save_variables(variables: dict, directory: str) -> None:
  """Writes model variables {'params', 'batch_stats'} as one orbax checkpoint in `directory`."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(directory), variables)


def load_variables(directory: str, target=None) -> dict:
  """Reads what `save_variables` wrote; `target` (e.g. abstract arrays with shardings) optional:
  the arrays are then restored into its shapes, dtypes and shardings (orbax fails on any
  mismatch)."""
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(os.path.abspath(directory), target)
