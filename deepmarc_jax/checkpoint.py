"""Checkpointing with orbax: resume first, save every N steps, at the end and on SIGTERM.

Resume policy (big_vision's): an existing checkpoint in the workdir always wins; otherwise the
state is freshly initialised (an `init_from` checkpoint would come second). Saves are
asynchronous; `close()` waits for them.
"""
from __future__ import annotations

import os
import signal
import threading

import jax
import orbax.checkpoint as ocp


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
