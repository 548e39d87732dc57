"""Masks from user boxes: box parsing, the segmenter against the model's own segment_boxes and
the eval pipeline, and segment.py end to end (outputs read back with pycocotools and PIL)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from deepmarc_jax.masks_from_boxes import boxes as boxes_lib
from deepmarc_jax.ops import masks as mask_ops
from tests.conftest import REPO

H, W = 100, 150  # a non-square test image, neither side a multiple of the model's stride


# ------------------------------------------------------------------ boxes


def test_the_three_formats_give_the_same_box():
  same = [('xyxy', [10, 20, 60, 90]), ('xywh', [10, 20, 50, 70]),
          ('yxyx_norm', [20 / H, 10 / W, 90 / H, 60 / W])]
  for box_format, numbers in same:
    (box,) = boxes_lib.interpret([numbers], box_format, H, W)
    assert box.problem is None and box.yxyx == pytest.approx((20, 10, 90, 60)), box_format


@pytest.mark.parametrize('numbers,problem', [
    ([1, 2, 3], 'expected 4 numbers'),
    (['a', 2, 3, 4], 'not numbers'),
    ([float('nan'), 2, 3, 4], 'not finite'),
    ([1, 2, float('inf'), 4], 'not finite'),
    ([50, 20, 10, 90], 'inverted'),
    ([10, 20, 10, 90], 'zero area'),
    ([200, 20, 300, 90], 'outside the 150x100 image'),
    ([-50, -50, -10, -10], 'outside'),
])
def test_unusable_boxes_say_why(numbers, problem):
  (box,) = boxes_lib.interpret([numbers], 'xyxy', H, W)
  assert not box.usable and problem in box.problem
  assert 'skipped' in boxes_lib.describe(box, 'xyxy')


def test_a_box_partly_outside_is_clipped_and_says_so():
  (box,) = boxes_lib.interpret([[-10, 50, 40, 130]], 'xyxy', H, W)
  assert box.yxyx == (50, 0, 100, 40) and 'clipped' in box.problem
  assert '-> x1,y1,x2,y2 = 0.0,50.0,40.0,100.0 px' in boxes_lib.describe(box, 'xyxy')


def test_negative_coco_sizes_and_bad_formats():
  (box,) = boxes_lib.interpret([[10, 10, -5, 5]], 'xywh', H, W)
  assert 'negative width' in box.problem
  with pytest.raises(boxes_lib.BoxInputError, match='allowed'):
    boxes_lib.interpret([[1, 2, 3, 4]], 'ltrb', H, W)


def test_inline_json_and_coco_sources(tmp_path):
  assert boxes_lib.parse_inline(' 1,2,3,4;5,6,7,8  9,10,11,12 ') == [
      ['1', '2', '3', '4'], ['5', '6', '7', '8'], ['9', '10', '11', '12']]
  with pytest.raises(boxes_lib.BoxInputError, match='no boxes'):
    boxes_lib.parse_inline('  ')
  mapping = {'a.png': [[1, 2, 3, 4], {'box': [5, 6, 7, 8], 'category_id': 3}]}
  assert boxes_lib.boxes_for_image(mapping, '/some/dir/a.png', single_image=False) == mapping[
      'a.png']
  assert boxes_lib.boxes_for_image(mapping, 'b.png', single_image=False) is None
  with pytest.raises(boxes_lib.BoxInputError, match='one image'):
    boxes_lib.boxes_for_image([[1, 2, 3, 4]], 'a.png', single_image=False)
  (_, with_class) = boxes_lib.interpret(mapping['a.png'], 'xyxy', H, W)
  assert with_class.category_id == 3 and with_class.yxyx == (6, 5, 8, 7)

  coco = {'images': [{'id': 7, 'file_name': 'x.jpg'}, {'id': 9, 'file_name': 'y.jpg'}],
          'annotations': [{'image_id': 7, 'bbox': [1, 2, 3, 4], 'category_id': 5}]}
  (tmp_path / 'coco.json').write_text(json.dumps(coco))
  assert boxes_lib.read_coco(str(tmp_path / 'coco.json')) == {
      'x.jpg': [{'box': [1, 2, 3, 4], 'category_id': 5}], 'y.jpg': []}
  (tmp_path / 'bad.json').write_text('{"images": [}')
  with pytest.raises(boxes_lib.BoxInputError, match='cannot read'):
    boxes_lib.read_json(str(tmp_path / 'bad.json'))
  coco['annotations'][0]['image_id'] = 8
  (tmp_path / 'orphan.json').write_text(json.dumps(coco))
  with pytest.raises(boxes_lib.BoxInputError, match='names no listed image'):
    boxes_lib.read_coco(str(tmp_path / 'orphan.json'))


# ------------------------------------------------------------------ the segmenter


@pytest.fixture(scope='module')
def segmenter(tiny_workdir):
  from deepmarc_jax.masks_from_boxes import segmenter as segmenter_lib  # pylint: disable=g-import-not-at-top
  return segmenter_lib.Segmenter.from_workdir(str(tiny_workdir))


@pytest.fixture(scope='module', params=['mask_rcnn', 'deepmac'])
def any_segmenter(request):
  """The segmenter of a Deep-MARC and of a Deep-MAC run's workdir."""
  from deepmarc_jax.masks_from_boxes import segmenter as segmenter_lib  # pylint: disable=g-import-not-at-top
  name = 'tiny_workdir' if request.param == 'mask_rcnn' else 'deepmac_tiny_workdir'
  return segmenter_lib.Segmenter.from_workdir(str(request.getfixturevalue(name)))


