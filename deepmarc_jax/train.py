"""The one trainer: `train_and_evaluate(config, workdir)`.

Sections (as in big_vision's train.py): mesh -> input -> model and optimizer -> state, sharded
at creation or restored -> jitted update step -> loop (metrics, checkpoints, preemption,
periodic evaluation) -> final evaluation.

Parallelism is `jax.jit` with shardings: the global batch is split over the mesh's 'data' axis,
the train state is replicated, so BatchNorm statistics are global. One compile per config.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from jax.experimental import multihost_utils

from deepmarc_jax import checkpoint
from deepmarc_jax import convert
from deepmarc_jax import evaluate
from deepmarc_jax import optimizers
from deepmarc_jax import predict
from deepmarc_jax import sharding
from deepmarc_jax import viz
from deepmarc_jax.data import class_splits
from deepmarc_jax.data import groundtruth
from deepmarc_jax.data import pipeline
from deepmarc_jax.models import mask_rcnn


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/inf loss; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@dataclasses.dataclass
class Experiment:
  """Everything built from the config that the loop and the evaluator share."""
  config: Any
  mesh: jax.sharding.Mesh
  builder: Any
  model: mask_rcnn.MaskRCNN
  tx: optax.GradientTransformation
  split_ids: dict[str, list[int]]


def setup(config) -> Experiment:
  mesh = sharding.make_mesh(config.mesh)
  if config.train.batch_size % mesh.shape['data']:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} is not divisible by '
                     f'the {mesh.shape["data"]} devices of the mesh\'s data axis')
  builder = pipeline.get_builder(config.data)
  category_ids = pipeline.category_ids(builder)
  seen = class_splits.resolve_mask_classes(config.data.mask_classes, category_ids)
  model = mask_rcnn.MaskRCNN.from_config(config)
  tx = optimizers.make_optimizer(config.train.optimizer, config.train.total_steps)
  return Experiment(config, mesh, builder, model, tx,
                    class_splits.split_of(seen, category_ids))


def _init_fn(exp: Experiment):
  """rng -> a fresh TrainState of exp's model and optimizer."""
  data = exp.config.data
  spec = pipeline.PreprocessSpec(image_size=data.image_size, max_instances=data.max_instances,
                                 mask_size=data.mask_size, allowed_mask_ids=(), train=True)
  dummy = pipeline.dummy_batch(spec, batch_size=exp.mesh.shape['data'])

  def init(rng):
    variables = exp.model.init({'params': rng, 'sampling': rng, 'dropout': rng}, dummy,
                               train=True)
    params = variables['params']
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=exp.tx.init(params))
  return init


def abstract_state(exp: Experiment) -> TrainState:
  """The train state's shapes, dtypes and (replicated) shardings, as jax.ShapeDtypeStructs:
  what a checkpoint restores into. Nothing is computed or compiled."""
  shapes = jax.eval_shape(_init_fn(exp), jax.random.key(0))
  replicated = sharding.replicated(exp.mesh)
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


def init_state(exp: Experiment, rng: jax.Array) -> TrainState:
  """Initialises the train state directly into its (replicated) shardings."""
  shardings = jax.tree_util.tree_map(lambda s: s.sharding, abstract_state(exp))
  return jax.jit(_init_fn(exp), out_shardings=shardings)(rng)


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config that run.py wrote to workdir/config.json."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: not a run.py workdir')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _checkpointer(config, workdir: str) -> checkpoint.Checkpointer:
  return checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 save_every_steps=config.train.checkpoint_every_steps)


def kept_checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints kept in workdir/checkpoints, ascending ([] if none)."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return []
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), save_every_steps=1)
  try:
    return ckpt.kept_steps()
  finally:
    ckpt.close()


def restore_checkpoint(exp: Experiment, workdir: str, step: int | None = None) -> TrainState:
  """The workdir's checkpoint of `step` (default the latest), restored into exp's state's
  shapes and shardings (exp may differ from the run's config where shapes do not, e.g. in a
  BatchNorm momentum). FileNotFoundError, naming the kept steps, if there is none of `step`."""
  kept = kept_checkpoint_steps(workdir)
  if not kept:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints')
  step = kept[-1] if step is None else step
  if step not in kept:
    raise FileNotFoundError(f'no checkpoint of step {step} in {workdir}/checkpoints; it keeps '
                            f'steps {kept}')
  ckpt = _checkpointer(exp.config, workdir)
  try:
    return ckpt.restore(abstract_state(exp), step)
  finally:
    ckpt.close()


