"""Sweeps: grid cells and names, --only, finished cells, the runner, commands and the report.

Everything runs on a fake sweep config (a plain ConfigDict, no model code) and fake cells: no
JAX, no training.
"""
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from PIL import Image

from deepmarc_jax.sweeps import grid as sweep_grid
from deepmarc_jax.sweeps import report as sweep_report
from deepmarc_jax.sweeps import runner as sweep_runner
from tests.conftest import REPO

FAKE_CONFIG = textwrap.dedent('''\
    """A fake sweep config: the fields a sweep touches, nothing else."""
    import ml_collections

    GRIDS = {
        None: {'model.mask_head.type': ['default', 'resnet4'],
               'model.mask_head.train_crops': ['gt', 'proposals'],
               'seed': [0, 1]},
        'steps': {'train.total_steps': [5, 7], 'seed': [0]},
        'dup': {'model.mask_head.seed': [1, 2], 'train.seed': [0, 1]},
        'slash': {'model.mask_head.type': ['a/b']},
        'space': {'model.mask_head.type': ['a b']},
        'comma': {'model.mask_head.type': ['a,b']},
        'repeat': {'seed': [1, '1']},
        'typo': {'model.mask_head.tpye': ['x']},
        'contrast_seed': {'model.mask_head.type': ['default', 'resnet4'], 'seed': [0, 1]},
        'contrast_value': {'model.mask_head.type': ['default', 'resnet4'], 'seed': [0, 1]},
        'contrast_list': {'model.mask_head.type': ['default', 'resnet4'], 'seed': [0, 1]},
    }


    def get_config(arg=None):
      config = ml_collections.ConfigDict()
      config.seed = 0
      config.train = ml_collections.ConfigDict({'total_steps': 100, 'seed': 0})
      config.model = ml_collections.ConfigDict()
      config.model.mask_head = ml_collections.ConfigDict(
          {'type': 'default', 'train_crops': 'gt', 'seed': 0})
      return config


    def get_sweep(arg=None):
      return GRIDS[arg]


    CONTRASTS = {
        None: {'model.mask_head.train_crops': 'proposals', 'model.mask_head.type': 'default'},
        'contrast_seed': {'seed': 0},
        'contrast_value': {'model.mask_head.type': 'resnet12'},
        'contrast_list': ['model.mask_head.type'],
    }


    def get_contrasts(arg=None):
      return CONTRASTS.get(arg, {})
''')

# A stand-in for run.py: writes eval_100.json into its workdir, fails for the resnet4 head.
FAKE_RUN_PY = textwrap.dedent('''\
    import json, os, sys
    args = dict(a[2:].split('=', 1) for a in sys.argv[1:])
    print('fake run.py', sys.argv[1:])
    if args.get('config.model.mask_head.type') == 'resnet4':
      sys.exit(3)
    with open(os.path.join(args['workdir'], 'eval_100.json'), 'w') as f:
      json.dump({'segm': {'seen': {'AP': 0.5}, 'unseen': {'AP': 0.25}}, 'bbox': {'AP': 0.4}}, f)
''')

DEFAULT_NAMES = [
    'type=default__train_crops=gt__seed=0', 'type=default__train_crops=gt__seed=1',
    'type=default__train_crops=proposals__seed=0', 'type=default__train_crops=proposals__seed=1',
    'type=resnet4__train_crops=gt__seed=0', 'type=resnet4__train_crops=gt__seed=1',
    'type=resnet4__train_crops=proposals__seed=0', 'type=resnet4__train_crops=proposals__seed=1']


@pytest.fixture
def config_path(tmp_path):
  path = tmp_path / 'fake_sweep.py'
  path.write_text(FAKE_CONFIG)
  return str(path)


def _load(config_path, tmp_path, arg=None, only=()):
  flag = config_path if arg is None else f'{config_path}:{arg}'
  return sweep_grid.load(flag, str(tmp_path / 'sweep'), only)


def _eval_json(seen, unseen, box, gt=None):
  """An eval_<step>.json as evaluate.write_json writes it (fractions, None for NaN)."""
  results = {'bbox': {'AP': box, 'AP50': None, 'seen': {'AP': box}, 'unseen': {'AP': box}},
             'segm': {'AP': None, 'seen': {'AP': seen}, 'unseen': {'AP': unseen}},
             'num_images': 64}
  if gt is not None:
    results['segm_gt_boxes'] = {'AP': None, 'seen': {'AP': gt[0]}, 'unseen': {'AP': gt[1]}}
  return results


def _finish(sweep, cell, results=None, step=None):
  """Writes a cell's eval JSON (at its total_steps unless `step`)."""
  workdir = cell.workdir(sweep.sweep_dir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f'eval_{step or cell.total_steps}.json'), 'w') as f:
    json.dump(results or _eval_json(0.1, 0.2, 0.3), f)


def _workdir_of(argv):
  return next(a.split('=', 1)[1] for a in argv if a.startswith('--workdir='))


# Grid, names, narrowing.


def test_grid_order_and_cell_names(config_path, tmp_path):
  sweep = _load(config_path, tmp_path)
  assert [c.name for c in sweep.cells] == DEFAULT_NAMES
  assert sweep.cells[5].overrides == {'model.mask_head.type': 'resnet4',
                                      'model.mask_head.train_crops': 'gt', 'seed': 1}
  assert all(c.total_steps == 100 for c in sweep.cells)
  assert sweep.cells == sweep.all_cells


def test_total_steps_come_from_the_resolved_cell_config(config_path, tmp_path):
  sweep = _load(config_path, tmp_path, 'steps')
  assert [(c.name, c.total_steps) for c in sweep.cells] == [
      ('total_steps=5__seed=0', 5), ('total_steps=7__seed=0', 7)]


def test_clashing_short_names_use_the_full_field(config_path, tmp_path):
  sweep = _load(config_path, tmp_path, 'dup')
  assert sweep.cells[1].name == 'model.mask_head.seed=1__train.seed=1'
  with pytest.raises(ValueError, match=r"'seed' is ambiguous.*'model.mask_head.seed', "
                                       r"'train.seed'.*use the full field"):
    _load(config_path, tmp_path, 'dup', only=['seed=1'])
  narrowed = _load(config_path, tmp_path, 'dup', only=['model.mask_head.seed=2'])
  assert [c.name for c in narrowed.cells] == ['model.mask_head.seed=2__train.seed=0',
                                              'model.mask_head.seed=2__train.seed=1']


@pytest.mark.parametrize('arg', ['slash', 'space', 'comma'])
def test_bad_values_are_rejected(config_path, tmp_path, arg):
  with pytest.raises(ValueError, match=r"model.mask_head.type.*not allowed.*'/', ','"):
    _load(config_path, tmp_path, arg)


def test_values_with_equal_str_are_rejected(config_path, tmp_path):
  with pytest.raises(ValueError, match=r"'seed': values \['1'\] appear more than once"):
    _load(config_path, tmp_path, 'repeat')


def test_unknown_config_field_is_rejected(config_path, tmp_path):
  with pytest.raises(ValueError, match=r"'model.mask_head.tpye'.*no field 'tpye'"):
    _load(config_path, tmp_path, 'typo')


def test_only_narrows_by_short_and_full_names(config_path, tmp_path):
  sweep = _load(config_path, tmp_path, only=['type=resnet4,default', 'seed=0'])
  assert [c.name for c in sweep.cells] == [DEFAULT_NAMES[i] for i in (0, 2, 4, 6)]
  assert sweep.grid['model.mask_head.type'] == ['default', 'resnet4']  # grid order kept
  assert sweep.grid['seed'] == [0] and len(sweep.all_cells) == 8
  full = _load(config_path, tmp_path, only=['model.mask_head.train_crops=proposals'])
  assert [c.name for c in full.cells] == [DEFAULT_NAMES[i] for i in (2, 3, 6, 7)]


@pytest.mark.parametrize('only,message', [
    (['typ=default'], r"'typ' is not a sweep axis; allowed: \[.*'model.mask_head.type'.*'type'"),
    (['type=hourglass20'], r"\['hourglass20'\] not among the values of 'model.mask_head.type'; "
                           r"allowed: \['default', 'resnet4'\]"),
    (['seed=2'], r"\['2'\] not among .*allowed: \['0', '1'\]"),
    (['seed'], r'expected FIELD=VALUE'),
    (['type=default', 'model.mask_head.type=resnet4'], r'narrowed twice'),
])
def test_only_errors(config_path, tmp_path, only, message):
  with pytest.raises(ValueError, match=message):
    _load(config_path, tmp_path, only=only)