def _image(seed=0):
  return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def test_encode_once_equals_the_models_segment_boxes(any_segmenter):
  """Two steps (backbone once, then any number of boxes, padded to a bucket) compute what the
  model's segment_boxes computes in one, on the eval pipeline's input image (both
  meta-architectures)."""
  segmenter = any_segmenter
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  image = _image()
  boxes = np.array([[10, 20, 60, 90], [0, 0, 100, 150], [40, 100, 95, 149]], np.float64)
  encoded = segmenter.encode(image)
  assert encoded.scale == pytest.approx(segmenter.image_size / W)
  ours = segmenter.box_masks(encoded, boxes)
  inputs, scale = pipeline.preprocess_image(tf.constant(image), segmenter.image_size)
  reference = segmenter.model.apply(
      segmenter.variables, jnp.asarray(inputs.numpy()[None]),
      jnp.asarray(boxes[None] * float(scale), jnp.float32), None,
      method='segment_boxes')
  np.testing.assert_allclose(ours, np.asarray(reference[0]), rtol=1e-4, atol=1e-5)
  # Another bucket (9 boxes -> 16 slots): the same masks for the same boxes.
  more = segmenter.box_masks(encoded, np.concatenate([boxes] * 3))
  np.testing.assert_allclose(more[:3], ours, rtol=1e-4, atol=1e-5)
  assert ours.std() > 0.01  # the test would pass on a constant (saturated) model otherwise


