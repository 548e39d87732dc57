"""The tf.data pipeline against pycocotools, scipy and a dataset whose image *is* its masks."""
import json

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from pycocotools.coco import COCO
from scipy import ndimage

from deepmarc_jax.data import class_splits
from deepmarc_jax.data import coco_format
from deepmarc_jax.data import pipeline
from deepmarc_jax.data.coco_instances import CocoInstances
from deepmarc_jax.ops import masks as mask_ops

VAL_JSON = 'instances_val2017_subset10.json'


def _data_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      tfds_name='coco_instances/coco_mini_seg', data_dir=None, manual_dir=None,
      train_split='train', eval_split='validation', image_size=256, max_instances=100,
      mask_size=112, hflip=True, scale_jitter=(0.5, 2.0), mask_classes='voc',
      shuffle_buffer=16, on_bad_input='error'))
  config.update(overrides)
  return config


def _examples(ds):
  for batch in tfds.as_numpy(ds):
    for i in range(len(batch['image_id'])):
      yield {k: v[i] for k, v in batch.items()}


def test_decode_masks_matches_pycocotools(coco_mini_seg_builder, val_coco):
  for ex in coco_mini_seg_builder.as_dataset(split='validation'):
    h, w = ex['image'].shape[:2]
    decoded = pipeline.decode_masks(ex['objects']['mask_rle'], h, w).numpy()
    for k, ann_id in enumerate(ex['objects']['id'].numpy()):
      np.testing.assert_array_equal(decoded[k], val_coco.annToMask(val_coco.anns[int(ann_id)]))


@pytest.fixture(scope='module')
def val_coco(coco_mini_seg_dir):
  return COCO(str(coco_mini_seg_dir / 'annotations' / VAL_JSON))


@pytest.fixture(scope='module')
def eval_examples(coco_mini_seg_builder):
  ds = pipeline.eval_dataset(_data_config(image_size=512), coco_mini_seg_builder, batch_size=4)
  return list(_examples(ds))


def test_eval_batches_are_padded_and_flagged(eval_examples):
  assert len(eval_examples) == 12  # 10 images in 3 batches of 4
  assert [ex['example_valid'] for ex in eval_examples].count(False) == 2
  assert all(ex['image_id'] == -1 for ex in eval_examples if not ex['example_valid'])


def test_eval_boxes_masks_and_image_agree_with_pycocotools(eval_examples, val_coco,
                                                           coco_mini_seg_dir):
  checked = 0
  for ex in eval_examples:
    if not ex['example_valid']:
      continue
    info = val_coco.imgs[int(ex['image_id'])]
    h, w, scale = ex['image_info'][:3]
    assert (h, w) == (info['height'], info['width']) and scale == pytest.approx(512 / max(h, w))
    anns = val_coco.loadAnns(val_coco.getAnnIds(imgIds=info['id']))
    n = int(ex['gt_valid'].sum())
    assert n == len(anns) and not ex['gt_valid'][n:].any()
    for k, ann in enumerate(anns):  # order is kept
      x, y, bw, bh = ann['bbox']
      np.testing.assert_allclose(ex['gt_boxes'][k], np.array([y, x, y + bh, x + bw]) * scale,
                                 atol=1e-2)
      assert ex['gt_classes'][k] == ann['category_id']
      assert ex['gt_is_crowd'][k] == bool(ann['iscrowd'])
      assert ex['gt_mask_allowed'][k] == (ann['category_id'] in class_splits.VOC_IDS
                                          and not ann['iscrowd'])
      if ann['area'] >= 32 ** 2:  # paste the crop back at original resolution
        box = ex['gt_boxes'][k] / scale
        pasted = mask_ops.paste_box_mask(ex['gt_masks'][k], box, int(h), int(w)) >= 0.5
        assert mask_ops.mask_iou(pasted, val_coco.annToMask(ann)) >= 0.9, ann['id']
        checked += 1
    # Image: an independent bilinear resampling (scipy) at output pixel centres.
    # Decoded as TFDS decodes it (JPEG decoders differ by a few levels; that is not under test).
    encoded = (coco_mini_seg_dir / 'val2017' / info['file_name']).read_bytes()
    original = tf.io.decode_jpeg(encoded, channels=3).numpy().astype(np.float64)
    vh, vw = int(round(h * scale)), int(round(w * scale))
    yy, xx = np.meshgrid((np.arange(vh) + 0.5) / scale - 0.5, (np.arange(vw) + 0.5) / scale - 0.5,
                         indexing='ij')
    expected = np.stack([ndimage.map_coordinates(original[..., c], [yy, xx], order=1,
                                                 mode='nearest') for c in range(3)], -1)
    assert np.abs(ex['image'][:vh, :vw] - expected).max() <= 1.0
    assert not ex['image'][vh:].any() and not ex['image'][:, vw:].any()  # zero padding
  assert checked >= 20


