"""Hostile COCO data through the TFDS builder and run.py's way to it (`pipeline.get_builder`).

Every broken image or annotation is skipped, counted and logged (`on_bad_input='skip'`) or stops
the build naming the file and id ('error'); images of any mode are stored as the RGB pixels the
file holds. (`tfds build` choosing the policy: test_coco_instances.py; the reader's cases one by
one: test_coco_format.py.)
"""
import contextlib
import io
import json
import logging

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from deepmarc_jax import config_lib
from deepmarc_jax.data import coco_format
from deepmarc_jax.data import groundtruth
from deepmarc_jax.data import pipeline
from deepmarc_jax.data.coco_instances import CocoInstances
from deepmarc_jax.data.coco_instances import CocoInstancesConfig
from tests.test_coco_format import blocks
from tests.test_coco_format import png_header
from tests.test_coco_format import write_image_variants

H, W = 24, 32
SQUARE = [[4, 4, 20, 4, 20, 20, 4, 20]]
CATEGORIES = [{'id': 1, 'name': 'person'}, {'id': 3, 'name': 'car'}]


def _ann(ann_id, image_id, segmentation=None, bbox=(4, 4, 16, 16), category_id=1):
  return {'id': ann_id, 'image_id': image_id, 'category_id': category_id, 'bbox': list(bbox),
          'iscrowd': 0, 'segmentation': SQUARE if segmentation is None else segmentation}


def _image(image_id, name, h=H, w=W):
  return {'id': image_id, 'file_name': name, 'height': h, 'width': w}


def _write_split(root, split, images, annotations, prefix='instances', folder=True):
  """`root/annotations/<prefix>_<split>.json` (no "annotations" key when None) + `root/split/`
  with an RGB JPEG for each image named *.jpg that is not there yet."""
  (root / 'annotations').mkdir(parents=True, exist_ok=True)
  data = {'images': images, 'categories': CATEGORIES}
  if annotations is not None:
    data['annotations'] = annotations
  (root / 'annotations' / f'{prefix}_{split}.json').write_text(json.dumps(data))
  if folder:
    (root / split).mkdir(exist_ok=True)
    for im in images:
      path = root / split / im['file_name']
      if path.suffix == '.jpg' and not path.exists() and 'missing' not in path.name:
        Image.fromarray(blocks(im['height'], im['width'])).save(path)


def _prepare(builder, manual_dir):
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), try_download_gcs=False))
  return builder


def test_builder_stores_every_image_mode_as_its_stored_rgb_pixels(tmp_path):
  """Palette, gray, RGBA, CMYK, progressive, EXIF-rotated and 16-bit images, as TF decodes
  them from the TFRecords, equal the pixels as stored (EXIF not applied, 16 bits scaled)."""
  raw = tmp_path / 'raw'
  (raw / 'train').mkdir(parents=True)
  expected = write_image_variants(raw / 'train', H, W)
  names = sorted(expected)
  _write_split(raw, 'train', [_image(i + 1, n) for i, n in enumerate(names)],
               [_ann(i + 1, i + 1) for i in range(len(names))])
  builder = _prepare(CocoInstances(config='custom', data_dir=str(tmp_path / 'tfds'),
                                   on_bad_input='error'), raw)
  seen = set()
  for ex in tfds.as_numpy(builder.as_dataset(split='train')):
    name = ex['image/filename'].decode()
    pixels, tolerance = expected[name]
    assert ex['image'].shape == (H, W, 3), name
    diff = np.abs(ex['image'].astype(int) - pixels.astype(int)).max()
    assert diff <= tolerance, (name, diff)
    seen.add(name)
  assert seen == set(names)


def _hostile_dir(root):
  """One split with a missing image, a decompression bomb, a duplicate annotation id, a NaN
  polygon, an unknown category and an orphan annotation next to usable data."""
  _write_split(root, 'train', [_image(1, 'a.jpg'), _image(2, 'b.jpg'),
                               _image(3, 'missing.jpg'), _image(4, 'bomb.png', 10000, 10000)],
               [_ann(1, 1), _ann(2, 1, [[0, 0, 10, 0, 10, 10, 0, 10]], (0, 0, 10, 10), 3),
                _ann(2, 2),  # the id of annotation 2 again
                _ann(3, 2, [[4, 4, 20, float('nan'), 20, 20]]),
                _ann(4, 2, category_id=99), _ann(5, 77), _ann(6, 3), _ann(7, 2), _ann(8, 4)])
  png_header(root / 'train' / 'bomb.png', 10000, 10000)


