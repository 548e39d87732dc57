r"""The paper's two findings in miniature: mask-head depth x crop mode x seed on the shapes data.

Each cell is the CPU demo (`deepmarc_spinenet.py:demo`, synthetic seen/unseen shapes) with one
mask head and one crop mode, evaluated on detections and on the ground-truth boxes
(`eval.gt_box_masks`: masks from GT boxes, which isolates the mask head). Every head gets the
same width (`mask_head.num_filters`, 16) and 32 px crops, so depth is what varies.

  python sweep.py --config=experiments/mask_head_sweep.py --parallel=2
  python sweep.py --config=experiments/mask_head_sweep.py:quick

Cells train in sweeps/mask_head_sweep[_quick]/<cell> (git-ignored; --sweep_dir to choose).

docs/results/ keeps the reports of the runs that docs/findings.md cites, with each cell's final
evaluation.

Variants (after ':'):
  (none)  heads {default, resnet4, resnet12, hourglass20, hourglass52} x crops {gt, proposals}
          x seeds {0, 1}: 20 cells of 3,000 steps, evaluated every 500 (two at a time with
          --parallel=2). 3,000 because at 1,500 steps the deep heads' mask AP from GT boxes was
          still rising (docs/findings.md, "Why 3,000 steps").
  quick   finding (1) only: the demo (hourglass20, 16 px crops) with gt vs proposal crops,
          one seed, 700 steps: two cells.
  jitter  a diagnostic beside the full grid: GT crops whose boxes are jittered
          (`mask_head.gt_box_jitter=0.5`, Deep-MAC's ROI jitter: each side moves by up to a
          quarter of the box's size), heads {default, hourglass20} x seeds {0, 1}, otherwise the
          full grid's cells. Does the crops' variety, rather than their tightness, decide
          unseen-class AP?
  width   a diagnostic for finding (2): the full grid's default head with GT crops at 16 and 64
          filters (`mask_head.num_filters`) x seeds {0, 1}. At 16 filters the shallow heads
          underfit even the seen classes of their training images (`python -m
          deepmarc_jax.tools.mask_head_fit`; docs/findings.md), so depth raised seen AP as much
          as unseen; does a default head wide enough to fit the seen classes close the unseen
          gap to hourglass20 too? Its 16-filter cells are the full grid's default GT cells (the
          same resolved config but for hourglass_bn_momentum, which the default head does not
          read): copy them in to run only the 64-filter cells.
  deepmac finding (2) for CenterNet: the Deep-MAC demo (`deepmac_centernet.py:demo`) with mask
          networks {default, resnet12, hourglass20, hourglass52} x seeds {0, 1}, 1,500 steps
          evaluated every 500, the full grid's BatchNorm settings. 1,500, not 3,000: a
          Deep-MAC step costs about twice a Deep-MARC demo step, and the 500 / 1,000 / 1,500
          evaluations show whether AP still rises. There is no crop-mode contrast: Deep-MAC has no
          proposals, its mask branch always trains on ground-truth boxes.
"""
import importlib.util
import os

from deepmarc_jax import config_lib

VARIANTS = ('quick', 'jitter', 'width', 'deepmac')
DEEPMAC_HEADS = ('default', 'resnet12', 'hourglass20', 'hourglass52')
HEADS = ('default', 'resnet4', 'resnet12', 'hourglass20', 'hourglass52')


def _variants(arg):
  variants = config_lib.parse_variants(arg, VARIANTS, 'mask_head_sweep.py')
  if len(variants) > 1:
    raise ValueError(f'mask_head_sweep.py: give at most one of {", ".join(VARIANTS)}; got {arg!r}')
  return variants


