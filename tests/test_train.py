"""The trainer: sharding, resume after a kill, non-finite losses, and the end-to-end run."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_train_step_on_8_devices_matches_1_device():
  result = subprocess.run([sys.executable, '-m', 'tests.sharding_check'], capture_output=True,
                          text=True, cwd=REPO, timeout=900,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out['devices'] == [1, 8] and out['same_init']
  loss1, loss8 = out['loss']
  assert abs(loss1 - loss8) <= 1e-5 * abs(loss1)
  for name, (a, b) in out['parts'].items():
    if name != 'grad_norm':  # a function of the update, checked below
      assert abs(a - b) <= 1e-4 * max(abs(a), 1e-3), name
  # Within the step's own float-noise scale (a 1e-6 parameter perturbation on one device).
  assert out['update_rel_diff'] <= 2 * out['noise_update_rel_diff'] + 1e-4


def _run(workdir, data_dir, *overrides, program=('run.py',), **environ):
  """run.py (or `program=('-m', 'tests.kill_inside_save')`, run.py killed inside a save) on
  the `demo,tiny` config."""
  program = [str(REPO / p) if p.endswith('.py') else p for p in program]
  return subprocess.Popen(
      [sys.executable, *program,
       f'--config={REPO / "experiments" / "deepmarc_spinenet.py"}:demo,tiny',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *overrides],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='', **environ))


def _losses(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return {m['step']: m['loss'] for m in map(json.loads, lines)}


@pytest.fixture(scope='module')
def shapes_data_dir(tmp_path_factory):
  from deepmarc_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.config()
  config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  pipeline.get_builder(config.data)
  return config.data.data_dir


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache, shared by this module's run.py processes: the train
  step (the same in all of them) compiles once."""
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, shapes_data_dir, compilation_cache):
  """{step: loss} of 6 uninterrupted steps of `demo,tiny`, which also scores masks from the GT
  boxes (the real segment_boxes path)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  full = _run(workdir, shapes_data_dir, '--config.eval.gt_box_masks=True',
              JAX_COMPILATION_CACHE_DIR=str(compilation_cache))
  out, _ = full.communicate(timeout=900)
  assert full.returncode == 0, out[-3000:]
  losses = _losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  assert 'segm@GT' in out
  from_gt = json.loads((workdir / 'eval_6.json').read_text())['segm_gt_boxes']
  assert 0.0 <= from_gt['AP'] <= 1.0 and set(from_gt) >= {'seen', 'unseen', 'per_category'}
  return losses


@pytest.mark.slow
def test_sigterm_then_resume_continues_exactly(tmp_path, shapes_data_dir, uninterrupted,
                                               compilation_cache):
  """Uninterrupted 6 steps vs SIGTERM mid-run + resume: identical losses after the restart."""
  reference = uninterrupted
  # The interrupted run and its resumption share JAX's persistent compilation cache: the resumed
  # process loads the train step compiled before, and must still continue exactly.
  cache = compilation_cache
  work = tmp_path / 'killed'
  killed = _run(work, shapes_data_dir, JAX_COMPILATION_CACHE_DIR=str(cache))
  deadline = time.time() + 600
  while time.time() < deadline and killed.poll() is None:
    if (work / 'metrics.jsonl').exists() and len(_losses(work)) >= 2:
      killed.send_signal(signal.SIGTERM)
      break
    time.sleep(0.2)
  out, _ = killed.communicate(timeout=600)
  assert killed.returncode == 0, out[-3000:]
  stopped_at = max(_losses(work))
  assert stopped_at < 6, 'the run finished before SIGTERM arrived'
  assert (work / 'checkpoints' / str(stopped_at)).exists()

  assert len(list(cache.glob('jit_train_step-*'))) == 1, sorted(p.name for p in cache.glob('*'))

  # JAX logs its cache hits at debug level, shown for the module named here.
  resumed = _run(work, shapes_data_dir, JAX_COMPILATION_CACHE_DIR=str(cache),
                 JAX_DEBUG_LOG_MODULES='jax._src.compiler')
  out, _ = resumed.communicate(timeout=900)
  assert resumed.returncode == 0, out[-3000:]
  assert f'resumed from step {stopped_at}' in out
  assert "Persistent compilation cache hit for 'jit_train_step'" in out, out[-3000:]
  after = _losses(work)
  for step in range(stopped_at + 1, 7):
    np.testing.assert_allclose(after[step], reference[step], rtol=1e-6)


def _wait_for(process, condition, what, timeout=600):
  deadline = time.time() + timeout
  while not condition():
    if process.poll() is not None:
      out, _ = process.communicate()
      raise AssertionError(f'the run ended before {what}:\n{out[-3000:]}')
    if time.time() > deadline:
      raise AssertionError(f'no {what} in {timeout} s')
    time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_at_any_moment_resumes_from_the_last_complete_checkpoint(
    tmp_path, shapes_data_dir, uninterrupted, compilation_cache):
  """SIGKILL (no handler runs) between steps, then inside a save just after its temporary
  folder appears, then inside a save with every array written but not committed: each next
  run.py resumes from the last complete checkpoint (every 2 steps), losing at most 2 steps,
  and gives the uninterrupted run's losses. Meanwhile a second run.py on the same workdir is
  turned away, naming the workdir and the running process, and the killed runs' locks block
  nothing."""
  cache = dict(JAX_COMPILATION_CACHE_DIR=str(compilation_cache))
  reference = uninterrupted

  work = tmp_path / 'killed'
  checkpoints = work / 'checkpoints'
  kept = lambda: sorted(int(p.name) for p in checkpoints.glob('[0-9]*') if p.name.isdigit())  # noqa: E731

  def check_losses(resumed_at, upto):
    steps = [json.loads(line)['step'] for line in
             (work / 'metrics.jsonl').read_text().splitlines()]
    assert steps == list(range(1, upto + 1)), steps  # cut back on resume: each step once
    losses = _losses(work)
    for step in range(resumed_at + 1, upto + 1):
      np.testing.assert_allclose(losses[step], reference[step], rtol=1e-6, err_msg=str(step))

  # 1. Between steps: after step 3, the checkpoint of step 2 written.
  first = _run(work, shapes_data_dir, program=('-m', 'tests.kill_inside_save'),
               HANG_AFTER_STEP='3', **cache)
  _wait_for(first, lambda: (work / 'metrics.jsonl').exists() and max(_losses(work)) == 3
            and kept()[-1:] == [2], 'step 3 after checkpoint 2')
  second = _run(work, shapes_data_dir, **cache)
  out, _ = second.communicate(timeout=600)
  assert second.returncode == 2, out[-3000:]
  assert f'{work} is in use by process {first.pid} on ' in out, out[-3000:]
  first.kill()
  first.wait()

  # 2. Inside the save of step 4, its temporary folder just created; 3. inside the save of
  # step 6, every array written, the rename not done.
  for step, moment in ((4, 'start'), (6, 'commit')):
    resumed_from = kept()[-1]
    killed = _run(work, shapes_data_dir, program=('-m', 'tests.kill_inside_save'),
                  KILL_INSIDE_SAVE_OF_STEP=str(step), KILL_AT=moment, **cache)
    out, _ = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, out[-3000:]
    assert f'resumed from step {resumed_from}' in out
    check_losses(resumed_from, step)
    assert step not in kept() and any(checkpoints.glob(f'{step}.orbax-checkpoint-tmp*'))

  # The last run finishes from step 4 and cleans the unfinished folder up.
  resumed_from = kept()[-1]
  assert resumed_from == 4
  last = _run(work, shapes_data_dir, **cache)
  out, _ = last.communicate(timeout=900)
  assert last.returncode == 0, out[-3000:]
  assert 'resumed from step 4' in out
  check_losses(4, 6)
  assert 6 in kept() and not list(checkpoints.glob('*tmp*'))
  assert (work / 'eval_6.json').exists()


@pytest.mark.slow
def test_a_workdir_of_another_config_is_refused_and_keeps_its_config(
    tmp_path, tiny_workdir, shapes_data_dir, compilation_cache):
  """run.py with a config whose train state does not fit the workdir's checkpoints stops before
  training, naming the checkpoint folder, the arrays and the config fields that changed, and
  puts back the config.json the checkpoints were written with."""
  import shutil  # pylint: disable=g-import-not-at-top
  work = tmp_path / 'work'
  shutil.copytree(tiny_workdir, work)
  original = (work / 'config.json').read_text()
  run = _run(work, shapes_data_dir, '--config.model.mask_head.num_filters=8',
             JAX_COMPILATION_CACHE_DIR=str(compilation_cache))
  out, _ = run.communicate(timeout=900)
  assert run.returncode == 2, out[-3000:]
  assert f'FATAL: {work / "checkpoints" / "1"} holds a train state of another config' in out
  assert ('params.mask_head.convnet.conv_input_conv_block.Conv_0.kernel (3, 3, 32, 16) float32 '
          'in the checkpoint, (3, 3, 32, 8) float32 in this config') in out, out[-3000:]
  assert 'model.mask_head.num_filters: 16 -> 8' in out
  assert (work / 'config.json').read_text() == original
  assert sorted(p.name for p in (work / 'checkpoints').iterdir()) == ['1']


@pytest.mark.slow
def test_sigterm_at_an_evaluation_step_evaluates_that_step_on_resume(tmp_path, shapes_data_dir,
                                                                      monkeypatch):
  """SIGTERM at step 2 of 4 (eval every 2): the run checkpoints step 2 and stops before
  evaluating it; the resumed run evaluates step 2 before training on (eval_2.json was missing
  from a grid cell resumed this way)."""
  import threading  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  from deepmarc_jax import train  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.evaluation import loop as eval_loop  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  # The trainer's SIGTERM handler (what makes the kill below safe) needs the main thread.
  assert threading.current_thread() is threading.main_thread()
  config = tiny.config()
  config.data.data_dir = shapes_data_dir
  config.train.update(total_steps=4, checkpoint_every_steps=2)
  config.eval.every_steps = 2

  class SigtermAtStep2(periodic_actions.ReportProgress):
    def __call__(self, step, t=None):
      if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      return super().__call__(step, t)

  monkeypatch.setattr(periodic_actions, 'ReportProgress', SigtermAtStep2)
  assert train.train_and_evaluate(config, str(tmp_path)) == {}  # stopped by SIGTERM
  assert (tmp_path / 'checkpoints' / '2').exists()
  assert not (tmp_path / 'eval_2.json').exists()
  monkeypatch.undo()
  results = train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / 'eval_2.json').exists() and (tmp_path / 'eval_4.json').exists()
  assert json.loads((tmp_path / 'eval_4.json').read_text())['segm']['AP'] == results['segm']['AP']
  assert sorted(_losses(tmp_path)) == [1, 2, 3, 4]
  # `run.py --mode=eval --step=2` scores that kept checkpoint again, to the same figures.
  resumed_eval = json.loads((tmp_path / 'eval_2.json').read_text())
  again = eval_loop.evaluate_checkpoint(config, str(tmp_path), step=2)
  for iou in ('bbox', 'segm'):  # NaN where a 2-step model detects nothing: equal as NaN
    np.testing.assert_equal(again[iou]['AP'], resumed_eval[iou]['AP'])
  with pytest.raises(FileNotFoundError, match=r'no checkpoint of step 3 .* keeps steps \[.*2, 4\]'):
    eval_loop.evaluate_checkpoint(config, str(tmp_path), step=3)


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    tmp_path, shapes_data_dir):
  # Four good steps at the demo's learning rate, then 1e30 from the fifth: the loss turns
  # non-finite a step or more later, after the checkpoints of steps 2 and 4.
  run = _run(tmp_path, shapes_data_dir, '--config.train.optimizer.schedule=step',
             '--config.train.optimizer.warmup_steps=0',
             '--config.train.optimizer.decay_boundaries=(4,)',
             '--config.train.optimizer.decay_rate=1e33', '--config.train.total_steps=20')
  out, _ = run.communicate(timeout=900)
  assert run.returncode == 2, out[-3000:]
  found = re.search(r'FATAL: non-finite loss or gradient at a step in \((\d+), (\d+)\]; '
                    r'nothing after the last good checkpoint \(step (\d+)\) is saved', out)
  assert found, out[-3000:]
  before, bad, latest_in_message = map(int, found.groups())
  assert bad == before + 1 and bad >= 6  # log_every_steps=1 checks each step; 5 is still good
  from deepmarc_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), save_every_steps=2)
  latest = ckpt.latest_step()
  assert latest == latest_in_message and 4 <= latest < bad  # nothing from the bad step on
  restored = ckpt.restore(None)
  assert int(restored['step']) == latest
  leaves = [np.asarray(x) for x in jax_leaves(restored)]
  assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == 'f')


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_leaves(tree)


def _perfect_segment(config, dataset):
  """A `segment` that returns each image's own ground-truth masks (zeros for other images), for
  the images of `dataset` (pipeline.eval_dataset)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  masks_of_image = {}
  for batch in tfds.as_numpy(dataset):
    for image, masks, valid in zip(batch['image'], batch['gt_masks'], batch['example_valid']):
      if valid:
        masks_of_image[image.tobytes()] = masks
  fallback = np.zeros_like(next(iter(masks_of_image.values())))

  def perfect_segment(state, images, boxes, classes):
    del state, classes
    images = np.asarray(images)
    assert np.asarray(boxes).shape[:2] == (len(images), config.data.max_instances)
    return np.stack([masks_of_image.get(image.tobytes(), fallback) for image in images])
  return perfect_segment