def test_missing_get_sweep(tmp_path):
  path = tmp_path / 'plain.py'
  path.write_text('def get_config(arg=None):\n  return None\n')
  with pytest.raises(ValueError, match='defines no get_sweep'):
    sweep_grid.load(str(path), str(tmp_path / 'sweep'))


# Finished cells, commands.


def test_finished_needs_the_final_eval(config_path, tmp_path):
  sweep = _load(config_path, tmp_path)
  _finish(sweep, sweep.cells[0])
  _finish(sweep, sweep.cells[1], step=50)  # an intermediate eval only
  assert [c.finished(sweep.sweep_dir) for c in sweep.cells[:3]] == [True, False, False]


def test_print_commands(config_path, tmp_path):
  sweep = _load(config_path, tmp_path, only=['seed=0'])
  _finish(sweep, sweep.cells[1])
  lines = sweep_grid.command_lines(sweep)
  assert len(lines) == 4 and lines[1] == f'# finished: {sweep.cells[1].name}'
  argv = shlex.split(lines[3])
  assert argv[:4] == [sys.executable, str(REPO / 'run.py'), f'--config={config_path}',
                      f'--workdir={tmp_path}/sweep/{sweep.cells[3].name}']
  assert argv[4:] == ['--config.model.mask_head.type=resnet4',
                      '--config.model.mask_head.train_crops=proposals', '--config.seed=0']


def test_commands_keep_the_config_arg_and_quote(tmp_path):
  path = tmp_path / 'with space' / 'cfg.py'
  path.parent.mkdir()
  path.write_text(FAKE_CONFIG)
  sweep = sweep_grid.load(f'{path}:steps', str(tmp_path / 'sweep'))
  argv = shlex.split(sweep_grid.command_lines(sweep)[0])
  assert argv[2] == f'--config={path}:steps' and argv[4] == '--config.train.total_steps=5'


# The runner.


class FakeRunner:
  """Records commands; 'finishes' a cell (writes its eval) unless its head is in `fail`."""

  def __init__(self, sweep, fail=()):
    self.sweep, self.fail, self.calls = sweep, fail, []

  def __call__(self, argv, cwd, log_path):
    self.calls.append((list(argv), cwd, log_path))
    workdir = _workdir_of(argv)
    assert os.path.isdir(workdir) and log_path == os.path.join(workdir, 'log.txt')
    if any(f'--config.model.mask_head.type={f}' in argv for f in self.fail):
      return 1
    cell = next(c for c in self.sweep.cells if c.workdir(self.sweep.sweep_dir) == workdir)
    _finish(self.sweep, cell)
    return 0


def test_run_skips_finished_cells_and_continues_after_failures(config_path, tmp_path):
  sweep = _load(config_path, tmp_path)
  for i in (0, 3):
    _finish(sweep, sweep.cells[i])
  runner, messages, reports = FakeRunner(sweep, fail=('resnet4',)), [], []
  failed = sweep_runner.run(sweep, runner, after_cell=lambda: reports.append(1),
                            log=messages.append)
  ran = [c for i, c in enumerate(sweep.cells) if i not in (0, 3)]
  assert [call[0] for call in runner.calls] == [sweep_grid.command(sweep, c) for c in ran]
  assert runner.calls[0][0] == [
      sys.executable, str(REPO / 'run.py'), f'--config={config_path}',
      f'--workdir={sweep.sweep_dir}/{DEFAULT_NAMES[1]}', '--config.model.mask_head.type=default',
      '--config.model.mask_head.train_crops=gt', '--config.seed=1']
  assert all(call[1] == str(REPO) for call in runner.calls)
  assert failed == DEFAULT_NAMES[4:] and len(reports) == 6
  assert messages[0] == '2 of 8 cells already finished; 6 to run'
  assert messages[-1].startswith(f'[6/6] end {DEFAULT_NAMES[7]}: ')
  assert messages[-1].endswith('exit status 1, FAILED')
  record = sweep_grid.read_cell_record(ran[0].workdir(sweep.sweep_dir))
  assert record['returncode'] == 0 and record['command'] == runner.calls[0][0]
  assert record['overrides'] == ran[0].overrides and record['attempts'] == 1
  assert 0 <= record['wall_seconds'] < 5 and record['finished_utc'].endswith('+00:00')
  assert sweep_grid.read_cell_record(sweep.cells[4].workdir(sweep.sweep_dir))['returncode'] == 1
  # Re-running runs exactly the failed cells again.
  runner = FakeRunner(sweep, fail=('resnet4',))
  assert sweep_runner.run(sweep, runner, log=messages.append) == DEFAULT_NAMES[4:]
  assert [_workdir_of(call[0]) for call in runner.calls] == [
      os.path.join(sweep.sweep_dir, n) for n in DEFAULT_NAMES[4:]]


def test_resumed_cell_accumulates_wall_time(config_path, tmp_path):
  sweep = _load(config_path, tmp_path, only=['type=default', 'train_crops=gt', 'seed=0'])
  cell = sweep.cells[0]
  sweep_grid.write_json_atomic({'wall_seconds': 100.0, 'attempts': 1},
                              os.path.join(cell.workdir(sweep.sweep_dir), 'sweep_cell.json'))
  assert sweep_runner.run(sweep, FakeRunner(sweep), log=lambda _: None) == []
  record = sweep_grid.read_cell_record(cell.workdir(sweep.sweep_dir))
  assert 100.0 <= record['wall_seconds'] < 105 and record['attempts'] == 2


def test_interrupted_cell_records_its_time(config_path, tmp_path):
  sweep = _load(config_path, tmp_path, only=['seed=0'])

  def interrupted(argv, cwd, log_path):
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    sweep_runner.run(sweep, interrupted, log=lambda _: None)
  record = sweep_grid.read_cell_record(sweep.cells[0].workdir(sweep.sweep_dir))
  assert record['returncode'] == -signal.SIGINT and record['wall_seconds'] >= 0
  assert sweep_grid.read_cell_record(sweep.cells[1].workdir(sweep.sweep_dir)) is None


def test_exit_zero_without_final_eval_is_a_failure(config_path, tmp_path):
  sweep = _load(config_path, tmp_path, only=['seed=0', 'type=default', 'train_crops=gt'])
  messages = []
  assert sweep_runner.run(sweep, lambda *_: 0, log=messages.append) == [sweep.cells[0].name]
  assert messages[-1].endswith('exit status 0 but no eval_100.json, FAILED')


def test_run_through_a_real_subprocess(config_path, tmp_path):
  fake_run_py = tmp_path / 'fake_run.py'
  fake_run_py.write_text(FAKE_RUN_PY)
  sweep = _load(config_path, tmp_path, only=['seed=0', 'train_crops=gt'])

  def run_fake(argv, cwd, log_path):  # the real subprocess runner, on the fake run.py
    return sweep_runner.run_subprocess([argv[0], str(fake_run_py)] + list(argv[2:]), cwd, log_path)

  assert sweep_runner.run(sweep, run_fake, log=lambda _: None) == [sweep.cells[1].name]
  assert sweep.cells[0].finished(sweep.sweep_dir)
  log = open(os.path.join(sweep.cells[0].workdir(sweep.sweep_dir), 'log.txt')).read()
  assert '=== ' in log and "fake run.py ['--config=" in log
  assert sweep_grid.read_cell_record(sweep.cells[1].workdir(sweep.sweep_dir))['returncode'] == 3


def test_share_compilation_cache_defaults_but_never_overrides(tmp_path):
  environ = {}
  assert sweep_runner.share_compilation_cache(str(tmp_path / 'c'), environ) == str(tmp_path / 'c')
  assert environ == {'JAX_COMPILATION_CACHE_DIR': str(tmp_path / 'c')}
  environ = {'JAX_COMPILATION_CACHE_DIR': '/users/own'}
  assert sweep_runner.share_compilation_cache(str(tmp_path / 'c'), environ) == '/users/own'
  assert environ == {'JAX_COMPILATION_CACHE_DIR': '/users/own'}
  environ = {}
  assert sweep_runner.share_compilation_cache('', environ) == '' and environ == {}


