"""Evaluating a model on the eval split: detections and, optionally, masks from the GT boxes.

`evaluate_model` runs the jitted `detect` (and `segment_boxes` on the ground-truth boxes when
`config.eval.gt_box_masks`) over the eval pipeline and scores them with the COCO evaluator,
seen and unseen classes apart; `evaluate_checkpoint` does it for a run's saved checkpoint
(`run.py --mode=eval`). `write_results` and `write_prediction_overlays` write what a run
leaves in its workdir: eval_<step>.json, the metric writer's scalars, predictions.png.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import tensorflow_datasets as tfds
from clu import metric_writers

from deepmarc_jax import experiment as experiment_lib
from deepmarc_jax import sharding
from deepmarc_jax import viz
from deepmarc_jax.data import groundtruth
from deepmarc_jax.data import pipeline
from deepmarc_jax.evaluation import coco as coco_eval

Experiment = experiment_lib.Experiment
TrainState = experiment_lib.TrainState


def segment_if_configured(exp: Experiment):
  """The jitted segment_boxes if config.eval.gt_box_masks, else None."""
  if exp.config.eval.get('gt_box_masks', False):
    return experiment_lib.make_segment_boxes(exp)
  return None


def new_coco_evaluator(exp: Experiment, groundtruth_dataset=None) -> coco_eval.CocoEvaluator:
  """An empty evaluator, scoring seen and unseen classes apart, of `groundtruth_dataset` (from
  `groundtruth.coco_groundtruth`; default: the eval split's, read here)."""
  config = exp.config
  if groundtruth_dataset is None:
    groundtruth_dataset = groundtruth.coco_groundtruth(exp.builder, config.data.eval_split)
  return coco_eval.CocoEvaluator(
      groundtruth_dataset, seen_ids=exp.split_ids['seen'], unseen_ids=exp.split_ids['unseen'],
      mask_threshold=config.eval.mask_threshold, backend=config.eval.backend,
      detection_area=config.eval.detection_area)


def add_gt_box_masks(evaluator: coco_eval.CocoEvaluator, segment, state: TrainState,
                     batch: dict, inputs: dict, mine: slice = slice(None)) -> None:
  """Adds the masks `segment` predicts from an eval batch's GT boxes and classes to `evaluator`.

  batch: the host's numpy eval batch; inputs: its 'image', 'gt_boxes', 'gt_classes' as global
  arrays (sharding.global_batch); mine: this process's rows of the (replicated) outputs.
  """
  masks = jax.device_get(segment(state, inputs['image'], inputs['gt_boxes'],
                                 inputs['gt_classes']))[mine]
  coco_eval.add_gt_box_predictions(evaluator, batch, masks)


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


def dataset_classes_only(dets: dict, category_ids) -> dict:
  """`dets` with class 0 (no detection) where the class is not one of the dataset's categories.

  A model's class space can be larger than the dataset's: CenterNet decodes its top-k peaks of
  every heatmap channel (90 for COCO's 80 categories), and COCOeval, scoring the ground truth's
  categories only, ignores such detections; so does the evaluator after this.
  """
  known = np.isin(dets['classes'], np.asarray(list(category_ids)))
  return dict(dets, classes=np.where(known, dets['classes'], 0))


def evaluate_model(exp: Experiment, state: TrainState, detect=None, segment=None) -> dict:
  """COCO bbox/segm AP (overall, per category, seen/unseen) of `state` on the eval split
  (its first `config.eval.max_batches` batches when that is set).

  With `config.eval.gt_box_masks`, also 'segm_gt_boxes': the segm stats of masks predicted
  from the ground-truth boxes and classes (score 1, crowd boxes left out), no detector. It
  isolates the mask head: detection errors cannot lower it.
  """
  config = exp.config
  max_batches = config.eval.get('max_batches')
  detect = detect or experiment_lib.make_detect(exp)
  with_gt_boxes = config.eval.get('gt_box_masks', False)
  if with_gt_boxes:
    segment = segment or experiment_lib.make_segment_boxes(exp)
  groundtruth_dataset = groundtruth.coco_groundtruth(exp.builder, config.data.eval_split)
  category_ids = exp.split_ids['seen'] + exp.split_ids['unseen']
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
    dets = dataset_classes_only(dets, category_ids)
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
                              segment=None, num_images: int = 8) -> None:
  """PNG of the first eval images, each twice: its detections (score >=
  config.eval.overlay_score_threshold) and the masks predicted from its ground-truth boxes (no
  detector: the paper's Colab setting). '*' marks unseen (box-only) classes."""
  detect = detect or experiment_lib.make_detect(exp)
  segment = segment or experiment_lib.make_segment_boxes(exp)
  batch = next(iter(tfds.as_numpy(pipeline.eval_dataset(
      exp.config.data, exp.builder, batch_size=exp.config.eval.batch_size))))
  inputs = sharding.global_batch({k: batch[k] for k in ('image', 'gt_boxes', 'gt_classes')},
                                 exp.mesh)
  dets = dataset_classes_only(jax.device_get(detect(state, inputs['image'])),
                              exp.split_ids['seen'] + exp.split_ids['unseen'])
  from_gt = jax.device_get(segment(state, inputs['image'], inputs['gt_boxes'],
                                   inputs['gt_classes']))
  categories = {c['id']: c['name'] for c in exp.builder.info.metadata['categories']}
  seen = exp.split_ids['seen']
  drawn = []
  for i in [i for i in range(len(batch['image'])) if batch['example_valid'][i]][:num_images]:
    image = batch['image'][i]
    drawn.append(viz.caption(viz.draw_detections(
        image, {k: v[i] for k, v in dets.items()}, categories, seen,
        exp.config.eval.overlay_score_threshold), 'detections'))
    real = batch['gt_valid'][i] & ~batch['gt_is_crowd'][i]
    gt = {'boxes': batch['gt_boxes'][i], 'scores': real.astype(np.float32),
          'classes': batch['gt_classes'][i], 'masks': from_gt[i]}
    drawn.append(viz.caption(viz.draw_detections(image, gt, categories, seen, 0.5,
                                                 show_scores=False), 'from GT boxes'))
  viz.save_grid(drawn, path, zoom=max(1, 256 // exp.config.data.image_size))


def evaluate_checkpoint(config, workdir: str, step: int | None = None) -> dict:
  """Evaluates the workdir's checkpoint at `step`, default the latest (`run.py --mode=eval
  [--step=N]`): eval_<step>.json and predictions.png in the workdir."""
  exp = experiment_lib.setup(config)
  state = experiment_lib.restore_checkpoint(exp, workdir, step)
  detect = experiment_lib.make_detect(exp)
  results = evaluate_model(exp, state, detect, segment_if_configured(exp))
  writer = metric_writers.create_default_writer(workdir,
                                                just_logging=jax.process_index() > 0)
  write_results(writer, workdir, int(state.step), results)
  if jax.process_index() == 0:
    write_prediction_overlays(exp, state, os.path.join(workdir, 'predictions.png'), detect,
                              segment_if_configured(exp))
  return results


def write_results(writer, workdir: str, step: int, results: dict) -> None:
  """Scalars to the metric writer; on process 0 also WORKDIR/eval_<step>.json and the printed
  table."""
  scalars = {f'{iou}/{name}': results[iou][name]
             for iou in coco_eval.IOU_TYPES for name in coco_eval.STAT_NAMES}
  scalars.update({f'{iou}/{split}_AP': results[iou][split]['AP']
                  for iou in coco_eval.IOU_TYPES for split in coco_eval.SPLITS})
  if 'segm_gt_boxes' in results:
    from_gt = results['segm_gt_boxes']
    scalars['segm_gt_boxes/AP'] = from_gt['AP']
    scalars.update({f'segm_gt_boxes/{split}_AP': from_gt[split]['AP']
                    for split in coco_eval.SPLITS})
  writer.write_scalars(step, {k: v for k, v in scalars.items() if np.isfinite(v)})
  if jax.process_index() == 0:
    coco_eval.write_json(results, os.path.join(workdir, f'eval_{step}.json'))
    print(f'step {step} evaluation, %:\n{coco_eval.format_table(results)}', flush=True)