def test_gt_box_mask_ap_scores_the_given_batches_of_any_split(shapes_data_dir):
  """gt_box_mask_ap on the first batch of the training split: the perfect mask head scores
  ~100 AP on seen and unseen classes (only that batch's images are scored: the split's other
  images have no masks and would lower recall), an empty one 0."""
  import itertools  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from deepmarc_jax import experiment  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.evaluation import loop as eval_loop  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.config()
  config.data.data_dir = shapes_data_dir
  exp = experiment.setup(config)
  split = config.data.train_split
  assert exp.builder.info.splits[split].num_examples > 8
  dataset = pipeline.eval_dataset(config.data, exp.builder, batch_size=8, split=split).take(1)
  batches = list(tfds.as_numpy(dataset))
  perfect = eval_loop.gt_box_mask_ap(exp, None, _perfect_segment(config, dataset),
                                 batches, split=split)
  assert perfect['AP'] > 0.95
  for half in ('seen', 'unseen'):
    assert perfect[half]['AP'] > 0.95

  def empty_segment(state, images, boxes, classes):
    del state, classes
    m = config.data.mask_size
    return np.zeros(np.asarray(boxes).shape[:2] + (m, m), np.float32)

  empty = eval_loop.gt_box_mask_ap(exp, None, empty_segment, itertools.islice(batches, 1),
                               split=split)
  assert empty['AP'] == 0.0


