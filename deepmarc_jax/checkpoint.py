"""Checkpoints with orbax: the train state's, a run's workdir, and converted model variables.

Resume policy (big_vision's): an existing checkpoint in the workdir always wins; then the
variables of `config.init_from` (a converted official model, or an earlier run's); otherwise
the state is freshly initialised. Saves are asynchronous; `close()` waits for them.

A run's workdir (what run.py writes): `config.json` (the resolved config) and `checkpoints/`
(one folder per kept step). Converted variables (`save_variables`) are one orbax checkpoint of
{'params', 'batch_stats'}.
"""
from __future__ import annotations

import json
import os
import signal
import threading

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINTS = 'checkpoints'
RUN_CONFIG = 'config.json'


class Checkpointer:
  """An orbax CheckpointManager for one pytree (the train state) in `directory`."""

  def __init__(self, directory: str, *, save_every_steps: int, max_to_keep: int = 3):
    # orbax restores only from absolute paths; run.py --workdir may be relative.
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every_steps, max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def kept_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, abstract_state, step: int | None = None):
    """Restores into the shapes, dtypes and shardings of `abstract_state`."""
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` saves without `force` (`step` is on the interval)."""
    return self.manager.should_save(step)

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it saved."""
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

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


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of jax.Arrays."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def for_workdir(workdir: str, save_every_steps: int = 1) -> Checkpointer:
  """The Checkpointer of a run's workdir (WORKDIR/checkpoints)."""
  return Checkpointer(os.path.join(workdir, CHECKPOINTS), save_every_steps=save_every_steps)


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
  path = os.path.join(workdir, RUN_CONFIG)
  with open(path, 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
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