CACHE_PROBE = """
import jax, jax.numpy as jnp
events = []
jax.monitoring.register_event_listener(lambda name, **_: events.append(name))
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
print(sorted({e.rsplit('/', 1)[1] for e in events} & {'cache_hits', 'cache_misses'}))
"""


def test_cells_share_compiled_programs_through_the_cache(tmp_path):
  """Two cell processes with the environment share_compilation_cache sets: the first compiles
  and stores, the second loads (JAX's own cache events), so the cache works on this backend."""
  environ = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')  # tiny program
  environ.pop('JAX_COMPILATION_CACHE_DIR', None)
  sweep_runner.share_compilation_cache(str(tmp_path / 'jax_cache'), environ)
  runs = [subprocess.run([sys.executable, '-c', CACHE_PROBE], env=environ, capture_output=True,
                         text=True, timeout=120, check=True).stdout.strip() for _ in range(2)]
  assert runs == ["['cache_misses']", "['cache_hits']"]
  assert os.listdir(tmp_path / 'jax_cache')


# Running cells in parallel.

PINNING = hasattr(os, 'sched_setaffinity')


@pytest.fixture
def two_at_a_time(monkeypatch):
  """Lets two cells run at once whatever CPUs this process may use: with fewer than two (e.g.
  under `taskset -c 1`) the runner sees no pinning, as on macOS, and runs them unpinned.
  Returns whether cells are pinned."""
  cpus = sweep_runner.allowed_cpus()
  if cpus is not None and len(cpus) < 2:
    monkeypatch.setattr(sweep_runner, 'allowed_cpus', lambda: None)
    return False
  return cpus is not None


def test_parallel_runs_at_most_n_cells_at_once_on_disjoint_cpus(config_path, tmp_path,
                                                               two_at_a_time):
  sweep = _load(config_path, tmp_path, only=['seed=0'])  # 4 cells, the resnet4 ones fail
  # The first cell runs longest and cell 3 ends before cell 2: failures end out of grid order.
  sleeps = dict(zip([c.name for c in sweep.cells], [0.3, 0.1, 0.4, 0.1]))
  runner, spans, lock = FakeRunner(sweep, fail=('resnet4',)), {}, threading.Lock()
  reports, in_report, messages = [], [], []

  def run_fn(argv, cwd, log_path, cpus):
    name = os.path.basename(_workdir_of(argv))
    start = time.monotonic()
    time.sleep(sleeps[name])
    with lock:
      returncode = runner(argv, cwd, log_path)
    spans[name] = (start, time.monotonic(), cpus)
    return returncode

  def after_cell():  # must never run concurrently: it rewrites the report
    in_report.append(1)
    assert len(in_report) == 1
    time.sleep(0.02)
    in_report.pop()
    reports.append(1)

  failed = sweep_runner.run(sweep, run_fn, after_cell=after_cell, log=messages.append, parallel=2)
  assert failed == DEFAULT_NAMES[4::2]  # grid order
  assert sorted(spans) == sorted(c.name for c in sweep.cells)  # each cell ran exactly once
  assert len(runner.calls) == 4 and len(reports) == 4
  for start, _, _ in spans.values():
    assert sum(s <= start < e for s, e, _ in spans.values()) <= 2
  (start_0, end_0, _), (start_1, end_1, _) = (spans[c.name] for c in sweep.cells[:2])
  assert start_1 < end_0 and start_0 < end_1  # the first two cells did run side by side
  starts = [m for m in messages if ' start ' in m]
  assert [m.split(' start ')[1].split()[0] for m in starts] == [c.name for c in sweep.cells]
  assert len([m for m in messages if ' end ' in m]) == 4
  assert all('\n' not in m for m in messages)
  first = sweep_grid.read_cell_record(sweep.cells[0].workdir(sweep.sweep_dir))
  assert first['returncode'] == 0 and first['attempts'] == 1
  assert first['cpus'] == (None if spans[sweep.cells[0].name][2] is None
                           else list(spans[sweep.cells[0].name][2]))

  if not two_at_a_time:
    pytest.skip('fewer than two CPUs to pin cells to (or no os.sched_setaffinity): cells ran '
                'unpinned')
  allowed = set(os.sched_getaffinity(0))
  assert all(cpus and set(cpus) <= allowed for _, _, cpus in spans.values())
  for a, (start_a, end_a, cpus_a) in spans.items():
    for b, (start_b, end_b, cpus_b) in spans.items():
      if a < b and start_a < end_b and start_b < end_a:  # ran at the same time
        assert not set(cpus_a) & set(cpus_b), (a, cpus_a, b, cpus_b)


@pytest.mark.parametrize('cpus,parallel,slots', [
    ([0, 1, 2, 3], 2, [(0, 1), (2, 3)]),
    ([0, 1, 2], 2, [(0, 1), (2,)]),
    ([0, 1, 2, 3, 4], 3, [(0, 1), (2, 3), (4,)]),
    ([4, 5, 7], 3, [(4,), (5,), (7,)]),
    ([0, 1], 1, [(0, 1)]),
])
def test_cpu_slots(cpus, parallel, slots):
  assert sweep_runner.cpu_slots(cpus, parallel) == slots


@pytest.mark.parametrize('cpus,parallel', [([0, 1, 2], 4), ([0, 1], 0)])
def test_cpu_slots_errors(cpus, parallel):
  with pytest.raises(ValueError, match=f'parallel={parallel}'):
    sweep_runner.cpu_slots(cpus, parallel)


def test_run_rejects_bad_parallel(config_path, tmp_path):
  sweep = _load(config_path, tmp_path)
  for parallel in (0, 1.5, len(os.sched_getaffinity(0)) + 1 if PINNING else 0):
    with pytest.raises(ValueError, match=r'parallel='):
      sweep_runner.run(sweep, FakeRunner(sweep), log=lambda _: None, parallel=parallel)
  assert not os.path.exists(sweep.sweep_dir)  # nothing ran


@pytest.mark.skipif(not PINNING, reason='os.sched_setaffinity does not exist here')
def test_run_subprocess_pins_the_child(tmp_path):
  cpu = sorted(os.sched_getaffinity(0))[0]
  before = os.sched_getaffinity(0)
  log_path = str(tmp_path / 'log.txt')
  code = 'import os; print("affinity", sorted(os.sched_getaffinity(0)))'
  assert sweep_runner.run_subprocess([sys.executable, '-c', code], str(tmp_path), log_path,
                                     cpus=(cpu,)) == 0
  log = open(log_path).read()
  assert f'affinity [{cpu}]\n' in log and f'sweep (cpus {cpu}): ' in log
  assert os.sched_getaffinity(0) == before  # only the child was pinned


# Sleeps until SIGTERM, as run.py checkpoints and stops on SIGTERM.
SIGTERM_CHILD = textwrap.dedent('''\
    import signal, sys, time
    def stop(signum, frame):
      print('got SIGTERM', flush=True)
      sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print('SIGINT ignored:', signal.getsignal(signal.SIGINT) == signal.SIG_IGN, flush=True)
    time.sleep(30)
''')


def _signal_me_once_logged(log_paths, signum):
  """Starts a thread that sends this process `signum` once every log has the child's first line."""
  def send():
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
        os.path.exists(p) and 'SIGINT ignored' in open(p).read() for p in log_paths):
      time.sleep(0.05)
    os.kill(os.getpid(), signum)

  threading.Thread(target=send, daemon=True).start()


def _assert_stopped_gracefully(sweep, running, messages, returncode, sigint_ignored):
  """Checks that the `running` first cells got SIGTERM and were recorded, the others never ran."""
  for cell in sweep.cells[:running]:
    log = open(os.path.join(cell.workdir(sweep.sweep_dir), 'log.txt')).read()
    assert f'SIGINT ignored: {sigint_ignored}' in log and 'got SIGTERM' in log
    record = sweep_grid.read_cell_record(cell.workdir(sweep.sweep_dir))
    assert record['returncode'] == returncode and record['wall_seconds'] > 0
    assert any(m.startswith('[') and f'interrupted {cell.name}' in m for m in messages)
  for cell in sweep.cells[running:]:  # not started
    assert not os.path.exists(cell.workdir(sweep.sweep_dir))
  assert sweep_runner._CHILDREN.count() == 0