def test_gt_box_masks_of_a_perfect_mask_head_score_the_oracle_ap(shapes_data_dir):
  """evaluate_model's no-detector view ('segm_gt_boxes'), with a mask head that returns each
  image's own ground-truth masks: it must score what prepare.oracle_eval scores for the same
  masks (~100 AP, seen and unseen alike), while the empty detector scores 0."""
  from deepmarc_jax import prepare  # pylint: disable=g-import-not-at-top
  from deepmarc_jax import experiment  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.evaluation import loop as eval_loop  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.config()
  config.data.data_dir = shapes_data_dir
  config.eval.update(gt_box_masks=True, max_batches=None, batch_size=8)
  exp = experiment.setup(config)
  perfect_segment = _perfect_segment(
      config, pipeline.eval_dataset(config.data, exp.builder, batch_size=8))

  def empty_detect(state, images):
    del state
    k = 4
    return {'boxes': np.zeros((len(images), k, 4), np.float32),
            'scores': np.zeros((len(images), k), np.float32),
            'classes': np.zeros((len(images), k), np.int32),
            'masks': np.zeros((len(images), k, 8, 8), np.float32)}

  results = eval_loop.evaluate_model(exp, None, empty_detect, perfect_segment)
  oracle = prepare.oracle_eval(config, exp.builder, exp.split_ids)['segm']
  from_gt = results['segm_gt_boxes']
  assert from_gt['AP'] == pytest.approx(oracle['AP'], abs=1e-9) and from_gt['AP'] > 0.95
  for split in ('seen', 'unseen'):
    assert from_gt[split]['AP'] == pytest.approx(oracle[split]['AP'], abs=1e-9)
    assert from_gt[split]['AP'] > 0.95
  assert results['segm']['AP'] == 0.0 and results['bbox']['AP'] == 0.0


