"""COCO reading: every kind of bad input is either skipped and counted or a clear error."""
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from deepmarc_jax.data import coco_format

H, W = 40, 60
SQUARE = [[10, 10, 30, 10, 30, 30, 10, 30]]  # 20x20 polygon
CATEGORIES = [{'id': 1, 'name': 'person'}, {'id': 8, 'name': 'truck'}]


def _ann(ann_id, image_id, segmentation=None, bbox=(10, 10, 20, 20), category_id=1, iscrowd=0):
  return dict(id=ann_id, image_id=image_id, category_id=category_id, bbox=list(bbox),
              segmentation=SQUARE if segmentation is None else segmentation, iscrowd=iscrowd)


def _write_image(path, mode='RGB'):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 255, (H, W, 3), np.uint8)
  Image.fromarray(pixels).convert(mode).save(path)


def _dataset(tmp_path, images, annotations):
  (tmp_path / 'imgs').mkdir(exist_ok=True)
  path = tmp_path / 'instances.json'
  path.write_text(json.dumps({'images': images, 'annotations': annotations,
                              'categories': CATEGORIES}))
  return coco_format.CocoSplit(str(path), str(tmp_path / 'imgs'))


def _image(image_id, name, h=H, w=W):
  return {'id': image_id, 'file_name': name, 'height': h, 'width': w}


def _read(split, policy='skip'):
  stats = coco_format.ReadStats()
  return list(coco_format.read_coco_split(split, on_bad_input=policy, stats=stats)), stats


def test_rle_counts_round_trip_and_match_pycocotools():
  rng = np.random.default_rng(1)
  mask = (rng.random((7, 5)) > 0.5).astype(np.uint8)
  mask[0, 0] = 1  # starts with a one: needs a leading empty run
  counts = coco_format.rle_counts(mask)
  assert counts[0] == 0
  np.testing.assert_array_equal(coco_format.decode_rle_counts(counts, 7, 5), mask)
  rle = mask_utils.frPyObjects({'counts': counts.tolist(), 'size': [7, 5]}, 7, 5)
  np.testing.assert_array_equal(mask_utils.decode(rle), mask)


def test_good_inputs_polygons_multipolygon_crowd_gray_and_empty_images(tmp_path):
  _dataset(tmp_path, [], [])  # makes the image folder
  _write_image(tmp_path / 'imgs' / 'a.jpg')
  _write_image(tmp_path / 'imgs' / 'gray.png', mode='L')
  _write_image(tmp_path / 'imgs' / 'empty.jpg')
  crowd = np.zeros((H, W), np.uint8)
  crowd[0:5, 0:50] = 1
  crowd_rle = {'counts': coco_format.rle_counts(crowd).tolist(), 'size': [H, W]}
  multi = [[0, 0, 5, 0, 5, 5, 0, 5], [40, 30, 50, 30, 50, 38, 40, 38]]
  split = _dataset(tmp_path, [_image(1, 'a.jpg'), _image(2, 'gray.png'), _image(3, 'empty.jpg')],
                   [_ann(11, 1), _ann(12, 1, multi, bbox=(0, 0, 50, 38), category_id=8),
                    _ann(13, 1, crowd_rle, bbox=(0, 0, 50, 5), iscrowd=1),
                    _ann(21, 2)])
  examples, stats = _read(split, 'error')
  assert [i for i, _ in examples] == [1, 2, 3]
  assert stats.images == 3 and stats.instances == 4 and not stats.skipped
  objs = examples[0][1]['objects']
  assert objs['id'] == [11, 12, 13] and objs['is_crowd'] == [False, False, True]
  coco = mask_utils.frPyObjects(multi, H, W)
  expected_multi = mask_utils.decode(mask_utils.merge(coco))
  np.testing.assert_array_equal(coco_format.decode_rle_counts(objs['mask_rle'][1], H, W),
                                expected_multi)
  np.testing.assert_array_equal(coco_format.decode_rle_counts(objs['mask_rle'][2], H, W), crowd)
  np.testing.assert_allclose(objs['bbox'][0], [10 / H, 10 / W, 30 / H, 30 / W])
  gray = examples[1][1]['image']
  assert isinstance(gray, np.ndarray) and gray.shape == (H, W, 3)  # converted to RGB
  assert isinstance(examples[0][1]['image'], bytes)  # RGB JPEG passes through untouched
  assert len(examples[2][1]['objects']['id']) == 0