def test_hostile_data_is_skipped_counted_and_logged_or_stops_the_build(tmp_path, caplog):
  _hostile_dir(tmp_path / 'raw')
  with caplog.at_level(logging.INFO):
    builder = _prepare(CocoInstances(config='custom', data_dir=str(tmp_path / 'tfds')),
                       tmp_path / 'raw')
  summary = ('instances_train.json: kept 2 of 4 images and 3 of 9 annotations; skipped 2 images: '
             '1 image_too_large, 1 missing_image; skipped 6 annotations: 2 of skipped images, '
             '1 duplicate_annotation_id, 1 non_finite_coordinates, 1 unknown_category, '
             '1 unknown_image_id')
  logged = [r for r in caplog.records if summary in r.getMessage()]
  assert len(logged) == 1 and logged[0].levelno == logging.WARNING, caplog.text[-3000:]
  stats = builder.info.metadata['read_stats']['train']
  assert stats['skipped'] == {'missing_image': 1, 'image_too_large': 1,
                              'duplicate_annotation_id': 1, 'non_finite_coordinates': 1,
                              'unknown_category': 1, 'unknown_image_id': 1}
  assert (stats['images'], stats['instances'], stats['annotations_of_skipped_images']) == (2, 3, 2)
  stored = {int(ex['image/id']): ex['objects']['id'].tolist()
            for ex in tfds.as_numpy(builder.as_dataset(split='train'))}
  assert stored == {1: [1, 2], 2: [7]}  # the first annotation 2 is kept, the second skipped

  # Ground truth scored against itself is perfect: no instance lost or counted twice.
  gt = COCO()
  gt.dataset = groundtruth.coco_groundtruth(builder, 'train')
  with contextlib.redirect_stdout(io.StringIO()):
    gt.createIndex()
    detections = gt.loadRes([dict(a, score=1.0) for a in gt.dataset['annotations']])
    for iou_type in ('bbox', 'segm'):
      evaluator = COCOeval(gt, detections, iou_type)
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
      assert evaluator.stats[0] == pytest.approx(1.0), iou_type

  strict = CocoInstances(config='custom', data_dir=str(tmp_path / 'strict'), on_bad_input='error')
  with pytest.raises(coco_format.BadInputError,
                     match=r'instances_train.json: annotation 2 of image 2: '
                     'duplicate_annotation_id: id 2 is also used by an annotation of image 1'):
    _prepare(strict, tmp_path / 'raw')


def test_unlabelled_splits_must_be_declared(tmp_path):
  raw = tmp_path / 'raw'
  _write_split(raw, 'train', [_image(1, 'a.jpg')], [_ann(1, 1)])
  _write_split(raw, 'test', [_image(5, 'c.jpg')], None, prefix='image_info')
  _write_split(raw, 'test2017', [_image(9, 'd.jpg')], None, prefix='image_info', folder=False)
  builder = _prepare(CocoInstances(config='custom', data_dir=str(tmp_path / 'tfds'),
                                   on_bad_input='error'), raw)
  assert set(builder.info.splits) == {'train', 'test'}  # test2017 has no images: not a split
  stats = builder.info.metadata['read_stats']
  assert stats['test']['labelled'] is False and stats['train']['labelled'] is True
  (test,) = tfds.as_numpy(builder.as_dataset(split='test'))
  assert int(test['image/id']) == 5 and len(test['objects']['id']) == 0

  raw = tmp_path / 'raw2'
  _write_split(raw, 'train', [_image(1, 'a.jpg')], [_ann(1, 1)])
  _write_split(raw, 'val', [_image(2, 'b.jpg')], None)  # forgot the annotations
  for policy in coco_format.ON_BAD_INPUT:
    with pytest.raises(coco_format.BadInputError,
                       match='instances_val.json: has no "annotations" key, and the split is '
                       'labelled'):
      _prepare(CocoInstances(config='custom', data_dir=str(tmp_path / policy),
                             on_bad_input=policy), raw)
  splits = {'train': ('annotations/instances_train.json', 'train'),
            'val': ('annotations/instances_val.json', 'val')}
  config = CocoInstancesConfig(name='declared', splits=splits, unlabelled_splits=('val',))
  builder = _prepare(CocoInstances(config=config, data_dir=str(tmp_path / 'declared')), raw)
  assert builder.info.metadata['read_stats']['val']['labelled'] is False
  config = CocoInstancesConfig(name='typo', splits=splits, unlabelled_splits=('valid',))
  with pytest.raises(ValueError, match=r"unlabelled_splits \['valid'\] are not among"):
    _prepare(CocoInstances(config=config, data_dir=str(tmp_path / 'typo')), raw)


