"""Drawing a model's detections: predicted masks pasted into the input image, as PNG."""
from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from deepmarc_jax import viz
from deepmarc_jax.ops import masks as mask_ops


def draw_detections(image: np.ndarray, dets: Mapping[str, np.ndarray],
                    categories: Mapping[int, str], seen: Collection[int],
                    score_threshold: float = 0.5) -> np.ndarray:
  """One input image [S, S, 3] uint8 with its detections above `score_threshold`.

  dets: one image's boxes [D, 4] (input pixels), scores [D], classes [D], masks [D, m, m]
  probabilities. Labels are 'name score', with '*' marking unseen (box-only) classes.
  """
  size = image.shape[0]
  keep = np.nonzero((dets['scores'] >= score_threshold) & (dets['classes'] > 0))[0]
  masks = [mask_ops.paste_box_mask(dets['masks'][k], dets['boxes'][k], size, size)
           for k in keep]
  labels = [f'{categories.get(int(dets["classes"][k]), "?")}'
            f'{"" if int(dets["classes"][k]) in seen else "*"} {dets["scores"][k]:.2f}'
            for k in keep]
  return viz.overlay(image, np.asarray(masks).reshape(-1, size, size), dets['boxes'][keep],
                     labels)
