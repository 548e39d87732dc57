"""Tests of the synthetic seen/unseen shapes dataset (deepmarc_jax.data.shapes)."""
from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from deepmarc_jax.data import class_splits
from deepmarc_jax.data import shapes

SPLITS = {'train': 60, 'validation': 40}
POLYGON_CLASSES = {'triangle', 'star', 'L-shape', 'square', 'hexagon', 'cross'}


def _files(root: str) -> dict[str, bytes]:
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _coco(path: str) -> COCO:
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(path)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> tuple[str, dict[str, str]]:
  out_dir = str(tmp_path_factory.mktemp('shapes'))
  return out_dir, shapes.generate(out_dir, splits=SPLITS, image_size=128, seed=0)


@pytest.fixture(scope='module')
def cocos(dataset) -> dict[str, COCO]:
  return {split: _coco(path) for split, path in dataset[1].items()}


def test_categories_and_split():
  ids = [c['id'] for c in shapes.CATEGORIES]
  assert len(ids) == len(set(ids)) == 10
  assert len({c['name'] for c in shapes.CATEGORIES}) == 10
  assert sorted(shapes.SEEN_IDS + shapes.UNSEEN_IDS) == sorted(ids)
  assert shapes.SEEN_IDS == (1, 2, 3, 4, 5)
  assert shapes.UNSEEN_IDS == (8, 10, 11, 13, 14)
  # mask_classes='voc' selects exactly the seen half of the shapes.
  split = class_splits.split_of(class_splits.resolve_mask_classes('voc', ids), ids)
  assert split == {'seen': list(shapes.SEEN_IDS), 'unseen': list(shapes.UNSEEN_IDS)}


def test_layout_and_ids(dataset):
  out_dir, paths = dataset
  assert paths == {s: os.path.join(out_dir, 'annotations', f'instances_{s}.json') for s in SPLITS}
  image_ids, ann_ids = [], []
  for split, path in paths.items():
    with open(path) as f:
      data = json.load(f)
    assert data['categories'] == shapes.CATEGORIES
    assert len(data['images']) == SPLITS[split]
    for info in data['images']:
      assert set(info) == {'id', 'file_name', 'height', 'width'}
      assert (info['height'], info['width']) == (128, 128)
      assert os.path.isfile(os.path.join(out_dir, split, info['file_name']))
      assert info['file_name'].endswith('.jpg') and '/' not in info['file_name']
    for ann in data['annotations']:
      assert set(ann) == {'id', 'image_id', 'category_id', 'segmentation', 'area', 'bbox',
                          'iscrowd'}
      assert ann['iscrowd'] == 0
    image_ids += [im['id'] for im in data['images']]
    ann_ids += [a['id'] for a in data['annotations']]
  assert len(image_ids) == len(set(image_ids)), 'image ids must be unique across splits'
  assert len(ann_ids) == len(set(ann_ids)), 'annotation ids must be unique across splits'


def test_deterministic(dataset, tmp_path):
  out_dir, _ = dataset
  shapes.generate(str(tmp_path / 'same'), splits=SPLITS, image_size=128, seed=0)
  reference, again = _files(out_dir), _files(str(tmp_path / 'same'))
  assert sorted(reference) == sorted(again)
  assert all(reference[name] == again[name] for name in reference)

  shapes.generate(str(tmp_path / 'other'), splits={'train': 5}, image_size=128, seed=1)
  other = _files(str(tmp_path / 'other'))
  images = [n for n in other if n.endswith('.jpg')]
  assert len(images) == 5
  assert all(other[n] != reference[n] for n in images)
  assert other['annotations/instances_train.json'] != reference['annotations/instances_train.json']


def test_images_do_not_depend_on_other_images(dataset, tmp_path):
  out_dir, _ = dataset
  shapes.generate(str(tmp_path), splits={'validation': 7}, image_size=128, seed=0)
  for k in range(1, 8):
    name = os.path.join('validation', f'{k:06d}.jpg')
    with open(os.path.join(out_dir, name), 'rb') as a, open(tmp_path / name, 'rb') as b:
      assert a.read() == b.read()


def test_annotations_decode_with_tight_boxes_and_areas(cocos):
  for coco in cocos.values():
    assert coco.getAnnIds()
    for ann in coco.loadAnns(coco.getAnnIds()):
      info = coco.loadImgs(ann['image_id'])[0]
      mask = coco.annToMask(ann)
      assert mask.shape == (info['height'], info['width'])
      assert ann['area'] == mask.sum() > 0
      rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
      assert ann['bbox'] == [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]