def test_run_py_builder_path_applies_the_policy_and_the_json_size_limit(tmp_path, caplog):
  """run.py builds through `pipeline.get_builder(config.data)`."""
  raw = tmp_path / 'raw'
  _write_split(raw, 'train', [_image(1, 'a.jpg')], [_ann(1, 1), _ann(2, 1), _ann(2, 1)])

  def data_config(data_dir, **overrides):
    return ml_collections.ConfigDict(dict(dict(
        tfds_name='coco_instances/custom', data_dir=str(tmp_path / data_dir),
        manual_dir=str(raw), on_bad_input='skip',
        max_json_mb=coco_format.DEFAULT_MAX_JSON_MB), **overrides))

  with pytest.raises(coco_format.BadInputError, match='annotation 2 of image 1: duplicate'):
    pipeline.get_builder(data_config('strict', on_bad_input='error'))
  with pytest.raises(coco_format.BadInputError,
                     match=r'instances_train.json: the file is .* over the 0.0 MiB limit.*'
                     'max_json_mb=N'):
    pipeline.get_builder(data_config('small', max_json_mb=1e-5))
  builder = pipeline.get_builder(data_config('skip'))
  assert builder.info.metadata['read_stats']['train']['skipped'] == {'duplicate_annotation_id': 1}
  # A later run reuses the built dataset, and says again what its build skipped.
  with caplog.at_level(logging.WARNING):
    pipeline.get_builder(data_config('skip'))
  assert any('split train, was built skipping bad input (data.on_bad_input=skip): 1 '
             'duplicate_annotation_id' in r.getMessage() for r in caplog.records), caplog.text

  config = config_lib.base_config()
  config.data.max_json_mb = 0
  with pytest.raises(config_lib.ConfigError, match='config.data.max_json_mb=0 must be positive'):
    config_lib.validate(config)
  with pytest.raises(ValueError, match='max_json_mb'):
    CocoInstances(config='custom', max_json_mb=0)


def test_run_py_stops_on_a_bad_input_with_one_line_naming_file_and_id(tmp_path):
  """`run.py --mode=prepare` on a custom export with a duplicate annotation id, 'error' policy:
  exit status 2 and a FATAL line, not a traceback."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.conftest import REPO  # pylint: disable=g-import-not-at-top
  raw = tmp_path / 'raw'
  _write_split(raw, 'train', [_image(1, 'a.jpg')], [_ann(1, 1), _ann(2, 1), _ann(2, 1)])
  _write_split(raw, 'val', [_image(1, 'a.jpg')], [_ann(1, 1)])
  result = subprocess.run(
      [sys.executable, str(REPO / 'run.py'),
       f'--config={REPO / "experiments" / "deepmarc_spinenet.py"}:demo,tiny',
       f'--workdir={tmp_path / "work"}', '--mode=prepare',
       '--config.data.tfds_name=coco_instances/custom', f'--config.data.manual_dir={raw}',
       f'--config.data.data_dir={tmp_path / "tfds"}', '--config.data.on_bad_input=error'],
      capture_output=True, text=True, cwd=REPO, timeout=600,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES=''))
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert ('FATAL: ' in result.stderr and 'instances_train.json: annotation 2 of image 1: '
          'duplicate_annotation_id' in result.stderr), result.stderr[-3000:]