def load_init_from(state: TrainState, path: str) -> TrainState:
  """`state` with params and batch_stats read from `path` (`convert.save_variables`' layout).

  They are restored into the state's shapes, dtypes and shardings (orbax fails on any
  mismatch). The step and the optimizer state stay as initialised: SGD momentum and AdamW
  moments start at zero whatever the parameters are.
  """
  target = checkpoint.abstract({'params': state.params, 'batch_stats': state.batch_stats})
  variables = convert.load_variables(path, target)
  return state.replace(params=variables['params'], batch_stats=variables['batch_stats'])


def make_train_step(exp: Experiment):
  """(state, batch, rng) -> (state, metrics); the state is donated.

  metrics['finite'] is 0 where the loss or the gradient is not finite. The step does not undo
  such an update: the loop checks every step's flag before it saves or evaluates a state
  (`train_and_evaluate`), so no checkpoint holds what a non-finite step made. A select on each
  of the state's leaves (1,848 in the demo) would keep the old state in the step itself, but
  XLA compiles them as ~1,000 more fusions (README, Benchmarks).
  """
  model, tx = exp.model, exp.tx

  def loss_fn(params, batch_stats, batch, rng):
    outputs, updates = model.apply({'params': params, 'batch_stats': batch_stats}, batch,
                                   train=True, mutable=['batch_stats'],
                                   rngs={'sampling': rng, 'dropout': jax.random.fold_in(rng, 1)})
    loss, metrics = mask_rcnn.loss(outputs, exp.config.model)
    return loss, (metrics, updates['batch_stats'])

  def train_step(state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optimizers.gradient_norm(grads, exp.config.train.optimizer)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
    new = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                     opt_state=opt_state)
    return new, dict(metrics, finite=finite.astype(jnp.float32), grad_norm=grad_norm)

  replicated = sharding.replicated(exp.mesh)
  return jax.jit(train_step, donate_argnums=(0,), out_shardings=(replicated, replicated))


def make_detect(exp: Experiment):
  """Jitted `images [B,S,S,3] uint8 -> detections` (see MaskRCNN.detect), replicated outputs."""
  def detect(state: TrainState, images):
    return exp.model.apply({'params': state.params, 'batch_stats': state.batch_stats}, images,
                           method=mask_rcnn.MaskRCNN.detect)
  return jax.jit(detect, out_shardings=sharding.replicated(exp.mesh))


def make_segment_boxes(exp: Experiment):
  """Jitted `(state, images [B,S,S,3] uint8, boxes [B,N,4] input pixels, classes [B,N]) ->
  mask probabilities [B,N,m,m]` (see MaskRCNN.segment_boxes), replicated outputs."""
  def segment(state: TrainState, images, boxes, classes):
    return exp.model.apply({'params': state.params, 'batch_stats': state.batch_stats}, images,
                           boxes, classes, method=mask_rcnn.MaskRCNN.segment_boxes)
  return jax.jit(segment, out_shardings=sharding.replicated(exp.mesh))


def _maybe_segment_boxes(exp: Experiment):
  return make_segment_boxes(exp) if exp.config.eval.get('gt_box_masks', False) else None


def new_coco_evaluator(exp: Experiment, groundtruth_dataset=None) -> evaluate.CocoEvaluator:
  """An empty evaluator, scoring seen and unseen classes apart, of `groundtruth_dataset` (from
  `groundtruth.coco_groundtruth`; default: the eval split's, read here)."""
  config = exp.config
  if groundtruth_dataset is None:
    groundtruth_dataset = groundtruth.coco_groundtruth(exp.builder, config.data.eval_split)
  return evaluate.CocoEvaluator(
      groundtruth_dataset, seen_ids=exp.split_ids['seen'], unseen_ids=exp.split_ids['unseen'],
      mask_threshold=config.eval.mask_threshold, backend=config.eval.backend)


def add_gt_box_masks(evaluator: evaluate.CocoEvaluator, segment, state: TrainState,
                     batch: dict, inputs: dict, mine: slice = slice(None)) -> None:
  """Adds the masks `segment` predicts from an eval batch's GT boxes and classes to `evaluator`.

  batch: the host's numpy eval batch; inputs: its 'image', 'gt_boxes', 'gt_classes' as global
  arrays (sharding.global_batch); mine: this process's rows of the (replicated) outputs.
  """
  masks = jax.device_get(segment(state, inputs['image'], inputs['gt_boxes'],
                                 inputs['gt_classes']))[mine]
  evaluate.add_gt_box_predictions(evaluator, batch, masks)