def test_visible_masks_are_disjoint(cocos):
  for coco in cocos.values():
    for image_id in coco.getImgIds():
      anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
      if anns:
        stack = np.stack([coco.annToMask(a) for a in anns]).astype(np.int32)
        assert stack.sum(0).max() <= 1, f'image {image_id}: instance masks overlap'


def test_seen_and_unseen_classes_in_each_split(cocos):
  for split, coco in cocos.items():
    cats = [a['category_id'] for a in coco.loadAnns(coco.getAnnIds())]
    seen = sum(c in shapes.SEEN_IDS for c in cats)
    unseen = sum(c in shapes.UNSEEN_IDS for c in cats)
    assert seen + unseen == len(cats)
    # The default style draws 1-3 objects per image (2 on average), a few end up hidden.
    assert len(cats) >= 1.5 * SPLITS[split], f'{split}: only {len(cats)} instances'
    assert 0.35 < seen / len(cats) < 0.65, f'{split}: seen {seen}, unseen {unseen}'
    if split == 'train':
      assert set(cats) == set(shapes.SEEN_IDS + shapes.UNSEEN_IDS)


def test_polygon_and_rle_segmentations_occur(cocos):
  kinds = {'polygon': 0, 'rle': 0}
  for coco in cocos.values():
    for ann in coco.loadAnns(coco.getAnnIds()):
      segm = ann['segmentation']
      if isinstance(segm, list):
        kinds['polygon'] += 1
        assert len(segm) == 1 and len(segm[0]) >= 6
        assert shapes.CATEGORY_NAMES[ann['category_id']] in POLYGON_CLASSES
      else:
        kinds['rle'] += 1
        assert isinstance(segm['counts'], str)
        assert segm['size'] == [coco.imgs[ann['image_id']]['height'],
                                coco.imgs[ann['image_id']]['width']]
  assert kinds['polygon'] > 20 and kinds['rle'] > 20, kinds


def test_occlusion_and_masks_match_rendering(cocos):
  coco = cocos['train']
  occluded, overlapping_pairs = 0, 0
  for index, image_id in enumerate(sorted(coco.getImgIds())):
    _, instances = shapes.render_image(0, 'train', index, image_size=128)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    assert [a['category_id'] for a in anns] == [x['category_id'] for x in instances]
    for ann, inst in zip(anns, instances):
      assert np.array_equal(coco.annToMask(ann).astype(bool), inst['mask'])
      assert not (inst['mask'] & ~inst['full_mask']).any(), 'visible part outside the shape'
      assert inst['mask'].sum() >= 0.25 * inst['full_mask'].sum()
      occluded += int((inst['full_mask'] & ~inst['mask']).any())
      assert (inst['polygon'] is None) == isinstance(ann['segmentation'], dict)
    for i, a in enumerate(instances):
      overlapping_pairs += sum(int((a['full_mask'] & b['full_mask']).any())
                               for b in instances[i + 1:])
  assert occluded >= 5, f'only {occluded} partially occluded instances'
  assert overlapping_pairs >= 5


def test_masks_are_exactly_the_drawn_pixels(monkeypatch):
  """With one flat, unique colour per drawn layer, each mask is exactly its colour's pixels."""
  layers = []

  def flat_texture(rng, side, probs=None):
    del rng, side, probs
    colour = np.array([len(layers) * 7 % 256, len(layers) * 53 % 256, 255 - len(layers)]) / 255
    layers.append(colour)
    return lambda y, x: np.broadcast_to(colour, np.broadcast_shapes(y.shape, x.shape) + (3,))

  monkeypatch.setattr(shapes, '_sample_texture', flat_texture)
  monkeypatch.setattr(shapes, '_MAX_PIXEL_NOISE', 0.0)
  checked = 0
  for index in range(30):
    layers.clear()
    image, instances = shapes.render_image(0, 'train', index, image_size=96)
    codes = {tuple(np.round(c * 255).astype(np.uint8)) for c in layers}
    assert len(codes) == len(layers)
    for inst in instances:
      colours = np.unique(image[inst['mask']], axis=0)
      assert len(colours) == 1, 'an instance mask covers pixels of more than one layer'
      assert np.array_equal((image == colours[0]).all(-1), inst['mask'])
      checked += 1
  assert checked > 50


