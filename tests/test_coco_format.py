"""COCO reading: every kind of bad input is either skipped and counted or a clear error."""
import io
import json
import logging
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from PIL import ImageFile
from pycocotools import mask as mask_utils

from deepmarc_jax.data import coco_format

H, W = 40, 60
SQUARE = [[10, 10, 30, 10, 30, 30, 10, 30]]  # 20x20 polygon
CATEGORIES = [{'id': 1, 'name': 'person'}, {'id': 8, 'name': 'truck'}]
GOOD_ID = 100  # every _dataset has image 100 ('good.jpg') with annotation 100


def _ann(ann_id, image_id, segmentation=None, bbox=(10, 10, 20, 20), category_id=1, iscrowd=0):
  return dict(id=ann_id, image_id=image_id, category_id=category_id, bbox=list(bbox),
              segmentation=SQUARE if segmentation is None else segmentation, iscrowd=iscrowd)


def _write_image(path, mode='RGB'):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 255, (H, W, 3), np.uint8)
  Image.fromarray(pixels).convert(mode).save(path)


def _dataset(tmp_path, images, annotations, good=True, fields=None):
  """A split of `images` + `annotations`; `good` puts a usable image and annotation first;
  `fields` overrides JSON keys (None: leave the key out)."""
  (tmp_path / 'imgs').mkdir(exist_ok=True)
  if good:
    _write_image(tmp_path / 'imgs' / 'good.jpg')
    images = [_image(GOOD_ID, 'good.jpg')] + images
    annotations = [_ann(GOOD_ID, GOOD_ID)] + annotations
  path = tmp_path / 'instances.json'
  data = {'images': images, 'annotations': annotations, 'categories': CATEGORIES}
  data.update(fields or {})
  path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
  return coco_format.CocoSplit(str(path), str(tmp_path / 'imgs'))


def _image(image_id, name, h=H, w=W):
  return {'id': image_id, 'file_name': name, 'height': h, 'width': w}


def _read(split, policy='skip', **kwargs):
  stats = coco_format.ReadStats()
  examples = list(coco_format.read_coco_split(split, on_bad_input=policy, stats=stats, **kwargs))
  # Every entry of the JSON is accounted for: kept or skipped.
  assert stats.image_entries == stats.images + sum(stats.skipped_images.values())
  assert stats.annotation_entries == (stats.instances + sum(stats.skipped_annotations.values())
                                      + stats.annotations_of_skipped_images)
  return examples, stats


def _kept_ids(examples):
  return sorted(int(i) for _, ex in examples for i in ex['objects']['id'])