def gt_box_mask_ap(exp: Experiment, state: TrainState, segment, batches,
                   split: str | None = None) -> dict:
  """segm stats ('AP', 'seen', 'unseen', ...) of the masks `segment` (make_segment_boxes)
  predicts from the GT boxes of `batches`: numpy batches of pipeline.eval_dataset over `split`
  (default the eval split). Only their images are scored, so a prefix of a split will do."""
  split = split or exp.config.data.eval_split
  evaluator = new_coco_evaluator(exp, groundtruth.coco_groundtruth(exp.builder, split))
  for batch in batches:
    inputs = sharding.global_batch(
        {k: batch[k] for k in ('image', 'gt_boxes', 'gt_classes')}, exp.mesh)
    add_gt_box_masks(evaluator, segment, state, batch, inputs)
  return evaluator.evaluate()['segm']


def evaluate_model(exp: Experiment, state: TrainState, detect=None, segment=None) -> dict:
  """COCO bbox/segm AP (overall, per category, seen/unseen) of `state` on the eval split
  (its first `config.eval.max_batches` batches when that is set).

  With `config.eval.gt_box_masks`, also 'segm_gt_boxes': the segm stats of masks predicted
  from the ground-truth boxes and classes (score 1, crowd boxes left out), no detector. It
  isolates the mask head: detection errors cannot lower it.
  """
  config = exp.config
  max_batches = config.eval.get('max_batches')
  detect = detect or make_detect(exp)
  with_gt_boxes = config.eval.get('gt_box_masks', False)
  if with_gt_boxes:
    segment = segment or make_segment_boxes(exp)
  groundtruth_dataset = groundtruth.coco_groundtruth(exp.builder, config.data.eval_split)
  evaluator = new_coco_evaluator(exp, groundtruth_dataset)
  gt_box_evaluator = new_coco_evaluator(exp, groundtruth_dataset) if with_gt_boxes else None
  ds = pipeline.eval_dataset(config.data, exp.builder,
                             batch_size=config.eval.batch_size // jax.process_count(),
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
  for i, batch in enumerate(tfds.as_numpy(ds)):
    if max_batches is not None and i >= max_batches:
      break
    inputs = sharding.global_batch(
        {k: batch[k] for k in ('image', 'gt_boxes', 'gt_classes')}, exp.mesh)
    # This process scores its own examples (the outputs are replicated).
    local = len(batch['image'])
    mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    dets = {k: v[mine] for k, v in jax.device_get(detect(state, inputs['image'])).items()}
    scale = batch['image_info'][:, 2, None, None]
    evaluator.add_predictions(batch['image_id'], dets['boxes'] / scale, dets['scores'],
                              dets['classes'], dets['masks'], batch['example_valid'])
    if with_gt_boxes:
      add_gt_box_masks(gt_box_evaluator, segment, state, batch, inputs, mine)
  results = evaluator.evaluate()
  if with_gt_boxes:
    results['segm_gt_boxes'] = gt_box_evaluator.evaluate()['segm']
  return results


def write_prediction_overlays(exp: Experiment, state: TrainState, path: str, detect=None,
                              num_images: int = 8) -> None:
  """PNG of the first eval images with their predicted masks drawn on them (detections with
  score >= config.eval.overlay_score_threshold)."""
  detect = detect or make_detect(exp)
  batch = next(iter(tfds.as_numpy(pipeline.eval_dataset(
      exp.config.data, exp.builder, batch_size=exp.config.eval.batch_size))))
  images = sharding.global_batch({'image': batch['image']}, exp.mesh)['image']
  dets = jax.device_get(detect(state, images))
  categories = {c['id']: c['name'] for c in exp.builder.info.metadata['categories']}
  drawn = [predict.draw_detections(batch['image'][i], {k: v[i] for k, v in dets.items()},
                                   categories, exp.split_ids['seen'],
                                   exp.config.eval.overlay_score_threshold)
           for i in range(min(num_images, len(batch['image'])))
           if batch['example_valid'][i]]
  viz.save_grid(drawn, path, zoom=max(1, 256 // exp.config.data.image_size))


def evaluate_checkpoint(config, workdir: str, step: int | None = None) -> dict:
  """Evaluates the workdir's checkpoint at `step`, default the latest (`run.py --mode=eval
  [--step=N]`): eval_<step>.json and predictions.png in the workdir."""
  exp = setup(config)
  state = restore_checkpoint(exp, workdir, step)
  detect = make_detect(exp)
  results = evaluate_model(exp, state, detect, _maybe_segment_boxes(exp))
  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=jax.process_index() > 0)
  _write_results(writer, workdir, int(state.step), results)
  if jax.process_index() == 0:
    write_prediction_overlays(exp, state, os.path.join(workdir, 'predictions.png'), detect)
  return results


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (resuming from the workdir's latest checkpoint) and evaluates; returns the final
  evaluation results (also written to workdir/eval_<step>.json)."""
  exp = setup(config)
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  ckpt = _checkpointer(config, workdir)
  rng = jax.random.key(config.seed)
  state = init_state(exp, rng)
  if ckpt.latest_step() is not None:  # resume first
    state = ckpt.restore(checkpoint.abstract(state))
    logging.info('resumed from step %d', int(state.step))
  elif config.get('init_from'):  # then the variables of a converted (or earlier) model
    state = load_init_from(state, config.init_from)
    logging.info('params and batch_stats from %s', config.init_from)
  start_step = int(state.step)
  total_steps = config.train.total_steps

  batches = iter(tfds.as_numpy(pipeline.train_dataset(
      config.data, exp.builder, batch_size=config.train.batch_size // jax.process_count(),
      seed=config.seed, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())))
  train_step = make_train_step(exp)
  detect, segment = make_detect(exp), _maybe_segment_boxes(exp)
  if _evaluation_missed(config, workdir, start_step):
    logging.info('evaluating step %d first: the run stopped before evaluating it', start_step)
    _write_results(writer, workdir, start_step, evaluate_model(exp, state, detect, segment))
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  preempted = checkpoint.PreemptionFlag()
  step_rng = jax.random.fold_in(rng, 1)
  history, results = [], None
  try:
    for step in range(start_step + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        batch = sharding.global_batch(next(batches), exp.mesh)
        state, metrics = train_step(state, batch, step_rng)
      history.append(metrics)
      report(step)
      last, stop = step == total_steps, bool(preempted)
      save = last or stop or ckpt.should_save(step)
      evaluate_now = step % config.eval.every_steps == 0 or last
      # The steps since the last summary are checked before their state is saved or evaluated.
      if step % config.train.log_every_steps == 0 or save or evaluate_now:
        summary = _summarise(history)
        if summary['finite'] < 1.0:
          ckpt.wait()  # the latest step named below is on disk
          raise NonFiniteLossError(
              f'non-finite loss or gradient at a step in ({step - len(history)}, {step}]; '
              f'nothing after the last good checkpoint (step {ckpt.latest_step()}) is saved. '
              'Lower the learning rate or check the data.')
        history = []
        writer.write_scalars(step, summary)
        if is_main:
          with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps(dict(step=step, **summary)) + '\n')
        logging.info('step %d: %s', step, {k: round(v, 4) for k, v in summary.items()})
      if save and ckpt.save(step, state, force=last or stop):
        logging.info('checkpoint at step %d', step)
      if stop:
        logging.warning('SIGTERM: checkpointed step %d and stopping', step)
        return {}
      if evaluate_now:
        with report.timed('eval'):
          results = evaluate_model(exp, state, detect, segment)
        _write_results(writer, workdir, step, results)
  finally:
    ckpt.wait()
    ckpt.close()
    preempted.close()
    writer.flush()
  if results is None:  # nothing left to train: evaluate the restored state
    results = evaluate_model(exp, state, detect, segment)
    _write_results(writer, workdir, int(state.step), results)
  if is_main:
    write_prediction_overlays(exp, state, os.path.join(workdir, 'predictions.png'), detect)
  return results


def _evaluation_missed(config, workdir: str, start_step: int) -> bool:
  """Whether the run resumed at an evaluation step it never evaluated: SIGTERM there stops the
  loop after the step's checkpoint and before its evaluation, so that the preempted run exits
  quickly. (A resumed run at train.total_steps evaluates anyway.)"""
  missed = (0 < start_step < config.train.total_steps
            and start_step % config.eval.every_steps == 0
            and not os.path.exists(os.path.join(workdir, f'eval_{start_step}.json')))
  if jax.process_count() > 1:  # process 0 writes the evaluations; all processes must agree
    missed = bool(multihost_utils.broadcast_one_to_all(np.asarray(missed)))
  return missed


def _summarise(history: list[dict]) -> dict[str, float]:
  stacked = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def _write_results(writer, workdir: str, step: int, results: dict) -> None:
  scalars = {f'{iou}/{name}': results[iou][name]
             for iou in evaluate.IOU_TYPES for name in evaluate.STAT_NAMES}
  scalars.update({f'{iou}/{split}_AP': results[iou][split]['AP']
                  for iou in evaluate.IOU_TYPES for split in evaluate.SPLITS})
  if 'segm_gt_boxes' in results:
    from_gt = results['segm_gt_boxes']
    scalars['segm_gt_boxes/AP'] = from_gt['AP']
    scalars.update({f'segm_gt_boxes/{split}_AP': from_gt[split]['AP']
                    for split in evaluate.SPLITS})
  writer.write_scalars(step, {k: v for k, v in scalars.items() if np.isfinite(v)})
  if jax.process_index() == 0:
    evaluate.write_json(results, os.path.join(workdir, f'eval_{step}.json'))
    print(f'step {step} evaluation, %:\n{evaluate.format_table(results)}', flush=True)