def test_images_are_rgb_jpegs_and_objects_share_background_colours(dataset, cocos):
  out_dir, _ = dataset
  inside, outside = [], []
  for split, coco in cocos.items():
    for info in coco.loadImgs(coco.getImgIds()):
      with Image.open(os.path.join(out_dir, split, info['file_name'])) as img:
        assert (img.format, img.mode, img.size) == ('JPEG', 'RGB', (info['width'],
                                                                   info['height']))
        pixels = np.asarray(img, np.float64) / 255
      masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=info['id']))]
      union = np.any(masks, axis=0) if masks else np.zeros(pixels.shape[:2], bool)
      if union.any():
        inside.append(pixels[union].mean(0))
      outside.append(pixels[~union].mean(0))
  # Objects and backgrounds come from the same colour/texture generators: on average neither
  # is brighter or more colourful, so colour alone does not separate them.
  assert np.abs(np.mean(inside, 0) - np.mean(outside, 0)).max() < 0.1
  assert np.std(inside, 0).min() > 0.1 and np.std(outside, 0).min() > 0.1


@pytest.mark.parametrize('size', [64, 512])
def test_other_image_sizes(tmp_path, size):
  paths = shapes.generate(str(tmp_path), splits={'train': 3}, image_size=size, seed=3)
  coco = _coco(paths['train'])
  assert coco.getAnnIds()
  for ann in coco.loadAnns(coco.getAnnIds()):
    assert coco.annToMask(ann).shape == (size, size)
    assert ann['area'] == mask_utils.area(coco.annToRLE(ann))
  with Image.open(tmp_path / 'train' / '000001.jpg') as img:
    assert img.size == (size, size)


@pytest.mark.parametrize('style', sorted(shapes.STYLES))
def test_styles_draw_objects_as_declared(style):
  """Square polygons are axis-aligned exactly when the style does not rotate; object sizes and
  counts stay within the style's ranges."""
  spec = shapes.STYLES[style]
  square_tilts, counts, sides = [], [], []
  for index in range(40):
    _, instances = shapes.render_image(0, 'train', index, image_size=128, style=style)
    counts.append(len(instances))
    for inst in instances:
      if inst['category_id'] == 8 and inst['polygon'] is not None:
        xy = np.reshape(inst['polygon'], (-1, 2))
        edge = xy[1] - xy[0]
        square_tilts.append(min(abs(np.arctan2(edge[1], edge[0])) % (np.pi / 2),
                                np.pi / 2 - abs(np.arctan2(edge[1], edge[0])) % (np.pi / 2)))
      full = inst['full_mask']
      rows, cols = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
      sides.append(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)
  # A whole shape spans at most its nominal side times the stretch (x1.5 for rotated extents).
  assert max(sides) <= 128 * spec.size_range[1] * np.exp(spec.max_log_aspect / 2) * 1.5 + 2
  assert max(counts) <= spec.max_objects
  assert square_tilts, 'no unoccluded square drawn'
  if spec.rotate:
    assert np.max(square_tilts) > 0.2
  else:
    assert np.max(square_tilts) < 1e-3


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError):
    shapes.generate(str(tmp_path), splits={'train': 1}, image_size=8)
  with pytest.raises(ValueError):
    shapes.generate(str(tmp_path), splits={'train': 1}, seed=-1)
  with pytest.raises(ValueError):
    shapes.generate(str(tmp_path), splits={'train': 1}, max_objects=0)
  with pytest.raises(ValueError, match='style'):
    shapes.generate(str(tmp_path), splits={'train': 1}, style='wobbly')


def test_cli_writes_dataset_and_sample_png(tmp_path, capsys):
  png = tmp_path / 'sample.png'
  paths = shapes.main([f'--out_dir={tmp_path / "data"}', '--num_train=2', '--num_val=12',
                       '--image_size=96', '--seed=5', f'--sample_png={png}'])
  assert set(paths) == {'train', 'validation'}
  assert 'validation: 12 images' in capsys.readouterr().out
  with Image.open(png) as img:
    assert img.format == 'PNG' and img.width > 4 * 96 and img.height > 3 * 96
  assert png.stat().st_size < 400_000