def blocks(h, w, seed=0):
  """An RGB image of flat 8x8 colour blocks: JPEG keeps it within a few levels."""
  rng = np.random.default_rng(seed)
  colours = rng.integers(0, 256, (-(-h // 8), -(-w // 8), 3), np.uint8)
  return np.repeat(np.repeat(colours, 8, 0), 8, 1)[:h, :w]


def png_header(path, height, width):
  """A PNG whose header claims height x width (8-bit gray) and whose data is a few bytes."""
  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr)
                   + chunk(b'IDAT', zlib.compress(b'\0' * 16)) + chunk(b'IEND', b''))


def jpeg_header(path, height, width):
  """A small baseline JPEG whose frame header (SOF0) is patched to claim height x width."""
  buf = io.BytesIO()
  Image.fromarray(blocks(16, 16)).save(buf, 'JPEG')
  data = bytearray(buf.getvalue())
  sof = data.index(b'\xff\xc0')
  data[sof + 5:sof + 9] = struct.pack('>HH', height, width)
  path.write_bytes(bytes(data))


def test_rle_counts_round_trip_and_match_pycocotools():
  rng = np.random.default_rng(1)
  mask = (rng.random((7, 5)) > 0.5).astype(np.uint8)
  mask[0, 0] = 1  # starts with a one: needs a leading empty run
  counts = coco_format.rle_counts(mask)
  assert counts[0] == 0
  np.testing.assert_array_equal(coco_format.decode_rle_counts(counts, 7, 5), mask)
  rle = mask_utils.frPyObjects({'counts': counts.tolist(), 'size': [7, 5]}, 7, 5)
  np.testing.assert_array_equal(mask_utils.decode(rle), mask)


def test_compressed_rle_strings_parse_as_pycocotools_writes_them():
  rng = np.random.default_rng(2)
  for shape, p in (((7, 5), 0.5), ((40, 60), 0.97), ((13, 11), 0.02), ((300, 200), 0.999)):
    mask = (rng.random(shape) > p).astype(np.uint8)
    encoded = mask_utils.encode(np.asfortranarray(mask))['counts']
    counts = coco_format.compressed_rle_counts(encoded.decode('ascii'))
    np.testing.assert_array_equal(coco_format.decode_rle_counts(np.array(counts), *shape), mask)
  assert coco_format.compressed_rle_counts('0') == [0]
  assert coco_format.compressed_rle_counts('o') is None  # ends inside a number
  assert coco_format.compressed_rle_counts('0~') is None  # not a counts character


def test_good_inputs_polygons_multipolygon_crowd_rle_gray_and_empty_images(tmp_path):
  _dataset(tmp_path, [], [], good=False)  # makes the image folder
  _write_image(tmp_path / 'imgs' / 'a.jpg')
  _write_image(tmp_path / 'imgs' / 'gray.png', mode='L')
  _write_image(tmp_path / 'imgs' / 'empty.jpg')
  crowd = np.zeros((H, W), np.uint8)
  crowd[0:5, 0:50] = 1
  crowd_rle = {'counts': coco_format.rle_counts(crowd).tolist(), 'size': [H, W]}
  blob = np.zeros((H, W), np.uint8)
  blob[20:35, 40:55] = 1
  blob[25:30, 45:50] = 0
  compressed = mask_utils.encode(np.asfortranarray(blob))
  compressed = {'size': [H, W], 'counts': compressed['counts'].decode('ascii')}
  multi = [[0, 0, 5, 0, 5, 5, 0, 5], [40, 30, 50, 30, 50, 38, 40, 38], [1, 1, 2, 2]]
  split = _dataset(tmp_path, [_image(1, 'a.jpg'), _image(2, 'gray.png'), _image(3, 'empty.jpg')],
                   [_ann(11, 1), _ann(12, 1, multi, bbox=(0, 0, 50, 38), category_id=8),
                    _ann(13, 1, crowd_rle, bbox=(0, 0, 50, 5), iscrowd=1),
                    _ann(14, 1, compressed, bbox=(40, 20, 15, 15)),
                    _ann(15, 1, bbox=(-5, 30, 20, 20)),  # partly outside: clipped
                    _ann(21, 2)], good=False)
  examples, stats = _read(split, 'error')
  assert [i for i, _ in examples] == [1, 2, 3]
  assert stats.images == 3 and stats.instances == 6 and not stats.skipped
  objs = examples[0][1]['objects']
  assert objs['id'] == [11, 12, 13, 14, 15] and objs['is_crowd'] == [False] * 2 + [True, False,
                                                                                   False]
  coco = mask_utils.frPyObjects(multi[:2], H, W)  # the 2-point part encloses nothing
  expected_multi = mask_utils.decode(mask_utils.merge(coco))
  np.testing.assert_array_equal(coco_format.decode_rle_counts(objs['mask_rle'][1], H, W),
                                expected_multi)
  np.testing.assert_array_equal(coco_format.decode_rle_counts(objs['mask_rle'][2], H, W), crowd)
  np.testing.assert_array_equal(coco_format.decode_rle_counts(objs['mask_rle'][3], H, W), blob)
  np.testing.assert_allclose(objs['bbox'][0], [10 / H, 10 / W, 30 / H, 30 / W])
  np.testing.assert_allclose(objs['bbox'][4], [30 / H, 0, 1, 15 / W])  # clipped to the image
  gray = examples[1][1]['image']
  assert isinstance(gray, np.ndarray) and gray.shape == (H, W, 3)  # converted to RGB
  assert isinstance(examples[0][1]['image'], bytes)  # RGB JPEG passes through untouched
  assert len(examples[2][1]['objects']['id']) == 0


def write_image_variants(folder, h, w):
  """Writes palette, gray, gray+alpha, bilevel, RGBA, CMYK JPEG, progressive JPEG, EXIF-rotated
  JPEG and 16-bit PNG images of h x w into `folder`; returns {file: (expected RGB pixels,
  tolerance)}: the pixels as stored (COCO does not apply EXIF orientation), alpha dropped,
  16 bits scaled to 8 (high byte), within a few levels for the lossy JPEGs."""
  rng = np.random.default_rng(3)
  rgb = blocks(h, w)
  gray = rng.integers(0, 256, (h, w), np.uint8)
  index = rng.integers(0, 256, (h, w), np.uint8)
  palette = rng.integers(0, 256, (256, 3), np.uint8)
  deep = rng.integers(0, 65536, (h, w), np.uint16)
  bits = rng.random((h, w)) > 0.5
  alpha = rng.integers(0, 256, (h, w, 1), np.uint8)
  paletted = Image.fromarray(index, 'P')
  paletted.putpalette(palette.ravel().tolist())
  paletted.save(folder / 'palette.png')
  Image.fromarray(gray).save(folder / 'gray.png')
  Image.fromarray(np.dstack([gray, alpha]), 'LA').save(folder / 'gray_alpha.png')
  Image.fromarray(bits).save(folder / 'bilevel.png')
  Image.fromarray(np.concatenate([rgb, alpha], -1), 'RGBA').save(folder / 'rgba.png')
  Image.fromarray(rgb).convert('CMYK').save(folder / 'cmyk.jpg', quality=100)
  Image.fromarray(rgb).save(folder / 'progressive.jpg', quality=100, subsampling=0,
                            progressive=True)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  Image.fromarray(rgb).save(folder / 'exif6.jpg', quality=100, subsampling=0, exif=exif)
  Image.fromarray(deep).save(folder / 'sixteen.png')
  with Image.open(folder / 'sixteen.png') as img:
    assert img.mode == 'I;16'
  with Image.open(folder / 'progressive.jpg') as img:
    assert img.info.get('progressive')
  with Image.open(folder / 'exif6.jpg') as img:
    assert img.getexif()[0x0112] == 6
  with Image.open(folder / 'cmyk.jpg') as img:
    assert img.mode == 'CMYK'
  return {
      'palette.png': (palette[index], 0),
      'gray.png': (np.dstack([gray] * 3), 0),
      'gray_alpha.png': (np.dstack([gray] * 3), 0),
      'bilevel.png': (np.dstack([bits * np.uint8(255)] * 3), 0),
      'rgba.png': (rgb, 0),  # alpha dropped, not composited
      'cmyk.jpg': (rgb, 4),
      'progressive.jpg': (rgb, 4),
      'exif6.jpg': (rgb, 4),  # not rotated
      'sixteen.png': (np.dstack([(deep >> 8).astype(np.uint8)] * 3), 0),  # scaled, not clipped
  }


def test_image_modes_decode_to_the_stored_pixels_as_rgb(tmp_path):
  _dataset(tmp_path, [], [], good=False)
  h, w = 32, 48
  expected = write_image_variants(tmp_path / 'imgs', h, w)
  names = sorted(expected)
  split = _dataset(tmp_path, [_image(i + 1, n, h, w) for i, n in enumerate(names)],
                   [_ann(i + 1, i + 1) for i in range(len(names))], good=False)
  examples, stats = _read(split, 'error')
  assert stats.images == len(names) and not stats.skipped
  for name, (_, ex) in zip(names, examples):
    pixels, tolerance = expected[name]
    image = ex['image']
    if isinstance(image, bytes):  # RGB JPEGs pass through: decoded as stored (no EXIF turn)
      assert name in ('progressive.jpg', 'exif6.jpg')
      image = np.asarray(Image.open(io.BytesIO(image)))
    assert image.dtype == np.uint8 and image.shape == (h, w, 3), name
    diff = np.abs(image.astype(int) - pixels.astype(int)).max()
    assert diff <= tolerance, (name, diff)
  sixteen = examples[names.index('sixteen.png')][1]['image']
  assert (sixteen == 255).mean() < 0.01  # clipping made ~all of it white


BAD_CASES = {
    # name: (images, annotations, expected reason, texts the error must contain)
    'missing_image': ([_image(1, 'nope.jpg')], [_ann(2, 1)], 'missing_image', ['image 1']),
    'unreadable_image': ([_image(1, 'corrupt.jpg')], [], 'unreadable_image', ['corrupt.jpg']),
    'image_size_mismatch': ([_image(1, 'ok.jpg', h=41)], [], 'image_size_mismatch', ['41']),
    'exif_turned_size': ([_image(1, 'exif6.jpg', h=W, w=H)], [], 'image_size_mismatch',
                         ['EXIF orientation 6', 'as stored']),
    'image_too_large': ([_image(1, 'bomb.png', h=10000, w=10000)], [_ann(2, 1)],
                        'image_too_large', ['image 1', 'bomb.png', '100,000,000 pixels']),
    'decompression_bomb_error': ([_image(1, 'huge.png', h=30000, w=30000)], [],
                                 'image_too_large', ['huge.png', 'decompression bomb']),
    'jpeg_bomb': ([_image(1, 'bomb.jpg', h=10000, w=10000)], [], 'image_too_large',
                  ['bomb.jpg']),
    'unsupported_image_mode': ([_image(1, 'float.tif')], [], 'unsupported_image_mode',
                               ["'F'", 'float.tif']),
    'unknown_category': ([_image(1, 'ok.jpg')], [_ann(5, 1, category_id=99)],
                         'unknown_category', ['annotation 5', '99']),
    'degenerate_polygon': ([_image(1, 'ok.jpg')], [_ann(6, 1, [[1, 2, 3, 4]])],
                           'degenerate_polygon', ['annotation 6', '3 or more points']),
    'nan_polygon': ([_image(1, 'ok.jpg')], [_ann(6, 1, [[10, 10, 30, float('nan'), 30, 30]])],
                    'non_finite_coordinates', ['annotation 6', 'polygon 0 has nan at index 3']),
    'infinite_polygon': ([_image(1, 'ok.jpg')],
                         [_ann(6, 1, [SQUARE[0], [0, 0, float('inf'), 0, 5, 5]])],
                         'non_finite_coordinates', ['annotation 6', 'polygon 1 has inf']),
    'malformed_polygon': ([_image(1, 'ok.jpg')], [_ann(6, 1, [[10, 10, 30, 10, 30]])],
                          'malformed_polygon', ['annotation 6', 'odd number']),
    'polygon_out_of_range': ([_image(1, 'ok.jpg')], [_ann(6, 1, [[10, 10, 1e12, 10, 30, 30]])],
                             'polygon_out_of_range', ['annotation 6', 'outside']),
    'degenerate_box': ([_image(1, 'ok.jpg')], [_ann(7, 1, bbox=(10, 10, 0, 5))],
                       'degenerate_box', ['annotation 7']),
    'box_outside_image': ([_image(1, 'ok.jpg')], [_ann(7, 1, bbox=(61, 10, 20, 20))],
                          'box_outside_image', ['annotation 7', 'wholly outside']),
    'nan_box': ([_image(1, 'ok.jpg')], [_ann(7, 1, bbox=(10, float('nan'), 20, 20))],
                'non_finite_coordinates', ['annotation 7', 'nan']),
    'infinite_box': ([_image(1, 'ok.jpg')], [_ann(7, 1, bbox=(10, 10, float('inf'), 20))],
                     'non_finite_coordinates', ['annotation 7', 'inf']),
    'malformed_box': ([_image(1, 'ok.jpg')], [_ann(8, 1, bbox=(1, 2, 3))],
                      'malformed_box', ['annotation 8']),
    'malformed_iscrowd': ([_image(1, 'ok.jpg')], [_ann(8, 1, iscrowd='1')],
                          'malformed_iscrowd', ['annotation 8']),
    'empty_mask': ([_image(1, 'ok.jpg')], [_ann(9, 1, [[70, 50, 80, 50, 80, 60]])],
                   'empty_mask', ['annotation 9']),
    'unknown_image_id': ([_image(1, 'ok.jpg')], [_ann(10, 77)], 'unknown_image_id', ['77']),
    'missing_annotation_id': ([_image(1, 'ok.jpg')],
                              [{k: v for k, v in _ann(0, 1).items() if k != 'id'}],
                              'missing_annotation_id', ['annotation entry #1', 'None']),
    'duplicate_annotation_id': ([_image(1, 'ok.jpg')], [_ann(GOOD_ID, 1)],
                                'duplicate_annotation_id',
                                ['annotation 100 of image 1', f'annotation of image {GOOD_ID}']),
    'rle_size_mismatch': ([_image(1, 'ok.jpg')],
                          [_ann(12, 1, {'counts': [5, 5], 'size': [H, W]})],
                          'rle_size_mismatch', ['annotation 12']),
    'compressed_rle_overflow': (  # counts of a larger image: pycocotools would write past H x W
        [_image(1, 'ok.jpg')],
        [_ann(12, 1, {'size': [H, W], 'counts': mask_utils.encode(
            np.asfortranarray(np.eye(2 * H, W, dtype=np.uint8)))['counts'].decode()})],
        'rle_size_mismatch', ['annotation 12', f'sum to {2 * H * W}']),
    'negative_rle': ([_image(1, 'ok.jpg')],
                     [_ann(12, 1, {'counts': [H * W + 5, -5], 'size': [H, W]})],
                     'malformed_rle', ['annotation 12', 'negative']),
    'missing_segmentation': ([_image(1, 'ok.jpg')], [_ann(12, 1, {'polygons': []})],
                             'missing_segmentation', ['annotation 12']),
}


@pytest.mark.parametrize('case', sorted(BAD_CASES))
def test_bad_input_is_skipped_and_counted_or_a_clear_error(tmp_path, case):
  images, annotations, reason, texts = BAD_CASES[case]
  split = _dataset(tmp_path, images, annotations)
  d = tmp_path / 'imgs'
  _write_image(d / 'ok.jpg')
  (d / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(blocks(H, W)).save(d / 'exif6.jpg', exif=exif)
  png_header(d / 'bomb.png', 10000, 10000)
  png_header(d / 'huge.png', 30000, 30000)
  jpeg_header(d / 'bomb.jpg', 10000, 10000)
  Image.fromarray(np.zeros((H, W), np.float32)).save(d / 'float.tif')

  examples, stats = _read(split, 'skip')
  assert stats.skipped == {reason: 1}
  assert _kept_ids(examples) == [GOOD_ID]  # the bad entry is gone, nothing wrong is kept
  assert stats.annotations_of_skipped_images == sum(
      a.get('image_id') == 1 for a in annotations) * (reason in ('missing_image',
                                                                 'image_too_large'))

  with pytest.raises(coco_format.BadInputError) as err:
    _read(split, 'error')
  message = str(err.value)
  assert split.annotations in message and reason in message, message
  for text in texts:
    assert text in message, message
  assert "on_bad_input='skip'" in message


def test_decompression_bombs_are_refused_from_the_header_never_decoded(tmp_path, monkeypatch):
  split = _dataset(tmp_path, [_image(1, 'bomb.png', 10000, 10000),
                              _image(2, 'huge.png', 30000, 30000),
                              _image(3, 'bomb.jpg', 12000, 9000)],
                   [_ann(1, 1), _ann(2, 2), _ann(3, 3)])
  png_header(tmp_path / 'imgs' / 'bomb.png', 10000, 10000)
  png_header(tmp_path / 'imgs' / 'huge.png', 30000, 30000)
  jpeg_header(tmp_path / 'imgs' / 'bomb.jpg', 12000, 9000)
  decoded = []
  load = ImageFile.ImageFile.load

  def recording_load(self):
    decoded.append(self.size)
    return load(self)

  monkeypatch.setattr(ImageFile.ImageFile, 'load', recording_load)
  examples, stats = _read(split, 'skip')
  assert stats.skipped == {'image_too_large': 3} and stats.annotations_of_skipped_images == 3
  assert [i for i, _ in examples] == [GOOD_ID]
  assert decoded == [(W, H)]  # only the good image was ever decoded


def test_duplicate_image_ids_keep_exact_repeats_once_and_drop_conflicts(tmp_path):
  for name in ('a.jpg', 'b.jpg', 'c.jpg'):
    _write_image(tmp_path / name)
  split = _dataset(tmp_path, [_image(1, 'a.jpg'), _image(1, 'a.jpg'),
                              _image(2, 'b.jpg'), _image(2, 'c.jpg')],
                   [_ann(11, 1), _ann(21, 2), _ann(22, 2)])
  for name in ('a.jpg', 'b.jpg', 'c.jpg'):
    (tmp_path / name).rename(tmp_path / 'imgs' / name)
  examples, stats = _read(split, 'skip')
  assert [i for i, _ in examples] == [1, GOOD_ID]  # image 2's entries disagree: both dropped
  assert _kept_ids(examples) == [11, GOOD_ID]
  assert stats.skipped == {'duplicate_image_id': 3}
  assert stats.annotations_of_skipped_images == 2
  with pytest.raises(coco_format.BadInputError, match=r'image 1 \(.*a.jpg\): duplicate_image_id: '
                     'the entry is listed 2 times'):
    _read(split, 'error')
  split = _dataset(tmp_path, [_image(2, 'b.jpg'), _image(2, 'c.jpg')], [_ann(21, 2)])
  with pytest.raises(coco_format.BadInputError,
                     match=r'image 2 \(.*b.jpg\): duplicate_image_id: id 2 is also given to '
                     r'c.jpg \(40x60\)'):
    _read(split, 'error')


def test_duplicate_annotation_ids_keep_the_first_and_are_summarised_in_the_log(tmp_path, caplog):
  _write_image(tmp_path / 'b.jpg')
  split = _dataset(tmp_path, [_image(2, 'b.jpg')],
                   [_ann(1, 2), _ann(1, 2, bbox=(0, 0, 5, 5)), _ann(GOOD_ID, 2),
                    _ann(3, 2, [[1, 1, float('nan'), 1, 5, 5]])])
  (tmp_path / 'b.jpg').rename(tmp_path / 'imgs' / 'b.jpg')
  with caplog.at_level(logging.INFO):
    examples, stats = _read(split, 'skip')
  assert _kept_ids(examples) == [1, GOOD_ID]
  kept = examples[0][1]['objects']
  np.testing.assert_allclose(kept['bbox'][0], [10 / H, 10 / W, 30 / H, 30 / W])  # the first
  summary = ('kept 2 of 2 images and 2 of 5 annotations; skipped 3 annotations: '
             '2 duplicate_annotation_id, 1 non_finite_coordinates')
  assert stats.summary() == summary
  records = [r for r in caplog.records if summary in r.getMessage()]
  assert len(records) == 1 and records[0].levelno == logging.WARNING
  assert split.annotations in records[0].getMessage()


@pytest.mark.parametrize('annotations', [None, []], ids=['absent', 'empty'])
def test_a_labelled_split_without_annotations_is_an_error_an_unlabelled_one_reads(
    tmp_path, annotations):
  _write_image(tmp_path / 'a.jpg')
  split = _dataset(tmp_path, [_image(1, 'a.jpg')], [], good=False,
                   fields={'annotations': annotations})
  (tmp_path / 'a.jpg').rename(tmp_path / 'imgs' / 'a.jpg')
  what = 'no "annotations" key' if annotations is None else 'empty "annotations" list'
  for policy in coco_format.ON_BAD_INPUT:
    with pytest.raises(coco_format.BadInputError, match=f'instances.json: has (an )?{what}.*'
                       'unlabelled_splits'):
      _read(split, policy)
  unlabelled = coco_format.CocoSplit(split.annotations, split.images, labelled=False)
  examples, stats = _read(unlabelled, 'error')
  assert [i for i, _ in examples] == [1] and not stats.labelled
  assert len(examples[0][1]['objects']['id']) == 0
  assert stats.summary() == 'kept 1 of 1 images and 0 of 0 annotations (unlabelled split)'


def test_a_split_whose_every_annotation_or_image_is_skipped_is_an_error(tmp_path):
  split = _dataset(tmp_path, [_image(GOOD_ID, 'good.jpg')], [_ann(1, GOOD_ID, category_id=99)],
                   good=False)
  _write_image(tmp_path / 'imgs' / 'good.jpg')
  with pytest.raises(coco_format.BadInputError,
                     match='every annotation was skipped .*1 unknown_category'):
    _read(split, 'skip')
  split = _dataset(tmp_path, [_image(1, 'nope.jpg')], [_ann(1, 1)], good=False)
  with pytest.raises(coco_format.BadInputError, match='every image was skipped'):
    _read(split, 'skip')


def test_an_oversized_json_is_refused_before_reading_with_the_override(tmp_path, monkeypatch):
  big = tmp_path / 'instances_big.json'
  with open(big, 'wb') as f:
    f.truncate(2**30)  # a sparse 1 GiB file: nothing is written
  assert os.path.getsize(big) == 2**30
  monkeypatch.setattr(json, 'load', lambda *a, **k: pytest.fail('the JSON was read'))
  with pytest.raises(coco_format.BadInputError) as err:
    _read(coco_format.CocoSplit(str(big), str(tmp_path)))
  message = str(err.value)
  assert str(big) in message and '1,024.0 MiB (1,073,741,824 bytes)' in message
  assert 'max_json_mb' in message and '512.0 MiB limit' in message
  monkeypatch.undo()
  split = _dataset(tmp_path, [], [])
  with pytest.raises(coco_format.BadInputError, match='over the 0.0 MiB limit'):
    _read(split, max_json_bytes=100)
  assert len(_read(split, max_json_bytes=None)[0]) == 1


def test_malformed_json_names_the_file(tmp_path):
  path = tmp_path / 'broken.json'

  def read(text):
    path.write_text(text)
    _read(coco_format.CocoSplit(str(path), str(tmp_path)))

  with pytest.raises(coco_format.BadInputError, match='broken.json: not valid JSON'):
    read('{"images": [')
  with pytest.raises(coco_format.BadInputError, match=r"image entry 1 lacks \['file_name'"):
    read('{"images": [{"id": 1}], "categories": []}')
  with pytest.raises(coco_format.BadInputError, match='"images" list is empty'):
    read('{"images": [], "categories": []}')
  image = '{"id": 3, "file_name": "a.jpg", "height": "40", "width": 60}'
  with pytest.raises(coco_format.BadInputError, match='image 3: "height" is \'40\''):
    read(f'{{"images": [{image}], "categories": []}}')
  image = '{"id": 3, "file_name": "a.jpg", "height": 40, "width": 60}'
  with pytest.raises(coco_format.BadInputError, match="category id 1 is listed twice"):
    read(f'{{"images": [{image}], "categories": [{{"id": 1, "name": "a"}}, '
         '{"id": 1, "name": "b"}]}')
  with pytest.raises(coco_format.BadInputError, match='annotation entry #0 is 7'):
    read(f'{{"images": [{image}], "categories": [], "annotations": [7]}}')
  with pytest.raises(coco_format.BadInputError, match='not found'):
    _read(coco_format.CocoSplit(str(tmp_path / 'absent.json'), str(tmp_path)))


def test_unknown_policy_is_rejected(tmp_path):
  split = _dataset(tmp_path, [], [])
  with pytest.raises(ValueError, match='skip'):
    _read(split, 'ignore')


def test_iscrowd_as_json_booleans_reads_as_zero_and_one(tmp_path):
  split = _dataset(tmp_path, [], [_ann(1, GOOD_ID, iscrowd=True), _ann(2, GOOD_ID, iscrowd=False),
                                  _ann(3, GOOD_ID, iscrowd='1')])
  examples, stats = _read(split)
  assert stats.skipped == {'malformed_iscrowd': 1}
  objects = examples[0][1]['objects']
  assert dict(zip(objects['id'], objects['is_crowd'])) == {GOOD_ID: False, 1: True, 2: False}