def test_max_instances_drops_and_counts(coco_mini_seg_builder, val_coco):
  ds = pipeline.eval_dataset(_data_config(max_instances=3), coco_mini_seg_builder, batch_size=5)
  for ex in _examples(ds):
    if ex['example_valid']:
      n = len(val_coco.getAnnIds(imgIds=int(ex['image_id'])))
      assert ex['gt_valid'].sum() == min(n, 3)
      assert ex['num_dropped_instances'] == max(n - 3, 0)


def test_process_shards_are_disjoint_cover_the_split_and_have_equal_length(
    coco_mini_seg_builder):
  ids, lengths = [], []
  for index in range(3):
    ds = pipeline.eval_dataset(_data_config(), coco_mini_seg_builder, batch_size=2,
                               process_index=index, process_count=3)
    examples = list(_examples(ds))
    lengths.append(len(examples))
    ids += [int(ex['image_id']) for ex in examples if ex['example_valid']]
  assert len(set(lengths)) == 1
  assert len(ids) == len(set(ids)) == 10


# --- Training augmentation on data where the image is the union of its masks. ----------------


@pytest.fixture(scope='module')
def mask_image_builder(tmp_path_factory):
  """Images are white objects on black (lossless PNG), so image and masks must move together."""
  root = tmp_path_factory.mktemp('maskimg')
  (root / 'annotations').mkdir()
  (root / 'train').mkdir()
  rng = np.random.default_rng(0)
  images, anns = [], []
  for image_id in range(1, 7):
    h, w = rng.integers(90, 160, 2)
    canvas = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(3):  # non-overlapping asymmetric blobs: ellipse + a notch
      cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
      ry, rx = rng.uniform(6, 20, 2)
      blob = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1) & ~((yy < cy) & (xx > cx))
      if not blob.any() or (blob & (canvas > 0)).any():
        continue
      canvas[blob] = 255
      ys, xs = np.nonzero(blob)
      anns.append({'id': len(anns) + 1, 'image_id': image_id, 'category_id': 1, 'iscrowd': 0,
                   'bbox': [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1,
                            int(np.ptp(ys)) + 1],
                   'segmentation': {'counts': coco_format.rle_counts(blob).tolist(),
                                    'size': [int(h), int(w)]}})
    Image.fromarray(np.stack([canvas] * 3, -1)).save(root / 'train' / f'{image_id}.png')
    images.append({'id': image_id, 'file_name': f'{image_id}.png', 'height': int(h),
                   'width': int(w)})
  (root / 'annotations' / 'instances_train.json').write_text(json.dumps(
      {'images': images, 'annotations': anns, 'categories': [{'id': 1, 'name': 'blob'}]}))
  builder = CocoInstances(config='custom', data_dir=str(root / 'tfds'))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(root), try_download_gcs=False))
  return builder


def _train_examples(builder, seed, count, start_step=0, steps=1, **overrides):
  config = _data_config(tfds_name='coco_instances/custom', image_size=128, mask_size=64,
                        mask_classes='all', **overrides)
  ds = pipeline.train_dataset(config, builder, batch_size=count, seed=seed,
                              start_step=start_step)
  return list(_examples(ds.take(steps)))