def _run_child(child):
  """Returns a run_fn that runs the script `child` instead of each cell's run.py."""
  def run_fn(argv, cwd, log_path, *cpus):
    return sweep_runner.run_subprocess([sys.executable, str(child)], cwd, log_path, *cpus)
  return run_fn


def test_parallel_interrupt_terminates_and_records_running_cells(config_path, tmp_path,
                                                                 two_at_a_time):
  sweep = _load(config_path, tmp_path, only=['seed=0'])
  child = tmp_path / 'child.py'
  child.write_text(SIGTERM_CHILD)
  messages = []
  # Ctrl-C must raise KeyboardInterrupt here, whatever SIGINT handler earlier code in this
  # process (TF, absl, another test) left installed.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _signal_me_once_logged([os.path.join(c.workdir(sweep.sweep_dir), 'log.txt')
                            for c in sweep.cells[:2]], signal.SIGINT)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
      sweep_runner.run(sweep, _run_child(child), log=messages.append, parallel=2)
  finally:
    signal.signal(signal.SIGINT, previous)
  assert time.monotonic() - start < 30
  # Children ignore the terminal's SIGINT; the runner stops them with SIGTERM.
  _assert_stopped_gracefully(sweep, 2, messages, -signal.SIGINT, sigint_ignored=True)


@pytest.mark.parametrize('parallel', [1, 2])
def test_sigterm_passes_sigterm_to_the_running_cells(config_path, tmp_path, parallel,
                                                     two_at_a_time):
  sweep = _load(config_path, tmp_path, only=['seed=0'])
  child = tmp_path / 'child.py'
  child.write_text(SIGTERM_CHILD)
  messages = []
  previous = sweep_runner.handle_sigterm()
  # A pytest started with SIGINT ignored (a background job of a script) would pass that on to
  # the one-at-a-time cell; with a handler installed here, the cell starts with the default.
  previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _signal_me_once_logged([os.path.join(c.workdir(sweep.sweep_dir), 'log.txt')
                            for c in sweep.cells[:parallel]], signal.SIGTERM)
    start = time.monotonic()
    with pytest.raises(sweep_runner.Terminated):
      sweep_runner.run(sweep, _run_child(child), log=messages.append, parallel=parallel)
  finally:
    signal.signal(signal.SIGTERM, previous)
    signal.signal(signal.SIGINT, previous_sigint)
  assert time.monotonic() - start < 30
  # Unlike Ctrl-C one at a time, which kills the cell, SIGTERM lets it checkpoint in both modes.
  _assert_stopped_gracefully(sweep, parallel, messages, -signal.SIGTERM,
                             sigint_ignored=parallel > 1)


# The report.

# (head, crops) -> per seed (seen, unseen, box) mask/box AP fractions; None = null.
REPORT_VALUES = {
    ('default', 'gt'): [(0.10, 0.05, 0.30), (0.12, 0.07, 0.32)],
    ('default', 'proposals'): [(0.11, 0.04, 0.31), (0.15, None, 0.29)],
    ('resnet4', 'gt'): [(0.20, 0.13, 0.33), (0.23, 0.17, 0.36)],
    ('resnet4', 'proposals'): [(0.21, 0.12, 0.34)],  # seed 1 unfinished
}


@pytest.fixture
def reported(config_path, tmp_path):
  """A sweep with 7 of 8 cells finished; returns (sweep, write_report's dict)."""
  sweep = _load(config_path, tmp_path)
  for cell in sweep.cells:
    key = (cell.overrides['model.mask_head.type'], cell.overrides['model.mask_head.train_crops'])
    seeds = REPORT_VALUES[key]
    if cell.overrides['seed'] < len(seeds):
      seen, unseen, box = seeds[cell.overrides['seed']]
      gt = (seen + 0.1, 0.3) if key[0] == 'resnet4' else None
      _finish(sweep, cell, _eval_json(seen, unseen, box, gt))
      sweep_grid.write_json_atomic({'wall_seconds': 60.0 * (1 + cell.overrides['seed'])},
                                  os.path.join(cell.workdir(sweep.sweep_dir), 'sweep_cell.json'))
  return sweep, sweep_report.write_report(sweep.sweep_dir, sweep.full_grid, sweep.all_cells,
                                          config=sweep.config_flag, contrasts=sweep.contrasts)


def _table_rows(markdown, title=None):
  """{(type, train_crops): {column: text}} of the report's first table (after `title`)."""
  if title is not None:
    markdown = markdown.split(f'\n{title}\n', 1)[1]
  lines = []
  for line in markdown.splitlines():
    if line.startswith('|'):
      lines.append(line)
    elif lines:
      break
  header = [h.strip() for h in lines[0].strip('|').split('|')]
  rows = [dict(zip(header, (c.strip() for c in line.strip('|').split('|')))) for line in lines[2:]]
  return {(r['type'], r['train_crops']): r for r in rows}


def test_report_means_and_sds_match_numpy(reported):
  _, report = reported
  markdown = open(report['markdown']).read()
  table = _table_rows(markdown)
  assert list(table) == list(REPORT_VALUES)  # grid order
  seen = [v[0] for v in REPORT_VALUES[('resnet4', 'gt')]]
  assert table[('resnet4', 'gt')]['seen mask AP (%)'] == (
      f'{100 * np.mean(seen):.1f} ± {100 * np.std(seen, ddof=1):.1f}')
  box = [v[2] for v in REPORT_VALUES[('default', 'proposals')]]
  assert table[('default', 'proposals')]['box AP (%)'] == (
      f'{100 * np.mean(box):.1f} ± {100 * np.std(box, ddof=1):.1f}')
  assert table[('resnet4', 'proposals')]['seen mask AP (%)'] == '21.0'  # one seed: the mean
  assert [table[k]['n'] for k in REPORT_VALUES] == ['2', '2', '2', '1']
  assert table[('default', 'gt')]['wall min'] == '1.5'
  group = report['groups'][2]
  assert group.key == {'model.mask_head.type': 'resnet4', 'model.mask_head.train_crops': 'gt'}
  unseen = [v[1] for v in REPORT_VALUES[('resnet4', 'gt')]]
  assert math.isclose(group.stats['unseen mask AP'].mean, np.mean(unseen))
  assert math.isclose(group.stats['unseen mask AP'].sd, np.std(unseen, ddof=1))
  assert '± = mean ± sample standard deviation' in markdown.replace('"a ± b"', '±')


def _signed(values):
  """'mean ± sd' in percentage points with the mean's sign, as format_stat(signed=True)."""
  values = 100 * np.asarray(values)
  if len(values) == 1:
    return f'{values[0]:+.1f}'
  return f'{values.mean():+.1f} ± {values.std(ddof=1):.1f}'


def test_report_paired_differences(reported):
  """get_contrasts' {field: baseline}: each other value minus the baseline, paired by seed and
  the other axes; unpaired cells (resnet4/proposals seed 1 is unfinished) and null values are
  left out. Reference: the differences worked from REPORT_VALUES with numpy."""
  sweep, report = reported
  assert sweep.contrasts == {'model.mask_head.train_crops': 'proposals',
                             'model.mask_head.type': 'default'}
  markdown = open(report['markdown']).read()
  crops = _table_rows(markdown, '### train_crops: each value minus proposals')
  assert list(crops) == [('default', 'gt − proposals'), ('resnet4', 'gt − proposals')]
  (gt0, gt1), (pr0, pr1) = REPORT_VALUES[('default', 'gt')], REPORT_VALUES[('default', 'proposals')]
  default = crops[('default', 'gt − proposals')]
  assert default['n'] == '2'
  assert default['seen mask AP (pp)'] == _signed([gt0[0] - pr0[0], gt1[0] - pr1[0]])
  assert default['box AP (pp)'] == _signed([gt0[2] - pr0[2], gt1[2] - pr1[2]])
  assert default['unseen mask AP (pp)'] == _signed([gt0[1] - pr0[1]]) + ' (1 null)'
  resnet4 = crops[('resnet4', 'gt − proposals')]
  (r_gt0, _), (r_pr0,) = REPORT_VALUES[('resnet4', 'gt')], REPORT_VALUES[('resnet4', 'proposals')]
  assert resnet4['n'] == '1'
  assert resnet4['seen mask AP (pp)'] == _signed([r_gt0[0] - r_pr0[0]])

  heads = _table_rows(markdown, '### type: each value minus default')
  assert list(heads) == [('resnet4 − default', 'gt'), ('resnet4 − default', 'proposals')]
  gt = heads[('resnet4 − default', 'gt')]
  assert gt['n'] == '2' and gt['unseen mask AP (pp)'] == _signed(
      [r[1] - d[1] for r, d in zip(REPORT_VALUES[('resnet4', 'gt')],
                                   REPORT_VALUES[('default', 'gt')])])
  assert heads[('resnet4 − default', 'proposals')]['n'] == '1'
  diff = report['differences'][0]
  assert (diff.field, diff.value, diff.baseline, diff.key, diff.pairs) == (
      'model.mask_head.train_crops', 'gt', 'proposals', {'model.mask_head.type': 'default'}, 2)


