r"""TFDS builder for COCO-format instance segmentation (the stock `coco/2017` has no masks).

One builder, `coco_instances`, reads any COCO instances JSON + image folder:

| config | source |
|---|---|
| `coco2017` | official COCO 2017 in `manual_dir`: extracted folders or the official zips |
| `shapes` | the synthetic seen/unseen dataset, generated deterministically at build time |
| `coco_mini_seg` | the 138-image test set laid out as in `shared/data/coco_mini_seg` |
| `custom` | your data in `manual_dir`: `annotations/instances_<split>.json` + `<split>/` |

Other layouts: `CocoInstancesConfig(name=..., splits={'train': (json, image_dir)})`.

Features per image: `image` (RGB), `image/id`, `image/filename`, and a sequence `objects` with
`id` (annotation id), `bbox` (tfds BBox: ymin, xmin, ymax, xmax normalised), `category_id`
(the JSON's ids, e.g. COCO 1..90), `is_crowd`, `area` (the JSON's area, else mask pixels) and
`mask_rle` (uncompressed column-major COCO run lengths, see `coco_format`). Category names and
what the read skipped are in `info.metadata`.

Command line (the TFDS way; built data go to `--data_dir`, default ~/tensorflow_datasets):
  tfds build coco_instances --imports=deepmarc_jax.data.coco_instances --config=custom \
      --manual_dir=DIR

Bad input (see `coco_format`): each broken image or annotation is skipped, counted in
`info.metadata['read_stats']` and summarised in one log line per split (`on_bad_input='skip'`,
the default), or stops the build naming the file and id (`'error'`). The policy and the JSON
size limit (`max_json_mb`, default `coco_format.DEFAULT_MAX_JSON_MB`) are builder keyword
arguments, not configs: they do not change what a successful build writes, so they do not
change the dataset's name or location. Pass them the TFDS way, after the config in the name:
  tfds build coco_instances/custom/on_bad_input=error,max_json_mb=2048 \
      --imports=deepmarc_jax.data.coco_instances --manual_dir=DIR
  tfds.builder('coco_instances/custom', on_bad_input='error')   # or CocoInstances(...)
run.py passes `config.data.on_bad_input` and `config.data.max_json_mb`.

Unlabelled splits (like COCO test2017) must be declared, or a JSON without annotations is an
error: `CocoInstancesConfig(unlabelled_splits=('test',))`, or with the `custom` config name the
file `annotations/image_info_<split>.json` (COCO's name for its unlabelled image lists) instead
of `instances_<split>.json`. Their `read_stats` say `labelled: False`.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from deepmarc_jax.data import coco_format

_COCO2017_ARCHIVES = ('annotations_trainval2017.zip', 'train2017.zip', 'val2017.zip')


@dataclasses.dataclass(eq=False)
class CocoInstancesConfig(tfds.core.BuilderConfig):
  """Where a COCO-format dataset comes from.

  Attributes:
    splits: split name -> (instances JSON, image folder), relative to `manual_dir` unless
      absolute. Empty with `synthetic=None` means: discover `annotations/instances_<split>.json`.
    archives: zip files in `manual_dir` extracted when the split folders are not there.
    synthetic: keyword arguments of `shapes.generate`; the data is generated, not read.
    unlabelled_splits: splits meant to have no annotations (their JSON may lack them); any
      other split without annotations is an error.
  """
  splits: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
  archives: tuple[str, ...] = ()
  synthetic: dict[str, Any] | None = None
  unlabelled_splits: tuple[str, ...] = ()


SHAPES_DEFAULT = dict(splits={'train': 2000, 'validation': 200}, image_size=128, seed=0,
                      style='upright')
SHAPES_TEXTURED = dict(SHAPES_DEFAULT, style='textured')


class CocoInstances(tfds.core.GeneratorBasedBuilder):
  """COCO-format instance segmentation with masks.

  `on_bad_input` ('skip' or 'error') and `max_json_mb` are build-time settings, not part of the
  dataset's identity: a build with 'error' either fails or writes exactly what 'skip' writes.
  """

  VERSION = tfds.core.Version('1.3.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.2.0': "'shapes' is drawn in the 'upright' style; the 1.0.0 shapes are "
                            "'shapes_textured'.",
                   '1.3.0': 'Hostile inputs are skipped and counted (or stop the build): '
                            'duplicate image or annotation ids, non-finite coordinates, boxes '
                            'wholly outside the image, malformed iscrowd or RLE, decompression '
                            'bombs; 16-bit PNGs are scaled to 8 bits, not clipped. Good inputs '
                            'read as before.'}
  BUILDER_CONFIGS = [
      CocoInstancesConfig(
          name='coco2017', description='COCO 2017 instances with masks (train/validation).',
          splits={'train': ('annotations/instances_train2017.json', 'train2017'),
                  'validation': ('annotations/instances_val2017.json', 'val2017')},
          archives=_COCO2017_ARCHIVES),
      CocoInstancesConfig(
          name='shapes', description='Synthetic seen/unseen shapes (deepmarc_jax.data.shapes).',
          synthetic=SHAPES_DEFAULT),
      CocoInstancesConfig(
          name='shapes_textured', description="Synthetic shapes, 'textured' style (harder).",
          synthetic=SHAPES_TEXTURED),
      CocoInstancesConfig(
          name='coco_mini_seg', description='138 real COCO images (shared/data/coco_mini_seg).',
          splits={'train': ('annotations/instances_train2017_coco128.json', 'train2017'),
                  'validation': ('annotations/instances_val2017_subset10.json', 'val2017')}),
      CocoInstancesConfig(
          name='custom', description='annotations/instances_<split>.json + <split>/ in '
          'manual_dir.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  coco2017: put the official COCO 2017 files in manual_dir, either extracted
  (annotations/instances_{train,val}2017.json, train2017/, val2017/) or as the official zips
  (annotations_trainval2017.zip, train2017.zip, val2017.zip).
  custom: annotations/instances_<split>.json with images under <split>/ (file_name relative);
  annotations/image_info_<split>.json for a split without annotations.
  shapes needs nothing: it is generated.
  """

  def __init__(self, *, on_bad_input: str = 'skip',
               max_json_mb: float = coco_format.DEFAULT_MAX_JSON_MB, **kwargs):
    if on_bad_input not in coco_format.ON_BAD_INPUT:
      raise ValueError(f'on_bad_input={on_bad_input!r}; allowed: {coco_format.ON_BAD_INPUT}')
    if isinstance(max_json_mb, bool) or not isinstance(max_json_mb, (int, float)) or not (
        max_json_mb > 0):
      raise ValueError(f'max_json_mb={max_json_mb!r} must be a positive number (MiB)')
    self.on_bad_input = on_bad_input
    self.max_json_mb = max_json_mb
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'image/id': np.int64,
            'image/filename': tfds.features.Text(),
            'objects': tfds.features.Sequence({
                'id': np.int64,
                'bbox': tfds.features.BBoxFeature(),
                'category_id': np.int64,
                'is_crowd': np.bool_,
                'area': np.float32,
                'mask_rle': tfds.features.Sequence(np.int32),
            }),
        }),
        metadata=tfds.core.MetadataDict(),
        homepage='https://cocodataset.org',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config: CocoInstancesConfig = self.builder_config
    if config.synthetic is not None:
      splits = self._generate_synthetic(config.synthetic)
    else:
      splits = self._locate_splits(config, dl_manager)
    return {name: self._generate_examples(name, split) for name, split in splits.items()}

  def _generate_synthetic(self, kwargs: dict[str, Any]) -> dict[str, coco_format.CocoSplit]:
    from deepmarc_jax.data import shapes  # pylint: disable=g-import-not-at-top
    out_dir = tempfile.mkdtemp(prefix='shapes_')
    paths = shapes.generate(out_dir, **kwargs)
    return {name: coco_format.CocoSplit(path, os.path.join(out_dir, name))
            for name, path in paths.items()}

  def _locate_splits(self, config: CocoInstancesConfig,
                     dl_manager: tfds.download.DownloadManager
                     ) -> dict[str, coco_format.CocoSplit]:
    manual_dir = os.fspath(dl_manager.manual_dir)
    roots = [manual_dir]
    if config.archives and not all(
        os.path.exists(os.path.join(manual_dir, ann)) and
        os.path.isdir(os.path.join(manual_dir, img)) for ann, img in config.splits.values()):
      zips = [os.path.join(manual_dir, z) for z in config.archives]
      missing = [z for z in zips if not os.path.exists(z)]
      if missing:
        raise FileNotFoundError(
            f'{config.name}: neither the extracted folders nor the archives {missing} are in '
            f'manual_dir={manual_dir}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
      roots = [os.fspath(p) for p in dl_manager.extract(zips)]
    if config.splits:
      splits, unlabelled = dict(config.splits), set(config.unlabelled_splits)
    else:
      splits, unlabelled = _discover_splits(manual_dir)
      unlabelled |= set(config.unlabelled_splits)
    if unlabelled - splits.keys():
      raise ValueError(f'{config.name}: unlabelled_splits {sorted(unlabelled - splits.keys())} '
                       f'are not among the splits {sorted(splits)}')
    return {name: coco_format.CocoSplit(_find(ann, roots), _find(img, roots),
                                        labelled=name not in unlabelled)
            for name, (ann, img) in splits.items()}

  def _generate_examples(self, split_name: str, split: coco_format.CocoSplit):
    stats = coco_format.ReadStats()
    yield from coco_format.read_coco_split(
        split, on_bad_input=self.on_bad_input, stats=stats,
        max_json_bytes=int(self.max_json_mb * 2**20))
    self.info.metadata.setdefault('read_stats', {})[split_name] = stats.as_dict()
    _merge_categories(self.info.metadata, stats.categories)


def _find(relative: str, roots: list[str]) -> str:
  """First existing `root/relative` (extracted zips each have their own root)."""
  for root in roots:
    path = os.path.join(root, relative)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f'{relative} not found under {roots}')


