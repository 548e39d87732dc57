"""The terminal progress bar: what it shows, when it redraws, and silence off a terminal."""
import io

from deepmarc_jax import progress


class _Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_bar_shows_step_rate_eta_and_loss_and_redraws_in_place():
  clock, stream = _Clock(), io.StringIO()
  bar = progress.ProgressBar(1000, start_step=200, stream=stream, enabled=True, width=10,
                             clock=clock)
  clock.now += 20.0  # 100 steps in 20 s: 5 steps/s, 700 left: 140 s
  bar.update(300, loss=1.23456)
  assert stream.getvalue() == ('\r[###.......] 300/1000  5.00 steps/s  ETA 2:20  loss 1.2346'
                               '\x1b[K')
  clock.now += 0.05  # within min_interval: no redraw
  bar.update(301)
  assert stream.getvalue().count('\r') == 1
  clock.now += 1.0
  bar.clear()
  bar.update(302)
  bar.close()
  assert stream.getvalue().endswith('\x1b[K\n') and '\r\x1b[K' in stream.getvalue()


def test_the_last_step_always_draws_and_hours_show():
  clock, stream = _Clock(), io.StringIO()
  bar = progress.ProgressBar(100_000, stream=stream, enabled=True, width=4, clock=clock)
  clock.now += 10.0
  bar.update(10)  # 1 step/s: 99,990 s left
  assert 'ETA 27:46:30' in stream.getvalue()
  bar.update(100_000)  # at once, but the last step
  assert '[####] 100000/100000' in stream.getvalue()


def test_off_a_terminal_it_writes_nothing():
  stream = io.StringIO()  # isatty() is False
  bar = progress.ProgressBar(10, stream=stream)
  bar.update(5, 1.0)
  bar.clear()
  bar.close()
  assert stream.getvalue() == ''