def test_preprocess_image_is_the_eval_pipelines(coco_mini_seg_builder):
  """The image the segmenter feeds equals the eval pipeline's, pixel for pixel."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = ml_collections.ConfigDict(dict(
      tfds_name='coco_instances/coco_mini_seg', data_dir=None, manual_dir=None,
      train_split='train', eval_split='validation', image_size=256, max_instances=40,
      mask_size=16, hflip=True, scale_jitter=(1.0, 1.0), mask_classes='voc',
      shuffle_buffer=8, on_bad_input='skip'))
  batch = next(iter(tfds.as_numpy(pipeline.eval_dataset(data, coco_mini_seg_builder,
                                                        batch_size=4))))
  originals = {int(ex['image/id']): ex['image'] for ex in tfds.as_numpy(
      coco_mini_seg_builder.as_dataset(split='validation'))}
  for image_id, expected, info in zip(batch['image_id'], batch['image'], batch['image_info']):
    image, scale = pipeline.preprocess_image(tf.constant(originals[int(image_id)]), 256)
    np.testing.assert_array_equal(image.numpy(), expected)
    assert float(scale) == pytest.approx(info[2])


def test_variables_of_another_model_are_refused_naming_the_folder(tiny_workdir, tmp_path):
  from deepmarc_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.masks_from_boxes import segmenter as segmenter_lib  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  good = segmenter_lib.Segmenter.from_workdir(str(tiny_workdir))
  checkpoint.save_variables(good.variables, str(tmp_path / 'converted'))
  same = segmenter_lib.Segmenter.from_variables(tiny.config(), str(tmp_path / 'converted'))
  image, box = _image(1), np.array([[5, 5, 80, 120]])
  np.testing.assert_array_equal(same.box_masks(same.encode(image), box),
                                good.box_masks(good.encode(image), box))
  with pytest.raises(segmenter_lib.CheckpointMismatchError, match=str(tmp_path / 'converted')):
    segmenter_lib.Segmenter.from_variables(tiny.config(type='default'),
                                           str(tmp_path / 'converted'))
  config = json.loads((tiny_workdir / 'config.json').read_text())
  config['model']['mask_head']['type'] = 'default'
  other = tmp_path / 'edited'
  other.mkdir()
  (other / 'config.json').write_text(json.dumps(config))
  (other / 'checkpoints').symlink_to(tiny_workdir / 'checkpoints')
  with pytest.raises(segmenter_lib.CheckpointMismatchError, match='does not fit its config'):
    segmenter_lib.Segmenter.from_workdir(str(other))


# ------------------------------------------------------------------ segment.py end to end


def _segment(*args):
  return subprocess.run([sys.executable, str(REPO / 'segment.py'), *args], capture_output=True,
                        text=True, timeout=600, check=False)


def test_segment_command_end_to_end(tiny_workdir, segmenter, tmp_path):
  """Two images (one of them not an image), five boxes (two unusable): the usable ones give
  masks whose RLE, label PNG and probabilities agree with each other and with an independent
  paste of the segmenter's box masks; the bad inputs are reported and the rest still runs."""
  Image.fromarray(_image()).save(tmp_path / 'shapes.png')
  (tmp_path / 'notes.png').write_text('not an image')
  boxes = {'shapes.png': [[20, 10, 90, 60], [0, 0, 150, 100], [1, 2, 3, float('nan')],
                          [30, 40, 20, 50], [100, 30, 170, 95]],
           'notes.png': [[0, 0, 10, 10]]}
  (tmp_path / 'boxes.json').write_text(json.dumps(boxes))
  out = tmp_path / 'out'
  result = _segment(f'--workdir={tiny_workdir}', f'--images={tmp_path / "shapes.png"},'
                    f'{tmp_path / "notes.png"}', f'--boxes={tmp_path / "boxes.json"}',
                    f'--out_dir={out}', '--save_probabilities')
  assert result.returncode == 1, result.stderr[-3000:]  # one image failed
  log = result.stdout
  assert 'notes.png: skipped' in log and 'not a readable image' in log
  assert '3: xyxy [1,2,3,nan]: skipped, not finite' in log
  assert '4: xyxy [30,40,20,50]: skipped, inverted' in log
  assert '5: xyxy [100,30,170,95] -> x1,y1,x2,y2 = 100.0,30.0,150.0,95.0 px (partly outside' in log
  assert '1 image(s) segmented, 3 mask(s); 2 box(es) skipped, 1 image(s) failed' in log

  saved = np.load(out / 'shapes_probabilities.npz')
  numbers = [1, 2, 5]
  np.testing.assert_array_equal(saved['numbers'], numbers)
  expected_boxes = np.array([[10, 20, 60, 90], [0, 0, 100, 150], [30, 100, 95, 150]], np.float64)
  np.testing.assert_allclose(saved['boxes_yxyx'], expected_boxes)
  box_masks = segmenter.box_masks(segmenter.encode(_image()), expected_boxes)
  np.testing.assert_allclose(saved['box_masks'], box_masks, rtol=1e-4, atol=1e-5)
  pasted = np.stack([mask_ops.paste_box_mask(m, b, H, W) for m, b in zip(box_masks,
                                                                           expected_boxes)])
  threshold = segmenter.mask_threshold

  results = json.loads((out / 'results.json').read_text())
  assert [r['bbox'] for r in results] == [[20, 10, 70, 50], [0, 0, 150, 100], [100, 30, 50, 65]]
  assert all(r['image_id'] == 1 and r['category_id'] == 1 for r in results)
  for r, p in zip(results, pasted):
    decoded = mask_util.decode({'size': r['segmentation']['size'],
                                'counts': r['segmentation']['counts'].encode()})
    assert decoded.shape == (H, W)
    np.testing.assert_array_equal(decoded.astype(bool), p >= threshold)
    expected_score = float(p[p >= threshold].mean()) if (p >= threshold).any() else 0.0
    assert r['score'] == pytest.approx(expected_score, rel=1e-5)
  assert any(0 < (p >= threshold).mean() < 1 for p in pasted)  # masks neither empty nor full

  labels = np.asarray(Image.open(out / 'shapes_labels.png'))
  assert labels.shape == (H, W) and set(np.unique(labels)) <= {0, *numbers}
  covered = pasted >= threshold
  only = covered.sum(0) == 1
  np.testing.assert_array_equal(labels[only], np.asarray(numbers)[covered.argmax(0)][only])
  assert (labels[covered.sum(0) == 0] == 0).all()
  both = covered.sum(0) > 1
  np.testing.assert_array_equal(labels[both], np.asarray(numbers)[pasted.argmax(0)][both])
  assert np.asarray(Image.open(out / 'shapes_overlay.png')).shape == (H, W, 3)


