"""A one-line training progress bar for terminals: step / total, steps/s, ETA and the loss.

On a terminal the line is redrawn in place (at most every `min_interval` seconds); elsewhere
(logs piped to a file, CI, a sweep cell) it writes nothing and the trainer's periodic log lines
are the record. The rate is measured over the steps since the bar started, so a resumed run's
ETA counts only the steps it still has to do.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours else f'{rest // 60}:{rest % 60:02d}'


class ProgressBar:
  """`update(step, loss)` after each train step; `clear()` before printing other lines."""

  def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO | None = None,
               enabled: bool | None = None, width: int = 24, min_interval: float = 0.2,
               clock=time.monotonic):
    self.total, self.start = total_steps, start_step
    self.stream = stream if stream is not None else sys.stderr
    self.enabled = self.stream.isatty() if enabled is None else enabled
    self.width, self.min_interval, self.clock = width, min_interval, clock
    self._started = clock()
    self._last_draw = None
    self._shown = False

  def line(self, step: int, loss: float | None = None) -> str:
    """The bar's text at `step`."""
    filled = int(self.width * step / max(self.total, 1))
    elapsed = self.clock() - self._started
    done = step - self.start
    rate = done / elapsed if elapsed > 0 and done > 0 else None
    parts = [f'[{"#" * filled}{"." * (self.width - filled)}] {step}/{self.total}']
    parts.append(f'{rate:.2f} steps/s' if rate else '-- steps/s')
    parts.append(f'ETA {_clock((self.total - step) / rate)}' if rate else 'ETA --')
    if loss is not None:
      parts.append(f'loss {loss:.4f}')
    return '  '.join(parts)

  def update(self, step: int, loss: float | None = None) -> None:
    if not self.enabled:
      return
    now = self.clock()
    if (step < self.total and self._last_draw is not None
        and now - self._last_draw < self.min_interval):
      return
    self._last_draw = now
    self.stream.write('\r' + self.line(step, loss) + '\x1b[K')  # \x1b[K: clear to line end
    self.stream.flush()
    self._shown = True

  def clear(self) -> None:
    """Erases the bar's line, so that the next text starts on a clean line."""
    if self.enabled and self._shown:
      self.stream.write('\r\x1b[K')
      self.stream.flush()
      self._shown = False

  def close(self) -> None:
    if self.enabled and self._shown:
      self.stream.write('\n')
      self.stream.flush()
      self._shown = False
