"""Experiment configs hold the paper recipe; bad configs fail at once with a clear message."""
import json
import os
import re
import subprocess
import sys

import pytest

from deepmarc_jax import config_lib
from tests.conftest import REPO

sys.path.insert(0, str(REPO / 'experiments'))
import deepmarc_resnet  # noqa: E402  pylint: disable=g-import-not-at-top
import deepmarc_spinenet  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.mark.parametrize('variant', [None, 'nonvoc', 'demo', 'demo,nonvoc'])
def test_variants_validate(variant):
  config_lib.validate(deepmarc_spinenet.get_config(variant))


def test_spinenet_recipe_matches_the_official_yaml():
  config = deepmarc_spinenet.get_config()
  assert config.data.image_size == 1280 and tuple(config.data.scale_jitter) == (0.1, 2.0)
  assert config.data.mask_classes == 'voc' and config.data.hflip
  assert config.model.backbone.type == 'spinenet143'
  assert config.model.backbone.stochastic_depth == 0.2
  assert (config.model.min_level, config.model.max_level) == (3, 7)
  assert config.model.anchor.num_scales == 3 and config.model.anchor.anchor_size == 4.0
  assert config.model.mask_head.type == 'hourglass52'
  assert config.model.mask_head.train_crops == 'gt' and config.model.mask_head.crop_size == 32
  assert config.train.batch_size == 256 and config.train.total_steps == 231_000
  opt = config.train.optimizer
  assert (opt.name, opt.learning_rate, opt.momentum) == ('sgd', 0.32, 0.9)
  assert tuple(opt.decay_boundaries) == (219_450, 226_380) and opt.decay_rate == 0.1
  assert (opt.warmup_steps, opt.warmup_init_lr, opt.weight_decay) == (2000, 0.0067, 4e-5)
  assert deepmarc_spinenet.get_config('nonvoc').data.mask_classes == 'nonvoc'
  assert deepmarc_spinenet.get_config('demo').data.tfds_name == 'coco_instances/shapes'


@pytest.mark.parametrize('variant', [None, 'r101', 'nonvoc', 'r101,nonvoc'])
def test_resnet_recipe_matches_the_official_yaml(variant):
  """deep_mask_head_rcnn_{voc,nonvoc}_r{50,101}_hg52.yaml (deepmac-facts.md 3.4)."""
  config = deepmarc_resnet.get_config(variant)
  config_lib.validate(config)
  variant = variant or ''
  assert config.model.backbone.type == ('resnet101' if 'r101' in variant else 'resnet50')
  assert config.data.mask_classes == ('nonvoc' if 'nonvoc' in variant else 'voc')
  assert config.data.image_size == 1024 and tuple(config.data.scale_jitter) == (0.8, 1.25)
  assert (config.model.min_level, config.model.max_level) == (2, 6)
  assert (config.model.mask_head.type, config.model.mask_head.train_crops,
          config.model.mask_head.crop_size) == ('hourglass52', 'gt', 32)
  assert (config.model.rpn.keep_degenerate, config.model.rpn.test_pre_nms_top_k) == (True, 1000)
  assert config.train.batch_size == 64 and config.train.total_steps == 70_000
  opt = config.train.optimizer
  assert (opt.name, opt.learning_rate, opt.momentum) == ('sgd', 0.12, 0.9)
  assert tuple(opt.decay_boundaries) == (50_000, 65_000) and opt.decay_rate == 0.1
  assert (opt.warmup_steps, opt.warmup_init_lr, opt.weight_decay) == (500, 0.0067, 4e-5)


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match='nonvoc'):
    deepmarc_spinenet.get_config('fast')


def test_validate_reports_every_bad_field_with_allowed_values():
  config = deepmarc_spinenet.get_config()
  config.model.mask_head.type = 'hourglass53'
  config.model.mask_head.train_crops = 'boxes'
  config.data.tfds_name = 'coco/2017'
  config.data.image_size = 1000
  config.data.mask_classes = 'pets'
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config)
  message = str(err.value)
  for text in ("config.model.mask_head.type='hourglass53'", 'hourglass100', 'resnet20',
               "config.model.mask_head.train_crops='boxes'", 'gt, proposals',
               "config.data.tfds_name='coco/2017'", 'coco_instances/shapes',
               'config.data.image_size=1000', 'config.data.mask_classes'):
    assert text in message


