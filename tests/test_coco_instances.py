"""The TFDS builder, built offline from real COCO data (coco_mini_seg) and from generated data."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from deepmarc_jax.data import coco_format
from deepmarc_jax.data import groundtruth
from deepmarc_jax.data.coco_instances import CocoInstances
from deepmarc_jax.data.coco_instances import CocoInstancesConfig

SPLIT_FILES = {'train': 'instances_train2017_coco128.json',
               'validation': 'instances_val2017_subset10.json'}


def _prepare(builder, manual_dir=None):
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir) if manual_dir else None, try_download_gcs=False))
  return builder


def test_coco_mini_seg_builds_both_splits(coco_mini_seg_builder):
  info = coco_mini_seg_builder.info
  assert info.splits['train'].num_examples == 128
  assert info.splits['validation'].num_examples == 10
  stats = info.metadata['read_stats']
  assert stats['train'] == {'images': 128, 'instances': 929, 'skipped': {}, 'image_entries': 128,
                            'annotation_entries': 929, 'annotations_of_skipped_images': 0,
                            'labelled': True}
  assert stats['validation'] == {'images': 10, 'instances': 77, 'skipped': {},
                                 'image_entries': 10, 'annotation_entries': 77,
                                 'annotations_of_skipped_images': 0, 'labelled': True}
  assert len(info.metadata['categories']) == 80


@pytest.mark.parametrize('split', ['validation', pytest.param('train', marks=pytest.mark.slow)])
def test_stored_instances_equal_pycocotools_decoding(coco_mini_seg_builder, coco_mini_seg_dir,
                                                     split):
  """Every stored mask/box/area/crowd flag equals what pycocotools reads from the JSON."""
  coco = COCO(str(coco_mini_seg_dir / 'annotations' / SPLIT_FILES[split]))
  gt = groundtruth.coco_groundtruth(coco_mini_seg_builder, split)
  assert sorted(im['id'] for im in gt['images']) == sorted(coco.getImgIds())
  for image in gt['images']:
    ref = coco.imgs[image['id']]
    assert (image['height'], image['width']) == (ref['height'], ref['width'])
  assert len(gt['annotations']) == len(coco.anns)
  for ann in gt['annotations']:
    ref = coco.anns[ann['id']]
    np.testing.assert_allclose(ann['bbox'], ref['bbox'], atol=1e-3)
    assert ann['area'] == pytest.approx(ref['area'], rel=1e-6)
    assert ann['iscrowd'] == ref['iscrowd'] and ann['category_id'] == ref['category_id']
    rle = dict(ann['segmentation'], counts=ann['segmentation']['counts'].encode())
    np.testing.assert_array_equal(mask_utils.decode(rle), coco.annToMask(ref))


def _tiny_coco_dir(root, split='foo', gray=True):
  """A COCO-layout folder: one RGB image with two instances, one grayscale without any."""
  (root / 'annotations').mkdir(parents=True)
  (root / split).mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(root / split / 'a.jpg')
  Image.fromarray(rng.integers(0, 255, (20, 20), np.uint8)).save(root / split / 'g.jpg')
  images = [{'id': 1, 'file_name': 'a.jpg', 'height': 30, 'width': 40}]
  if gray:
    images.append({'id': 2, 'file_name': 'g.jpg', 'height': 20, 'width': 20})
  square = [[5, 5, 15, 5, 15, 15, 5, 15]]
  anns = [{'id': 1, 'image_id': 1, 'category_id': 3, 'bbox': [5, 5, 10, 10], 'iscrowd': 0,
           'segmentation': square},
          {'id': 2, 'image_id': 1, 'category_id': 1, 'bbox': [0, 0, 0, 4], 'iscrowd': 0,
           'segmentation': square}]  # zero-size box
  (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(
      {'images': images, 'annotations': anns,
       'categories': [{'id': 1, 'name': 'person'}, {'id': 3, 'name': 'car'}]}))


def test_custom_config_discovers_splits_and_applies_the_bad_input_policy(tmp_path):
  _tiny_coco_dir(tmp_path / 'raw')
  builder = _prepare(CocoInstances(config='custom', data_dir=str(tmp_path / 'tfds')),
                     tmp_path / 'raw')
  assert builder.info.splits['foo'].num_examples == 2
  assert builder.info.metadata['read_stats']['foo']['skipped'] == {'degenerate_box': 1}
  examples = {int(ex['image/id']): ex for ex in tfds.as_numpy(builder.as_dataset(split='foo'))}
  assert examples[2]['image'].shape == (20, 20, 3)  # grayscale stored as RGB
  assert len(examples[2]['objects']['category_id']) == 0
  assert examples[1]['objects']['category_id'].tolist() == [3]

  strict = CocoInstances(config='custom', data_dir=str(tmp_path / 'strict'), on_bad_input='error')
  with pytest.raises(coco_format.BadInputError, match='annotation 2 of image 1'):
    _prepare(strict, tmp_path / 'raw')


def test_coco2017_builds_from_the_official_zips(tmp_path, coco_mini_seg_dir):
  """The official archive layout, with a few real images standing in for COCO 2017."""
  manual = tmp_path / 'manual'
  manual.mkdir()
  val = json.loads((coco_mini_seg_dir / 'annotations' / SPLIT_FILES['validation']).read_text())
  train = json.loads((coco_mini_seg_dir / 'annotations' / SPLIT_FILES['train']).read_text())
  train['images'] = train['images'][:3]
  keep = {im['id'] for im in train['images']}
  train['annotations'] = [a for a in train['annotations'] if a['image_id'] in keep]
  with zipfile.ZipFile(manual / 'annotations_trainval2017.zip', 'w') as z:
    z.writestr('annotations/instances_train2017.json', json.dumps(train))
    z.writestr('annotations/instances_val2017.json', json.dumps(val))
  for name, data in (('train2017', train), ('val2017', val)):
    with zipfile.ZipFile(manual / f'{name}.zip', 'w') as z:
      for im in data['images']:
        src = coco_mini_seg_dir / name / im['file_name']
        z.write(src, f'{name}/{im["file_name"]}')
  builder = _prepare(CocoInstances(config='coco2017', data_dir=str(tmp_path / 'tfds')), manual)
  assert builder.info.splits['train'].num_examples == 3
  assert builder.info.splits['validation'].num_examples == 10
  assert builder.info.metadata['read_stats']['validation']['instances'] == 77


def test_coco2017_without_files_says_what_is_missing(tmp_path):
  builder = CocoInstances(config='coco2017', data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(FileNotFoundError, match='annotations_trainval2017.zip'):
    _prepare(builder, tmp_path)


def test_shapes_builds_through_the_same_builder(tmp_path):
  config = CocoInstancesConfig(name='shapes_tiny', synthetic=dict(
      splits={'train': 6, 'validation': 3}, image_size=64, seed=3))
  builder = _prepare(CocoInstances(config=config, data_dir=str(tmp_path)))
  assert builder.info.splits['train'].num_examples == 6
  ids = {c['id'] for c in builder.info.metadata['categories']}
  assert ids == {1, 2, 3, 4, 5, 8, 10, 11, 13, 14}
  stats = builder.info.metadata['read_stats']['validation']
  assert stats['images'] == 3 and stats['instances'] > 0 and stats['skipped'] == {}


def test_tfds_command_line_builds_the_dataset_and_chooses_the_bad_input_policy(tmp_path):
  """`tfds build coco_instances --imports=deepmarc_jax.data.coco_instances --config=custom
  --manual_dir=...`: TFDS's own command line finds the registered builder by name, skips and
  logs the bad annotation; `coco_instances/custom/on_bad_input=error` (builder keyword
  arguments in the name, the TFDS way) stops on it instead."""
  _tiny_coco_dir(tmp_path / 'raw', split='train', gray=False)
  tfds_cli = shutil.which('tfds', path=os.path.dirname(sys.executable))
  assert tfds_cli, 'the tfds command line is not installed'

  # This checkout's code, not whichever one the virtual environment has installed.
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (repo, os.environ.get('PYTHONPATH')) if p))

  def build(name, *args, data_dir):
    return subprocess.run(
        [tfds_cli, 'build', name, '--imports=deepmarc_jax.data.coco_instances', *args,
         f'--manual_dir={tmp_path / "raw"}', f'--data_dir={tmp_path / data_dir}'],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)

  result = build('coco_instances', '--config=custom', data_dir='tfds')
  assert result.returncode == 0, result.stderr[-3000:]
  info = tfds.builder_from_directory(str(tmp_path / 'tfds' / 'coco_instances' / 'custom' /
                                         str(CocoInstances.VERSION))).info
  assert info.splits['train'].num_examples == 1
  assert ('instances_train.json: kept 1 of 1 images and 1 of 2 annotations; skipped 1 '
          'annotations: 1 degenerate_box') in result.stdout, result.stdout[-3000:]

  result = build('coco_instances/custom/on_bad_input=error', data_dir='strict')
  assert result.returncode != 0
  output = result.stdout + result.stderr
  assert 'instances_train.json: annotation 2 of image 1: degenerate_box' in output, output[-3000:]
  assert not (tmp_path / 'strict' / 'coco_instances' / 'custom' /
              str(CocoInstances.VERSION)).exists()