@pytest.mark.parametrize('arg, message', [
    ('contrast_seed', "get_contrasts: 'seed' is not a non-seed sweep axis"),
    ('contrast_value', "get_contrasts: baseline 'resnet12' is not a value of"),
    ('contrast_list', 'get_contrasts must return a dict'),
])
def test_bad_contrasts_are_rejected(config_path, tmp_path, arg, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    _load(config_path, tmp_path, arg=arg)


def test_report_skips_and_counts_nulls(reported):
  _, report = reported
  markdown = open(report['markdown']).read()
  stat = report['groups'][1].stats['unseen mask AP']
  assert (stat.mean, stat.count, stat.nulls) == (0.04, 1, 1) and math.isnan(stat.sd)
  assert _table_rows(markdown)[('default', 'proposals')]['unseen mask AP (%)'] == '4.0 (1 null)'
  # The GT-box columns exist (resnet4 has them); the default head's cells have no value there.
  assert _table_rows(markdown)[('default', 'gt')]['seen mask AP (GT boxes) (%)'] == '-'
  assert _table_rows(markdown)[('resnet4', 'gt')]['unseen mask AP (GT boxes) (%)'] == '30.0 ± 0.0'
  assert '1 null value(s)' in markdown


def test_report_lists_missing_cells_and_writes_a_png(reported):
  sweep, report = reported
  markdown = open(report['markdown']).read()
  assert f'7 of 8 cells finished; missing: `{DEFAULT_NAMES[7]}`.' in markdown
  with open(report['png'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert os.path.getsize(report['png']) > 1000
  with Image.open(report['png']) as image:
    width, height = image.size
  assert width > 500 and height > 700  # two rows of panels: GT-box results are present
  assert report['png'] == os.path.join(sweep.sweep_dir, 'report.png')


def test_report_by_step_tables(config_path, tmp_path):
  sweep = _load(config_path, tmp_path)
  # Seen mask AP at step 0 of each (crops, seed); it rises by step / 1000.
  seen = {(crops, seed): 0.01 * (10 + 2 * seed + (crops == 'gt'))
          for crops in ('gt', 'proposals') for seed in (0, 1)}
  default = [c for c in sweep.cells if c.overrides['model.mask_head.type'] == 'default']
  for cell in default:
    crops, seed = cell.overrides['model.mask_head.train_crops'], cell.overrides['seed']
    for step in (50, 100, 150):  # 150 is past total_steps (100): left out
      value = seen[(crops, seed)] + step / 1000
      _finish(sweep, cell, _eval_json(value, 0.2, 0.3 + step / 1000, gt=(value + 0.1, 0.4)),
              step=step)
  unfinished = next(c for c in sweep.cells if c.overrides['model.mask_head.type'] == 'resnet4')
  _finish(sweep, unfinished, _eval_json(0.9, 0.9, 0.9), step=50)  # no final eval: left out
  report = sweep_report.write_report(sweep.sweep_dir, sweep.full_grid, sweep.all_cells)
  markdown = open(report['markdown']).read()
  assert 'step 150' not in markdown
  curve = _table_rows(markdown, '### seen mask AP (%)')
  assert list(curve) == [('default', 'gt'), ('default', 'proposals')]  # no resnet4 row
  for crops in ('gt', 'proposals'):
    for step in (50, 100):
      values = [100 * (seen[(crops, seed)] + step / 1000) for seed in (0, 1)]
      assert curve[('default', crops)][f'step {step}'] == (
          f'{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}')
  # The last column is the main table's value.
  assert curve[('default', 'gt')]['step 100'] == (
      _table_rows(markdown)[('default', 'gt')]['seen mask AP (%)'])
  gt_curve = _table_rows(markdown, '### seen mask AP (GT boxes) (%)')
  # By hand: seeds 0 and 1 give 0.10 + 0.05 + 0.1 and 0.12 + 0.05 + 0.1.
  assert gt_curve[('default', 'proposals')]['step 50'] == '26.0 ± 1.4'

  assert '### box AP (%)' in markdown


def test_report_without_finished_cells(config_path, tmp_path):
  sweep = _load(config_path, tmp_path)
  report = sweep_report.write_report(sweep.sweep_dir, sweep.full_grid, sweep.all_cells)
  markdown = open(report['markdown']).read()
  assert '0 of 8 cells finished' in markdown and 'No cell has finished yet' in markdown
  assert report['png'] is None and not os.path.exists(os.path.join(sweep.sweep_dir, 'report.png'))


# The CLI.


def _cli(*args):
  return subprocess.run([sys.executable, str(REPO / 'sweep.py'), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=60, check=False)


def test_cli_print_commands_and_report_only(config_path, tmp_path):
  sweep_dir = tmp_path / 'sweep'
  sweep = _load(config_path, tmp_path)
  _finish(sweep, sweep.cells[0], _eval_json(0.1, 0.2, 0.3))
  result = _cli(f'--config={config_path}', f'--sweep_dir={sweep_dir}', '--only=seed=0',
                '--print_commands')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == f'# finished: {DEFAULT_NAMES[0]}' and len(lines) == 4
  argv = shlex.split(lines[1])
  assert argv[1] == str(REPO / 'run.py') and argv[3] == f'--workdir={sweep_dir}/{DEFAULT_NAMES[2]}'
  assert argv[4:] == ['--config.model.mask_head.type=default',
                      '--config.model.mask_head.train_crops=proposals', '--config.seed=0']
  written = json.loads((sweep_dir / 'sweep.json').read_text())
  assert written['grid']['seed'] == [0] and written['cells'] == DEFAULT_NAMES[0::2]
  assert written['config'] == config_path and written['config_arg'] is None

  result = _cli(f'--config={config_path}', f'--sweep_dir={sweep_dir}', '--report_only')
  assert result.returncode == 0, result.stderr
  assert '1 of 8 cells finished' in result.stdout
  assert '1 of 8 cells finished; missing:' in (sweep_dir / 'report.md').read_text()
  assert (sweep_dir / 'report.png').stat().st_size > 0
  assert not (sweep_dir / DEFAULT_NAMES[1]).exists()  # nothing ran


def test_cli_default_sweep_dir_is_the_ignored_sweeps_folder(config_path):
  """Without --sweep_dir, cells go to REPO/sweeps/<config stem>[_<arg>], which git ignores."""
  sweep_dir = REPO / 'sweeps' / pathlib.Path(config_path).stem
  assert not sweep_dir.exists()
  try:
    result = _cli(f'--config={config_path}', '--print_commands')
    assert result.returncode == 0, result.stderr
    workdirs = [a for line in result.stdout.splitlines() for a in shlex.split(line)
                if a.startswith('--workdir=')]
    assert workdirs and all(w.startswith(f'--workdir={sweep_dir}/') for w in workdirs)
    ignored = subprocess.run(['git', 'check-ignore', '-q', str(sweep_dir / 'sweep.json')],
                             cwd=REPO, check=False)
    assert ignored.returncode == 0, f'{sweep_dir} is not git-ignored'
  finally:
    shutil.rmtree(sweep_dir, ignore_errors=True)


def test_cli_bad_only_fails_with_one_line(config_path, tmp_path):
  result = _cli(f'--config={config_path}', f'--sweep_dir={tmp_path / "sweep"}',
                '--only=type=hourglass99', '--print_commands')
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.startswith("FATAL: --only='type=hourglass99': ['hourglass99'] not among")
  assert "allowed: ['default', 'resnet4']" in result.stderr


@pytest.mark.parametrize('parallel,message', [
    ('0', 'FATAL: --parallel=0: must be an integer >= 1'),
    ('10000', 'FATAL: --parallel=10000: more cells at a time than the'),
])
def test_cli_rejects_bad_parallel(config_path, tmp_path, parallel, message):
  if parallel != '0' and not PINNING:
    pytest.skip('without pinning, any --parallel >= 1 is allowed')
  # --print_commands: even if the check broke, nothing would train.
  result = _cli(f'--config={config_path}', f'--sweep_dir={tmp_path / "sweep"}',
                f'--parallel={parallel}', '--print_commands')
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.startswith(message), result.stderr
  assert not (tmp_path / 'sweep').exists()


def test_sweep_modules_do_not_import_jax():
  code = ('import sys; sys.argv = ["sweep.py"]; import importlib.util as u; '
          's = u.spec_from_file_location("cli", "sweep.py"); m = u.module_from_spec(s); '
          's.loader.exec_module(m); import deepmarc_jax.sweeps.report; '
          'print(sorted(k for k in ("jax", "tensorflow", "flax") if k in sys.modules))')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True)
  assert result.stdout.strip() == '[]'


@pytest.mark.parametrize('arg', [None, 'quick', 'jitter', 'width'])
def test_the_mask_head_sweep_cells_are_valid_configs(tmp_path, arg):
  """experiments/mask_head_sweep.py: every cell's resolved config passes validation (e.g. the
  six-stage hourglass52 gets crops it can halve five times) and scores masks from GT boxes."""
  from deepmarc_jax import config_lib  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.models import catalogue  # pylint: disable=g-import-not-at-top
  path = str(REPO / 'experiments' / 'mask_head_sweep.py')
  flag = path if arg is None else f'{path}:{arg}'
  sweep = sweep_grid.load(flag, str(tmp_path))
  module = sweep_grid.load_module(path)
  assert len(sweep.all_cells) == {None: 20, 'quick': 2, 'jitter': 4, 'width': 4}[arg]
  for cell in sweep.all_cells:
    config = sweep_grid.apply_overrides(module.get_config(arg), cell.overrides)
    config_lib.validate(config)
    assert config.eval.gt_box_masks and cell.total_steps == config.train.total_steps
    # The jitter cells are the full grid's GT-crop cells with jittered boxes.
    assert config.model.mask_head.gt_box_jitter == (0.5 if arg == 'jitter' else 0.0)
    # The BatchNorm floor acts on hourglass52 alone: every other head's smallest level holds at
    # least that many values per channel for a single instance.
    head = catalogue.MASK_HEADS[config.model.mask_head.type]
    stages = len(head.blocks_per_stage) if isinstance(head, catalogue.HourglassSpec) else 1
    smallest = (config.model.mask_head.crop_size // 2 ** (stages - 1)) ** 2
    floor = config.model.mask_head.bn_min_count
    assert (smallest < floor) == (config.model.mask_head.type == 'hourglass52'), (smallest, floor)
  # The diagnostic differs from the full grid's cells in one setting.
  if arg in ('jitter', 'width'):
    full = module.get_config()
    if arg == 'jitter':
      full.model.mask_head.gt_box_jitter = 0.5
    else:  # the grid's default head with GT crops; its width is the sweep's axis
      full.model.mask_head.update(type='default', train_crops='gt')
    assert module.get_config(arg).to_dict() == full.to_dict()


def test_the_mask_head_sweep_variants_exclude_each_other():
  module = sweep_grid.load_module(str(REPO / 'experiments' / 'mask_head_sweep.py'))
  with pytest.raises(ValueError, match='at most one of quick, jitter, width'):
    module.get_config('quick,jitter')


# SLURM job arrays (sweep.py --slurm_script).

# pylint: disable-next=g-import-not-at-top
from deepmarc_jax.sweeps import slurm as sweep_slurm  # noqa: E402

_ENTRY = re.compile(r'^  (\d+)\) cell=(\S+) final=(\S+)\n     cmd=\((.*)\) ;;$', re.M)


def _entries(text):
  """{array index: (cell, final eval file, command line)} of a job-array script's case."""
  return {int(i): (cell, final, line) for i, cell, final, line in _ENTRY.findall(text)}


def _sbatch_lines(text):
  return [line[len('#SBATCH '):] for line in text.splitlines() if line.startswith('#SBATCH ')]


@pytest.mark.parametrize('texts,options', [
    (['--gres=gpu:1 --time=24:00:00 --cpus-per-task=8'],
     ['--gres=gpu:1', '--time=24:00:00', '--cpus-per-task=8']),
    (['-p gpu', '--time 1:00:00 --exclusive', '-Jname'],
     ['-p gpu', '--time 1:00:00', '--exclusive', '-Jname']),
    (['--signal=B:TERM@300', "--comment='one_word'"],
     ['--signal=B:TERM@300', '--comment=one_word']),
    ([], []),
])
def test_sbatch_options_one_line_each(texts, options):
  assert sweep_slurm.parse_sbatch_options(texts) == options


@pytest.mark.parametrize('text,message', [
    ('gpu:1', r"'gpu:1' is not an sbatch option"),
    ('--time=1:00:00 2:00:00', r"'2:00:00' is not an sbatch option"),
    ('-p gpu cpu', r"'cpu' is not an sbatch option"),
    ('--array=0-3', r'sets --array itself: .*--slurm_max_parallel.*sbatch --array'),
    ('-a 0-3', r'sets -a itself'),
    ('--output=x.out', r'sets --output itself: .*SWEEP_DIR/slurm/%A_%a.out'),
    ('-ox.out', r'sets -o itself'),
    ('--comment="two words"', r"holds whitespace"),
    ("--time='1:00", r'No closing quotation'),
])
def test_sbatch_options_errors(text, message):
  with pytest.raises(ValueError, match=message):
    sweep_slurm.parse_sbatch_options([text])


def test_index_ranges():
  assert sweep_slurm.index_ranges([6, 0, 1, 2, 3, 9, 10]) == '0-3,6,9-10'
  assert sweep_slurm.index_ranges([4]) == '4'


def test_slurm_script_holds_one_entry_per_cell(config_path, tmp_path):
  """The script of --only=seed=0 (4 of 8 cells, one finished): each cell's index is its place in
  the whole grid, its entry the command --print_commands prints; the finished one is left out of
  --array but kept (and skipped at run time)."""
  sweep = _load(config_path, tmp_path, only=['seed=0'])
  _finish(sweep, sweep.cells[1])
  options = sweep_slurm.parse_sbatch_options(['--gres=gpu:1 --time=24:00:00', '-p gpu'])
  path = tmp_path / 'array.sh'
  script = sweep_slurm.write_script(sweep, str(path), options, max_parallel=2,
                                    cache_dir=str(tmp_path / 'sweep' / 'jax_cache'))
  text = path.read_text()
  assert os.access(path, os.X_OK) and text.startswith('#!/bin/bash\n')
  assert script.array == '0,4,6%2' and script.finished == [DEFAULT_NAMES[2]]
  assert script.indices == {DEFAULT_NAMES[i]: i for i in (0, 2, 4, 6)}
  assert _sbatch_lines(text) == [
      '--job-name=sweep', '--array=0,4,6%2', f'--output={tmp_path}/sweep/slurm/%A_%a.out',
      '--gres=gpu:1', '--time=24:00:00', '-p gpu']
  assert (tmp_path / 'sweep' / 'slurm').is_dir()  # sbatch does not create --output's folder
  # sbatch reads #SBATCH lines up to the first command only.
  first_command = next(i for i, line in enumerate(text.splitlines()[1:], 1)
                       if line and not line.startswith('#'))
  assert all(line.startswith('#') for line in text.splitlines()[:first_command])
  assert len(_sbatch_lines('\n'.join(text.splitlines()[:first_command]))) == 6
  entries = _entries(text)
  assert sorted(entries) == [0, 2, 4, 6]
  printed = sweep_grid.command_lines(sweep)
  for k, cell in enumerate(sweep.cells):
    name, final, line = entries[script.indices[cell.name]]
    assert (name, final) == (cell.name, 'eval_100.json')
    assert line == sweep_grid.command_line(sweep, cell)
    assert printed[k] == (f'# finished: {cell.name}' if k == 1 else line)
  assert 'export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$cache_dir}"' in text
  assert f'cache_dir={tmp_path}/sweep/jax_cache\n' in text
  assert f'cd {REPO}\n' in text
  # Without a cache, a job name or a limit.
  text, _ = sweep_slurm.script_text(sweep, str(path), ['-Jmine'])
  assert _sbatch_lines(text) == ['--array=0,4,6', f'--output={tmp_path}/sweep/slurm/%A_%a.out',
                                 '-Jmine']
  assert 'JAX_COMPILATION_CACHE_DIR' not in text


@pytest.mark.parametrize('max_parallel,message', [(-1, 'must be an integer >= 0'),
                                                   (1.5, 'must be an integer >= 0')])
def test_slurm_script_rejects_bad_max_parallel(config_path, tmp_path, max_parallel, message):
  with pytest.raises(ValueError, match=message):
    sweep_slurm.script_text(_load(config_path, tmp_path), str(tmp_path / 'a.sh'),
                            max_parallel=max_parallel)


def test_slurm_script_needs_an_unfinished_cell_and_a_plain_sweep_dir(config_path, tmp_path):
  sweep = _load(config_path, tmp_path, only=['type=default', 'train_crops=gt', 'seed=0'])
  _finish(sweep, sweep.cells[0])
  with pytest.raises(ValueError, match='all 1 cells are finished; nothing to submit'):
    sweep_slurm.script_text(sweep, str(tmp_path / 'a.sh'))
  odd = sweep_grid.load(config_path, str(tmp_path / '50%'))
  with pytest.raises(ValueError, match="--output line cannot hold .*'%'"):
    sweep_slurm.script_text(odd, str(tmp_path / 'a.sh'))


def _fake_array(config_path, tmp_path, run_py_text=FAKE_RUN_PY):
  """A job-array script of the fake sweep whose cells run a stand-in for run.py."""
  sweep = _load(config_path, tmp_path)
  fake_run_py = tmp_path / 'fake_run.py'
  fake_run_py.write_text(run_py_text)
  text, _ = sweep_slurm.script_text(sweep, str(tmp_path / 'array.sh'),
                                    cache_dir=str(tmp_path / 'sweep' / 'jax_cache'),
                                    run_py=str(fake_run_py))
  (tmp_path / 'array.sh').write_text(text)
  return sweep


def _task(tmp_path, index, extra_environ=None, **popen):
  environ = {k: v for k, v in os.environ.items()
             if not k.startswith('SLURM_') and k != sweep_runner.CACHE_ENV}
  if index is not None:
    environ['SLURM_ARRAY_TASK_ID'] = str(index)
  environ.update(extra_environ or {})
  return subprocess.Popen(['bash', str(tmp_path / 'array.sh')], env=environ, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _run_task(tmp_path, index, extra_environ=None):
  process = _task(tmp_path, index, extra_environ)
  stdout, stderr = process.communicate(timeout=60)
  return process.returncode, stdout, stderr


def test_slurm_task_runs_its_cell_records_it_and_skips_it_once_finished(config_path, tmp_path):
  sweep = _fake_array(config_path, tmp_path)
  cell = sweep.all_cells[1]
  workdir = pathlib.Path(cell.workdir(sweep.sweep_dir))
  returncode, stdout, stderr = _run_task(tmp_path, 1)
  assert returncode == 0, stderr
  assert f'cell 1 ({cell.name}) finished: {workdir}/eval_100.json' in stdout
  log = (workdir / 'log.txt').read_text()
  assert re.search(r'=== \S+ slurm job none: \S+python\S* \S+fake_run.py --config=', log)
  assert 'fake run.py' in log and f'--workdir={workdir}' in log
  record = sweep_grid.read_cell_record(str(workdir))
  assert record['returncode'] == 0 and record['attempts'] == 1
  assert record['overrides'] == cell.overrides
  assert record['command'] == sweep_grid.command(sweep, cell)
  # Submitted again: the finished cell exits at once, running nothing.
  returncode, stdout, _ = _run_task(tmp_path, 1)
  assert returncode == 0 and 'is finished' in stdout and 'nothing to run' in stdout
  assert (workdir / 'log.txt').read_text() == log
  assert sweep_grid.read_cell_record(str(workdir))['attempts'] == 1


def test_slurm_task_of_a_failing_cell_fails_with_its_status(config_path, tmp_path):
  sweep = _fake_array(config_path, tmp_path)
  cell = sweep.all_cells[4]  # resnet4: the fake run.py exits 3
  returncode, _, stderr = _run_task(tmp_path, 4)
  assert returncode == 3
  assert f'cell 4 ({cell.name}) FAILED: run.py exit status 3 and no eval_100.json' in stderr
  assert sweep_grid.read_cell_record(cell.workdir(sweep.sweep_dir))['returncode'] == 3


@pytest.mark.parametrize('index,message', [
    (None, 'FATAL: SLURM_ARRAY_TASK_ID is not set: submit this script with `sbatch '),
    (8, "FATAL: SLURM_ARRAY_TASK_ID=8 is not the index of a cell of this script; its cells' "
        'indices: 0-7'),
    ('01', 'FATAL: SLURM_ARRAY_TASK_ID=01 is not the index'),
])
def test_slurm_task_without_a_cell_index_fails_with_one_line(config_path, tmp_path, index,
                                                             message):
  _fake_array(config_path, tmp_path)
  returncode, stdout, stderr = _run_task(tmp_path, index)
  assert returncode == 2 and stdout == '' and stderr.startswith(message)
  assert len(stderr.splitlines()) == 1
  assert not (tmp_path / 'sweep' / DEFAULT_NAMES[0]).exists()


# Writes the environment it sees and the final eval.
ENVIRON_RUN_PY = textwrap.dedent('''\
    import json, os, sys
    workdir = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--workdir='))
    with open(os.path.join(workdir, 'environ.json'), 'w') as f:
      json.dump(dict(os.environ), f)
    open(os.path.join(workdir, 'eval_100.json'), 'w').write('{}')
''')


@pytest.mark.parametrize('ntasks', [None, '1', '2'])
def test_slurm_task_runs_one_process_or_srun(config_path, tmp_path, ntasks):
  """One task: run.py directly, without SLURM_NTASKS (no JAX coordinator for one process) and
  with the sweep's compilation cache; more tasks: under srun, one run.py per task."""
  sweep = _fake_array(config_path, tmp_path, ENVIRON_RUN_PY)
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  srun = bin_dir / 'srun'  # a stand-in: notes that it ran, then runs its command once
  srun.write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/srun_ran\nexec "$@"\n')
  srun.chmod(0o755)
  extra = {'PATH': f'{bin_dir}:{os.environ["PATH"]}'}
  if ntasks:
    extra['SLURM_NTASKS'] = ntasks
  returncode, _, stderr = _run_task(tmp_path, 3, extra)
  assert returncode == 0, stderr
  seen = json.loads((pathlib.Path(sweep.all_cells[3].workdir(sweep.sweep_dir))
                     / 'environ.json').read_text())
  assert seen.get('SLURM_NTASKS') == ('2' if ntasks == '2' else None)
  assert (tmp_path / 'srun_ran').exists() == (ntasks == '2')
  assert seen['SLURM_ARRAY_TASK_ID'] == '3'
  assert seen[sweep_runner.CACHE_ENV] == f'{tmp_path}/sweep/jax_cache'
  # The environment's cache wins.
  returncode, _, stderr = _run_task(tmp_path, 5, {sweep_runner.CACHE_ENV: str(tmp_path / 'c')})
  assert returncode == 0, stderr
  seen = json.loads((pathlib.Path(sweep.all_cells[5].workdir(sweep.sweep_dir))
                     / 'environ.json').read_text())
  assert seen[sweep_runner.CACHE_ENV] == str(tmp_path / 'c')


# Stands for run.py under a SIGTERM: checkpoints and exits 0 without the final eval.
WAIT_FOR_SIGTERM_RUN_PY = textwrap.dedent('''\
    import os, signal, sys, time
    workdir = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--workdir='))
    def on_term(signum, frame):
      open(os.path.join(workdir, 'got_sigterm'), 'w').close()
      sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    open(os.path.join(workdir, 'started'), 'w').close()
    time.sleep(60)
''')


def test_slurm_task_passes_a_sigterm_to_run_py(config_path, tmp_path):
  """sbatch --signal=B:TERM@... signals the batch shell alone: the script passes it on."""
  sweep = _fake_array(config_path, tmp_path, WAIT_FOR_SIGTERM_RUN_PY)
  workdir = pathlib.Path(sweep.all_cells[0].workdir(sweep.sweep_dir))
  process = _task(tmp_path, 0)
  deadline = time.monotonic() + 30
  while not (workdir / 'started').exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert (workdir / 'started').exists()
  process.send_signal(signal.SIGTERM)  # the script's shell only
  _, stderr = process.communicate(timeout=30)
  assert (workdir / 'got_sigterm').exists()
  assert process.returncode == 1  # run.py exited 0 without its final eval: not finished
  assert 'FAILED: run.py exit status 0 and no eval_100.json' in stderr
  assert 'submit it again to resume' in stderr
  assert sweep_grid.read_cell_record(str(workdir))['returncode'] == 0


def test_cli_slurm_script(config_path, tmp_path):
  sweep_dir, path = tmp_path / 'sweep', tmp_path / 'jobs' / 'array.sh'
  sweep = _load(config_path, tmp_path)
  _finish(sweep, sweep.cells[0])
  args = [f'--config={config_path}', f'--sweep_dir={sweep_dir}', '--only=type=resnet4,default']
  result = _cli(*args, f'--slurm_script={path}', '--slurm_sbatch=--gres=gpu:1 --time=24:00:00',
                '--slurm_sbatch=-p gpu', '--slurm_max_parallel=3')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == (f'wrote {path}: a SLURM job array of 8 cell(s), --array=1-7%3; 1 finished '
                      'cell(s) left out of --array')
  assert lines[1].startswith(f'submit: sbatch {path}')
  assert shlex.split(lines[2].split(': ', 1)[1]) == [
      sys.executable, str(REPO / 'sweep.py'), f'--config={config_path}',
      f'--sweep_dir={sweep_dir}', '--report_only']
  text = path.read_text()
  assert _sbatch_lines(text)[1:] == ['--array=1-7%3', f'--output={sweep_dir}/slurm/%A_%a.out',
                                     '--gres=gpu:1', '--time=24:00:00', '-p gpu']
  assert f'cache_dir={sweep_dir}/jax_cache\n' in text
  # The entries hold what --print_commands prints for the unfinished cells.
  printed = _cli(*args, '--print_commands')
  assert printed.returncode == 0, printed.stderr
  entries = _entries(text)
  assert [entries[i][2] for i in range(1, 8)] == printed.stdout.splitlines()[1:]
  assert entries[0][0] == DEFAULT_NAMES[0]
  # --only narrows the script too; the indices stay the grid's.
  result = _cli(f'--config={config_path}', f'--sweep_dir={sweep_dir}', '--only=seed=1',
                f'--slurm_script={path}', '--compilation_cache=')
  assert result.returncode == 0, result.stderr
  assert sorted(_entries(path.read_text())) == [1, 3, 5, 7]
  assert '--array=1,3,5,7\n' in path.read_text() and 'cache_dir' not in path.read_text()


def test_cli_slurm_script_when_all_cells_are_finished(config_path, tmp_path):
  sweep = _load(config_path, tmp_path, only=['seed=0', 'type=default', 'train_crops=gt'])
  _finish(sweep, sweep.cells[0])
  result = _cli(f'--config={config_path}', f'--sweep_dir={tmp_path / "sweep"}', '--only=seed=0',
                '--only=type=default', '--only=train_crops=gt',
                f'--slurm_script={tmp_path / "a.sh"}')
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('all 1 cell(s) are finished: nothing to submit, no script '
                                  'written; report: ')
  assert not (tmp_path / 'a.sh').exists()


@pytest.mark.parametrize('args,message', [
    (['--slurm_sbatch=--gres=gpu:1'], '--slurm_sbatch needs --slurm_script=PATH'),
    (['--slurm_max_parallel=2'], '--slurm_max_parallel needs --slurm_script=PATH'),
    (['--slurm_script=S', '--print_commands'],
     '--print_commands and --slurm_script exclude each other; give one'),
    (['--slurm_script=S', '--report_only'],
     '--slurm_script and --report_only exclude each other; give one'),
    (['--slurm_script='], '--slurm_script: give the path of the script to write'),
    (['--slurm_script=S', '--slurm_sbatch=gpu:1'], "'gpu:1' is not an sbatch option"),
    (['--slurm_script=S', '--slurm_sbatch=--array=0-3'], 'the script sets --array itself'),
    (['--slurm_script=S', '--slurm_max_parallel=-1'], '--slurm_max_parallel=-1: must be >= 0'),
])
def test_cli_rejects_bad_slurm_flags(config_path, tmp_path, args, message):
  args = [a.replace('=S', f'={tmp_path / "a.sh"}') if a == '--slurm_script=S' else a
          for a in args]
  result = _cli(f'--config={config_path}', f'--sweep_dir={tmp_path / "sweep"}', *args)
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.startswith('FATAL: ') and message in result.stderr, result.stderr
  assert len(result.stderr.splitlines()) == 1
  assert not (tmp_path / 'a.sh').exists() and not (tmp_path / 'sweep').exists()


# Two cells of the Deep-MARC `demo,tiny` (6 steps, then the final eval), differing in the seed.
TINY_SWEEP = textwrap.dedent('''\
    """Two cells of deepmarc_spinenet.py:demo,tiny, seeds 0 and 1."""
    import importlib.util

    _SPEC = importlib.util.spec_from_file_location('deepmarc_spinenet', {experiment!r})
    _MODULE = importlib.util.module_from_spec(_SPEC)
    _SPEC.loader.exec_module(_MODULE)


    def get_config(arg=None):
      config = _MODULE.get_config('demo,tiny')
      config.data.data_dir = {data_dir!r}
      return config


    def get_sweep(arg=None):
      return {{'seed': [0, 1]}}
''')


@pytest.mark.slow
def test_slurm_array_tasks_train_two_cells_then_the_report_has_both(tmp_path):
  """The job-array script's task body, run here with SLURM_ARRAY_TASK_ID set, trains each cell
  of a real two-cell grid to its final eval (sharing the compilation cache), and
  `sweep.py --report_only` reports both."""
  config = tmp_path / 'tiny_sweep.py'
  config.write_text(TINY_SWEEP.format(
      experiment=str(REPO / 'experiments' / 'deepmarc_spinenet.py'),
      data_dir=str(tmp_path / 'tfds')))
  sweep_dir, path = tmp_path / 'sweep', tmp_path / 'array.sh'
  args = [f'--config={config}', f'--sweep_dir={sweep_dir}']
  result = _cli(*args, f'--slurm_script={path}')
  assert result.returncode == 0, result.stderr
  assert '--array=0-1\n' in path.read_text()
  printed = _cli(*args, '--print_commands')
  entries = _entries(path.read_text())
  assert [entries[i][2] for i in (0, 1)] == printed.stdout.splitlines()
  environ = {k: v for k, v in os.environ.items()
             if not k.startswith('SLURM_') and k != sweep_runner.CACHE_ENV}
  environ.update(TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  sweep = sweep_grid.load(str(config), str(sweep_dir))
  for index, cell in enumerate(sweep.all_cells):
    task = subprocess.run(['bash', str(path)], env=dict(environ, SLURM_ARRAY_TASK_ID=str(index)),
                          capture_output=True, text=True, timeout=1200, check=False)
    log = pathlib.Path(cell.workdir(sweep.sweep_dir)) / 'log.txt'
    assert task.returncode == 0, (task.stderr, log.read_text()[-3000:] if log.exists() else '')
    assert cell.finished(sweep.sweep_dir) and cell.total_steps == 6
    results = json.loads(pathlib.Path(cell.eval_path(sweep.sweep_dir)).read_text())
    assert 'segm' in results and 'bbox' in results
    record = sweep_grid.read_cell_record(cell.workdir(sweep.sweep_dir))
    assert record['returncode'] == 0 and record['attempts'] == 1
  assert any((sweep_dir / 'jax_cache').iterdir())  # the tasks' shared compilation cache
  report = _cli(*args, '--report_only')
  assert report.returncode == 0, report.stderr
  assert '2 of 2 cells finished' in report.stdout
  markdown = (sweep_dir / 'report.md').read_text()
  assert '2 of 2 cells finished.' in markdown