def _demo_config(experiment: str = 'deepmarc_spinenet'):
  # Config files are loaded by path (ml_collections), so the sibling is too.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{experiment}.py')
  spec = importlib.util.spec_from_file_location(experiment, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config('demo')


def get_config(arg: str | None = None):
  variants = _variants(arg)
  config = _demo_config('deepmac_centernet' if 'deepmac' in variants else 'deepmarc_spinenet')
  config.experiment = 'mask_head_sweep'
  config.eval.gt_box_masks = True
  if 'deepmac' in variants:
    config.experiment = 'mask_head_sweep_deepmac'
    # As the Deep-MARC grid's cells below, for the same reasons (its deep heads see few
    # crops per batch); Deep-MAC's crops are 32x32 already.
    config.model.mask_head.bn_min_count = 64.0
    config.model.mask_head.hourglass_bn_momentum = 0.9
    config.train.total_steps = 1500
    config.eval.every_steps = 500
    return config
  # The grid in docs/results ran at the demo's earlier learning rate; keep it reproducible.
  config.train.optimizer.learning_rate = 1e-3
  if 'quick' in variants:  # the demo itself (hourglass20, 16 px crops), trained both ways
    config.train.total_steps = config.eval.every_steps = 700
  else:
    # The official 32 px mask crops (64x64 logits) for every head: hourglass52 halves its
    # input five times, and the comparison should differ in the head alone.
    config.model.mask_head.crop_size = 32
    # A batch of 8 images trains on ~8 (GT crops) to ~24 instances, which hourglass52 halves to
    # 1x1, so its deepest BatchNorms normalise so few values that its gradients explode and
    # its detector does not train (deepmarc_jax/tools/mask_head_gradients.py; docs/findings.md).
    # The running averages make up the values a BatchNorm lacks below 64 per channel
    # (layers.BatchNorm): every other head keeps >= 8x8 per instance, so for them this changes
    # nothing.
    config.model.mask_head.bn_min_count = 64.0
    # The hourglass heads' reference BatchNorm momentum, 0.1, makes their moving averages the
    # last training batch's statistics, here those of ~8-24 crops, so hourglass52's mask AP from
    # GT boxes swings between evaluations with the last batch (deepmarc_jax/tools/bn_statistics.py;
    # docs/findings.md). 0.9 is what the PyTorch-style 0.1 means; the other heads already
    # average over ~10-100 steps (0.9 / 0.99).
    config.model.mask_head.hourglass_bn_momentum = 0.9
    # The cosine schedule spans the whole run.
    config.train.total_steps = 3000
    # The report reads the last evaluation; the earlier ones show whether AP still rises.
    config.eval.every_steps = 500
  if 'jitter' in variants:
    config.model.mask_head.update(train_crops='gt', gt_box_jitter=0.5)
  if 'width' in variants:
    config.model.mask_head.update(type='default', train_crops='gt')
  return config


def get_contrasts(arg: str | None = None):
  """The report's paired differences: finding (1) is gt minus proposal crops, per head;
  finding (2) each head minus the default 4-conv head, per crop mode."""
  variants = _variants(arg)
  if 'quick' in variants:
    return {'model.mask_head.train_crops': 'proposals'}
  if 'jitter' in variants:
    return {'model.mask_head.type': 'default'}
  if 'width' in variants:
    return {'model.mask_head.num_filters': 16}
  if 'deepmac' in variants:
    return {'model.mask_head.type': 'default'}
  return {'model.mask_head.train_crops': 'proposals', 'model.mask_head.type': 'default'}


def get_sweep(arg: str | None = None):
  variants = _variants(arg)
  if 'quick' in variants:
    return {'model.mask_head.train_crops': ['gt', 'proposals']}
  if 'jitter' in variants:
    return {'model.mask_head.type': ['default', 'hourglass20'], 'seed': [0, 1]}
  if 'width' in variants:
    return {'model.mask_head.num_filters': [16, 64], 'seed': [0, 1]}
  if 'deepmac' in variants:
    return {'model.mask_head.type': list(DEEPMAC_HEADS), 'seed': [0, 1]}
  return {
      'model.mask_head.type': list(HEADS),
      'model.mask_head.train_crops': ['gt', 'proposals'],
      'seed': [0, 1],
  }