def test_flip_and_scale_jitter_move_image_boxes_and_masks_together(mask_image_builder):
  examples = _train_examples(mask_image_builder, seed=1, count=24)
  scales = [ex['image_info'][2] / (128 / max(ex['image_info'][:2])) for ex in examples]
  assert min(scales) < 0.8 and max(scales) > 1.3  # both shrinking and cropping happened
  empty = instances = 0
  for ex in examples:
    white = ex['image'][..., 0] >= 128
    pasted = np.zeros_like(white)
    for k in np.nonzero(ex['gt_valid'])[0]:
      m = mask_ops.paste_box_mask(ex['gt_masks'][k], ex['gt_boxes'][k], 128, 128) >= 0.5
      if not m.any():  # a crop kept only an empty corner of the box (the blobs have a notch)
        empty += 1
        continue
      instances += 1
      y1, x1, y2, x2 = ex['gt_boxes'][k]
      # The box is the tight box of its object in the augmented image (to a pixel).
      ys, xs = np.nonzero(m)
      assert ys.min() >= y1 - 1 and ys.max() <= y2 and xs.min() >= x1 - 1 and xs.max() <= x2
      pasted |= m
    if white.sum() > 50:
      assert mask_ops.mask_iou(pasted, white) >= 0.85
  assert instances > 30 and empty <= instances // 10


def test_flips_happen_and_a_flip_mirrors_the_example(mask_image_builder):
  """Same seed and scale: with hflip on, some examples are mirror images of the hflip=False ones.

  The flip is applied to the original image (x -> W - x), so boxes mirror about W * scale; the
  pixels mirror exactly when W * scale is a whole number of pixels.
  """
  plain = _train_examples(mask_image_builder, seed=5, count=12, hflip=False,
                          scale_jitter=(1.0, 1.0))
  flipped = _train_examples(mask_image_builder, seed=5, count=12, scale_jitter=(1.0, 1.0))
  mirrored = exact_pixels = 0
  for a, b in zip(plain, flipped):
    assert a['image_id'] == b['image_id']
    if np.array_equal(a['image'], b['image']):
      continue
    mirrored += 1
    scaled_width = a['image_info'][1] * a['image_info'][3]
    n = int(a['gt_valid'].sum())
    np.testing.assert_allclose(b['gt_boxes'][:n, 1], scaled_width - a['gt_boxes'][:n, 3],
                               atol=1e-3)
    np.testing.assert_allclose(b['gt_masks'][:n], a['gt_masks'][:n, :, ::-1], atol=1e-4)
    if abs(scaled_width - round(scaled_width)) < 1e-6:
      vw = int(round(scaled_width))
      np.testing.assert_array_equal(b['image'][:, :vw], a['image'][:, vw - 1::-1])
      exact_pixels += 1
  assert 0 < mirrored < len(plain) and exact_pixels > 0


def test_training_stream_is_deterministic_per_seed(mask_image_builder):
  a = _train_examples(mask_image_builder, seed=3, count=8)
  b = _train_examples(mask_image_builder, seed=3, count=8)
  c = _train_examples(mask_image_builder, seed=4, count=8)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert any(not np.array_equal(x['image'], z['image']) for x, z in zip(a, c))


def test_resuming_at_step_s_feeds_the_same_batches(mask_image_builder):
  """6 images, batches of 4: steps 0..4 cross epochs; a stream started at step 3 matches."""
  full = _train_examples(mask_image_builder, seed=7, count=4, steps=5)
  resumed = _train_examples(mask_image_builder, seed=7, count=4, start_step=3, steps=2)
  for x, y in zip(full[12:], resumed):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  # Every epoch visits each image once, in a different order.
  ids = [int(ex['image_id']) for ex in full]
  assert sorted(ids[:6]) == sorted(ids[6:12]) == list(range(1, 7)) and ids[:6] != ids[6:12]


def test_processes_preparing_the_same_dataset_at_once_all_succeed(tmp_path, coco_mini_seg_dir):
  """Sweep cells start together on a fresh machine: without the preparation lock each process
  generated the data and all but the first failed to rename theirs into place."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = (
      'import ml_collections, sys\n'
      'from deepmarc_jax.data import pipeline\n'
      'config = ml_collections.ConfigDict(dict(tfds_name="coco_instances/coco_mini_seg",\n'
      '    data_dir=sys.argv[1], manual_dir=sys.argv[2], on_bad_input="error"))\n'
      'builder = pipeline.get_builder(config)\n'
      'print(builder.info.splits["validation"].num_examples)\n')
  processes = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path), str(coco_mini_seg_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(3)]
  outputs = [p.communicate(timeout=300) for p in processes]
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-2000:]
  counts = {out.split()[-1] for out, _ in outputs}
  expected = CocoInstances(config='coco_mini_seg', data_dir=str(tmp_path)).info.splits['validation']
  assert counts == {str(expected.num_examples)} and expected.num_examples > 0