def test_a_run_is_reopened_from_its_workdir(tmp_path, shapes_data_dir):
  """read_run_config + restore_checkpoint (what --mode=eval and the diagnostics use): the kept
  step's state comes back into the same shapes and shardings, the latest by default; a missing
  step or workdir fails naming what is there, and creates nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  from deepmarc_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from deepmarc_jax import experiment  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.config()
  config.data.data_dir = shapes_data_dir
  (tmp_path / 'config.json').write_text(config.to_json_best_effort(indent=2))
  reread = checkpoint.read_run_config(str(tmp_path))
  assert reread.to_json_best_effort() == config.to_json_best_effort()  # JSON: tuples are lists
  exp = experiment.setup(reread)
  abstract = experiment.abstract_state(exp)  # what run.py's init_state fills (resume tests use it)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), save_every_steps=1)
  for step in (3, 5):
    ckpt.save(step, jax.tree_util.tree_map(
        lambda s, v=step: jax.device_put(np.full(s.shape, v, s.dtype), s.sharding), abstract))
  ckpt.close()
  assert checkpoint.kept_steps(str(tmp_path)) == [3, 5]
  for step, expected in ((None, 5), (3, 3)):
    state = experiment.restore_checkpoint(exp, str(tmp_path), step)
    assert int(state.step) == expected
    leaves, abstract_leaves = (jax.tree_util.tree_leaves(t) for t in (state, abstract))
    assert len(leaves) == len(abstract_leaves) > 10
    for got, want in zip(leaves, abstract_leaves):
      assert (got.shape, got.dtype, got.sharding) == (want.shape, want.dtype, want.sharding)
      np.testing.assert_array_equal(got, np.full(want.shape, expected, want.dtype))
  with pytest.raises(FileNotFoundError, match=r'step 4 .*keeps steps \[3, 5\]'):
    experiment.restore_checkpoint(exp, str(tmp_path), 4)
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    experiment.restore_checkpoint(exp, str(tmp_path / 'elsewhere'))
  with pytest.raises(FileNotFoundError, match='not a run.py workdir'):
    checkpoint.read_run_config(str(tmp_path / 'elsewhere'))
  assert not (tmp_path / 'elsewhere').exists()


def test_the_trainer_imports_neither_the_converter_nor_the_sweeps():
  """The TF-checkpoint converter and the sweep machinery are tools beside training: importing
  the trainer and the evaluation loop must not load them."""
  code = ('import sys, deepmarc_jax.train, deepmarc_jax.evaluation.loop; '
          'print(sorted(m for m in sys.modules if m.startswith(("deepmarc_jax.tools", '
          '"deepmarc_jax.sweeps"))))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120, check=True)
  assert result.stdout.strip().splitlines()[-1] == '[]'
