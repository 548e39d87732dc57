"""COCO-format ground truth rebuilt from a TFDS `coco_instances` split (for the evaluator).

Evaluation needs no side files: the TFRecords hold everything COCOeval reads (image sizes,
boxes, category ids, crowd flags, areas, masks), so training hosts need only the TFDS data dir.
Boxes come back from normalised float32, within ~1e-4 px of the JSON's.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from pycocotools import mask as mask_utils


def coco_groundtruth(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, Any]:
  """Returns a COCO instances dict (images, annotations, categories) for `split`."""
  images, annotations = [], []
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  for ex in tfds.as_numpy(ds):
    height, width = _image_size(ex['image'])
    image_id = int(ex['image/id'])
    images.append({'id': image_id, 'height': height, 'width': width,
                   'file_name': ex['image/filename'].decode()})
    objects = ex['objects']
    for k in range(len(objects['category_id'])):
      ymin, xmin, ymax, xmax = (float(v) for v in objects['bbox'][k])
      rle = _compress(objects['mask_rle'][k], height, width)
      annotations.append({
          'id': int(objects['id'][k]) if objects['id'][k] >= 0 else len(annotations) + 1,
          'image_id': image_id,
          'category_id': int(objects['category_id'][k]),
          'bbox': [xmin * width, ymin * height, (xmax - xmin) * width, (ymax - ymin) * height],
          'area': float(objects['area'][k]),
          'iscrowd': int(objects['is_crowd'][k]),
          'segmentation': rle,
      })
  return {'images': images, 'annotations': annotations,
          'categories': list(builder.info.metadata['categories'])}


def _image_size(encoded: bytes) -> tuple[int, int]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape = tf.io.extract_jpeg_shape(encoded) if encoded[:2] == b'\xff\xd8' else tf.shape(
      tf.io.decode_image(encoded, channels=3, expand_animations=False))
  return int(shape[0]), int(shape[1])


def _compress(counts: np.ndarray, height: int, width: int) -> dict[str, Any]:
  """Uncompressed run lengths -> compressed COCO RLE with str counts."""
  rle = mask_utils.frPyObjects({'counts': [int(c) for c in counts], 'size': [height, width]},
                               height, width)
  return {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}