@pytest.mark.parametrize('jitter, crops, expected', [
    (1.0, 'gt', 'gt_box_jitter=1.0 must be in [0, 1)'),
    (-0.1, 'gt', 'gt_box_jitter=-0.1 must be in [0, 1)'),
    (0.2, 'proposals', "gt_box_jitter=0.2 applies to GT crops only; train_crops is 'proposals'"),
])
def test_validate_rejects_bad_gt_box_jitter(jitter, crops, expected):
  config = deepmarc_spinenet.get_config('demo')
  config.model.mask_head.update(gt_box_jitter=jitter, train_crops=crops)
  with pytest.raises(config_lib.ConfigError, match=re.escape(expected)):
    config_lib.validate(config)
  config.model.mask_head.update(gt_box_jitter=0.5, train_crops='gt')
  config_lib.validate(config)


def test_validate_rejects_a_negative_bn_min_count():
  config = deepmarc_spinenet.get_config('demo')
  config.model.mask_head.bn_min_count = -1.0
  with pytest.raises(config_lib.ConfigError, match=re.escape('bn_min_count=-1.0 must be >= 0')):
    config_lib.validate(config)
  config.model.mask_head.bn_min_count = 64.0
  config_lib.validate(config)


@pytest.mark.parametrize('momentum', [1.0, -0.1])
def test_validate_rejects_an_hourglass_bn_momentum_outside_0_1(momentum):
  config = deepmarc_spinenet.get_config('demo')
  config.model.mask_head.hourglass_bn_momentum = momentum
  with pytest.raises(config_lib.ConfigError,
                     match=re.escape(f'hourglass_bn_momentum={momentum} must be in [0, 1)')):
    config_lib.validate(config)
  config.model.mask_head.hourglass_bn_momentum = 0.9
  config_lib.validate(config)


def _run(tmp_path, *overrides):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  return subprocess.run(
      [sys.executable, str(REPO / 'run.py'),
       f'--config={REPO / "experiments" / "deepmarc_spinenet.py"}:demo',
       f'--workdir={tmp_path / "work"}', f'--config.data.data_dir={tmp_path / "data"}',
       *overrides], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


@pytest.mark.parametrize('override, expected', [
    ('--config.model.mask_head.type=hourglass53', "mask_head.type='hourglass53' is not allowed"),
    ('--config.model.mask_head.typo=1', 'Did you mean "type"'),
    ('--config.data.image_size=big', '--config.data.image_size=big'),
    ('--config.data.tfds_name=coco/2017', 'coco_instances/coco2017'),
    ('--config.model.mask_head.type=hourglass52', 'crop_size=16 must be a multiple of 32'),
])
def test_run_py_fails_fast_on_bad_config(tmp_path, override, expected):
  result = _run(tmp_path, override)
  assert result.returncode == 2
  assert 'FATAL' in result.stderr and expected in result.stderr
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'data').exists()  # no data was read or built


@pytest.mark.slow
def test_prepare_mode_end_to_end(tmp_path):
  """The demo config's dataset is generated, batched, previewed and its oracle AP is ~100."""
  result = _run(tmp_path, '--mode=prepare', '--config.model.mask_head.type=hourglass10')
  assert result.returncode == 0, result.stderr[-3000:]
  work = tmp_path / 'work'
  config = json.loads((work / 'config.json').read_text())
  assert config['model']['mask_head']['type'] == 'hourglass10'
  assert (work / 'pipeline_preview.png').stat().st_size > 10_000
  results = json.loads((work / 'oracle_eval.json').read_text())
  assert results['bbox']['AP'] == pytest.approx(1.0)
  assert results['segm']['seen']['AP'] > 0.99 and results['segm']['unseen']['AP'] > 0.99