@pytest.mark.parametrize('args,message', [
    ([], 'give --workdir'),
    (['--workdir=W', '--images=a.png'], 'give --images and --boxes'),
    (['--workdir=W', '--images=a.png,b.png', '--boxes=1,2,3,4'], 'a list of boxes is for one image'),
    (['--workdir=/nonexistent', '--images=a.png', '--boxes=1,2,3,4'], 'not a run.py workdir'),
])
def test_segment_command_refuses_bad_arguments_in_one_line(args, message):
  result = _segment(*args)
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 2 and last.startswith('FATAL: ') and message in last


def test_boxes_are_finite_numbers_not_strings_after_parsing():
  # Inline boxes arrive as strings; interpretation must convert them, not compare strings.
  (box,) = boxes_lib.interpret(boxes_lib.parse_inline('2,10,12,30'), 'xyxy', H, W)
  assert box.yxyx == (10.0, 2.0, 30.0, 12.0) and all(isinstance(v, float) for v in box.yxyx)
  assert not math.isnan(box.yxyx[0])


def test_an_image_whose_boxes_are_all_unusable_still_gets_empty_outputs(tiny_workdir, tmp_path):
  Image.fromarray(_image()).save(tmp_path / 'a.png')
  out = tmp_path / 'out'
  result = _segment(f'--workdir={tiny_workdir}', f'--images={tmp_path / "a.png"}',
                    '--boxes=300,300,400,400', f'--out_dir={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert '1: xyxy [300,300,400,400]: skipped, outside the 150x100 image' in result.stdout
  assert json.loads((out / 'results.json').read_text()) == []
  assert not np.asarray(Image.open(out / 'a_labels.png')).any()