def _discover_splits(manual_dir: str) -> tuple[dict[str, tuple[str, str]], set[str]]:
  """`annotations/instances_<split>.json` + `<split>/` in `manual_dir` (labelled splits), and
  `annotations/image_info_<split>.json` where `<split>/` exists and no instances file names the
  split (unlabelled splits)."""
  ann_dir = os.path.join(manual_dir, 'annotations')
  files = sorted(os.listdir(ann_dir)) if os.path.isdir(ann_dir) else []
  splits, unlabelled = {}, set()
  for prefix in ('instances_', 'image_info_'):
    for f in files:
      if f.startswith(prefix) and f.endswith('.json'):
        name = f[len(prefix):-len('.json')]
        if name in splits:
          continue
        if prefix == 'image_info_':
          if not os.path.isdir(os.path.join(manual_dir, name)):
            continue  # COCO's image lists come without their images
          unlabelled.add(name)
        splits[name] = (os.path.join('annotations', f), name)
  if not splits:
    raise FileNotFoundError('no annotations/instances_<split>.json (or image_info_<split>.json '
                            f'for an unlabelled split) in manual_dir={manual_dir}')
  return splits, unlabelled


def _merge_categories(metadata: tfds.core.MetadataDict, categories: list[dict[str, Any]]):
  """Adds a split's categories to `metadata['categories']` (union over splits, sorted by id)."""
  merged = {c['id']: c for c in metadata.get('categories', [])}
  merged.update({c['id']: c for c in categories})
  metadata['categories'] = [merged[i] for i in sorted(merged)]
