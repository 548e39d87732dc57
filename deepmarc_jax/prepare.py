"""`run.py --mode=prepare`: build the dataset and check the data and evaluation halves end to end.

1. Builds the configured TFDS dataset if needed (the synthetic one is generated) and prints
   its splits, categories (seen = mask-trained, unseen = boxes only) and what the read skipped.
2. Times the training pipeline and writes `pipeline_preview.png`: augmented training images
   with their ground-truth masks pasted back from the batch (box-relative M x M crops).
3. Feeds the evaluation batches' ground truth back through the evaluator as if it were a
   model's output: the resulting "oracle" AP is the ceiling that M x M box masks and the
   input resolution allow, and a check that pipeline, geometry and evaluator agree.
   Written to `oracle_eval.json`.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from deepmarc_jax.evaluation import coco as coco_eval
from deepmarc_jax import viz
from deepmarc_jax.data import class_splits
from deepmarc_jax.data import groundtruth
from deepmarc_jax.data import pipeline
from deepmarc_jax.ops import masks as mask_ops


def run(config, workdir: str) -> dict:
  builder = pipeline.get_builder(config.data)
  categories = {c['id']: c['name'] for c in builder.info.metadata['categories']}
  seen = class_splits.resolve_mask_classes(config.data.mask_classes, categories)
  split = class_splits.split_of(seen, categories)
  print(f'dataset {config.data.tfds_name} at {builder.data_dir}')
  for name, info in builder.info.splits.items():
    print(f'  {name}: {info.num_examples} images')
  print(f'  read stats: {builder.info.metadata.get("read_stats")}')
  for part in ('seen', 'unseen'):
    print(f'  {part} ({len(split[part])}): '
          + ', '.join(f'{categories[i]} ({i})' for i in split[part]))

  batch_size = config.train.batch_size // jax.process_count()
  ds = pipeline.train_dataset(config.data, builder, batch_size=batch_size, seed=config.seed,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  batches = iter(tfds.as_numpy(ds))
  first = next(batches)
  start, num = time.perf_counter(), 10
  for _ in range(num):
    next(batches)
  rate = num * batch_size / (time.perf_counter() - start)
  print(f'train pipeline: {rate:.1f} images/s at {config.data.image_size} px, '
        f'batch {batch_size}')
  preview = os.path.join(workdir, 'pipeline_preview.png')
  viz.save_grid([_draw_example(first, i, categories, seen) for i in range(min(batch_size, 8))],
                preview, zoom=max(1, 256 // config.data.image_size))
  print(f'wrote {preview}')

  results = oracle_eval(config, builder, split)
  print('oracle AP (ground truth fed back through the batch contract), %:')
  print(coco_eval.format_table(results))
  coco_eval.write_json(results, os.path.join(workdir, 'oracle_eval.json'))
  return results


def oracle_eval(config, builder, split: dict[str, list[int]]) -> dict:
  """AP of the eval batches' own ground truth, mapped back to the original images."""
  evaluator = coco_eval.CocoEvaluator(
      groundtruth.coco_groundtruth(builder, config.data.eval_split),
      seen_ids=split['seen'], unseen_ids=split['unseen'],
      mask_threshold=config.eval.mask_threshold, backend=config.eval.backend,
      detection_area=config.eval.detection_area)
  ds = pipeline.eval_dataset(config.data, builder, batch_size=config.eval.batch_size)
  dropped = 0
  for batch in tfds.as_numpy(ds):
    dropped += int(batch['num_dropped_instances'].sum())
    coco_eval.add_gt_box_predictions(evaluator, batch, batch['gt_masks'])
  if dropped:
    logging.warning('%d eval instances beyond data.max_instances=%d were dropped (they count '
                    'as misses)', dropped, config.data.max_instances)
  return evaluator.evaluate()


def _draw_example(batch: dict, i: int, categories: dict[int, str], seen) -> np.ndarray:
  """Input image i of a batch with its GT masks pasted from the M x M crops."""
  size = batch['image'].shape[1]
  valid = np.nonzero(batch['gt_valid'][i])[0]
  masks = [mask_ops.paste_box_mask(batch['gt_masks'][i, k], batch['gt_boxes'][i, k], size, size)
           for k in valid]
  labels = [categories.get(int(c), str(c)) + ('' if c in seen else '*')
            for c in batch['gt_classes'][i, valid]]
  return viz.overlay(batch['image'][i], np.asarray(masks).reshape(-1, size, size),
                     batch['gt_boxes'][i, valid], labels)
