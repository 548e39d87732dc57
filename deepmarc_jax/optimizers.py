"""Optimizer and learning-rate schedule from `config.train.optimizer` (optax).

`sgd`: momentum SGD with linear warmup from `warmup_init_lr` and step decay by `decay_rate` at
`decay_boundaries` (Model Garden's stepwise schedule), or cosine decay. `adamw`: AdamW with the
same schedules and decoupled weight decay. Weight decay for SGD is the official L2 regulariser:
`l2(weight_decay / 2)` on the loss, i.e. `weight_decay * w` added to the gradient of every conv
and dense kernel (not biases, not BatchNorm).
"""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
  base = opt_config.learning_rate
  if opt_config.schedule == 'step':
    boundaries = {int(b): opt_config.decay_rate for b in opt_config.decay_boundaries}
    decay = optax.piecewise_constant_schedule(base, boundaries)
  elif opt_config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(base, max(total_steps - opt_config.warmup_steps, 1))
  else:
    raise ValueError(f'unknown schedule {opt_config.schedule!r}')
  if opt_config.warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(opt_config.warmup_init_lr, base, opt_config.warmup_steps)
  if opt_config.schedule == 'step':  # boundaries count from step 0, as in Model Garden
    return lambda step: jax.numpy.where(step < opt_config.warmup_steps, warmup(step),
                                        decay(step))
  return optax.join_schedules([warmup, decay], [opt_config.warmup_steps])


def kernel_mask(params):
  """True for conv/dense kernels: the leaves weight decay applies to."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def make_optimizer(opt_config, total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(opt_config, total_steps)
  if opt_config.name == 'sgd':
    return optax.chain(
        optax.add_decayed_weights(opt_config.weight_decay, mask=kernel_mask),
        optax.sgd(schedule, momentum=opt_config.momentum))
  if opt_config.name == 'adamw':
    return optax.adamw(schedule, weight_decay=opt_config.weight_decay, mask=kernel_mask)
  raise ValueError(f'unknown optimizer {opt_config.name!r}')