BAD_CASES = {
    # name: (images, annotations, expected reason, text the error must contain)
    'missing_image': ([_image(1, 'nope.jpg')], [], 'missing_image', 'image 1'),
    'unreadable_image': ([_image(1, 'corrupt.jpg')], [], 'unreadable_image', 'corrupt.jpg'),
    'image_size_mismatch': ([_image(1, 'ok.jpg', h=41)], [], 'image_size_mismatch', '41'),
    'unknown_category': ([_image(1, 'ok.jpg')], [_ann(5, 1, category_id=99)],
                         'unknown_category', 'annotation 5'),
    'degenerate_polygon': ([_image(1, 'ok.jpg')], [_ann(6, 1, [[1, 2, 3, 4]])],
                           'degenerate_polygon', 'annotation 6'),
    'degenerate_box': ([_image(1, 'ok.jpg')], [_ann(7, 1, bbox=(10, 10, 0, 5))],
                       'degenerate_box', 'annotation 7'),
    'malformed_box': ([_image(1, 'ok.jpg')], [_ann(8, 1, bbox=(1, 2, 3))],
                      'malformed_box', 'annotation 8'),
    'empty_mask': ([_image(1, 'ok.jpg')], [_ann(9, 1, [[100, 100, 120, 100, 120, 120]])],
                   'empty_mask', 'annotation 9'),
    'unknown_image_id': ([_image(1, 'ok.jpg')], [_ann(10, 77)], 'unknown_image_id', '77'),
    'rle_size_mismatch': ([_image(1, 'ok.jpg')],
                          [_ann(12, 1, {'counts': [5, 5], 'size': [H, W]})],
                          'rle_size_mismatch', 'annotation 12'),
}


@pytest.mark.parametrize('case', sorted(BAD_CASES))
def test_bad_input_is_skipped_and_counted_or_a_clear_error(tmp_path, case):
  images, annotations, reason, text = BAD_CASES[case]
  split = _dataset(tmp_path, images, annotations)
  _write_image(tmp_path / 'imgs' / 'ok.jpg')
  (tmp_path / 'imgs' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')

  examples, stats = _read(split, 'skip')
  assert stats.skipped == {reason: 1}
  kept_instances = sum(len(ex['objects']['id']) for _, ex in examples)
  assert kept_instances == 0  # the bad entry is gone, nothing silently wrong is kept

  with pytest.raises(coco_format.BadInputError) as err:
    _read(split, 'error')
  message = str(err.value)
  assert split.annotations in message and text in message and reason in message


def test_malformed_json_names_the_file(tmp_path):
  path = tmp_path / 'broken.json'
  path.write_text('{"images": [')
  with pytest.raises(coco_format.BadInputError, match='broken.json: not valid JSON'):
    _read(coco_format.CocoSplit(str(path), str(tmp_path)))
  path.write_text('{"images": [{"id": 1}], "categories": []}')
  with pytest.raises(coco_format.BadInputError, match=r"image entry 1 lacks \['file_name'"):
    _read(coco_format.CocoSplit(str(path), str(tmp_path)))
  with pytest.raises(coco_format.BadInputError, match='not found'):
    _read(coco_format.CocoSplit(str(tmp_path / 'absent.json'), str(tmp_path)))


def test_unknown_policy_is_rejected(tmp_path):
  split = _dataset(tmp_path, [], [])
  with pytest.raises(ValueError, match='skip'):
    _read(split, 'ignore')
