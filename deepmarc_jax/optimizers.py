"""Optimizer and learning-rate schedule from `config.train.optimizer` (optax).

`sgd`: momentum SGD with linear warmup from `warmup_init_lr` and step decay by `decay_rate` at
`decay_boundaries` (Model Garden's stepwise schedule), or cosine decay. `adamw`: AdamW with the
same schedules and decoupled weight decay. Weight decay for SGD is the official L2 regulariser:
`l2(weight_decay / 2)` on the loss, i.e. `weight_decay * w` added to the gradient of every conv
and dense kernel (not biases, not BatchNorm).

`flatten`: the moments (SGD's momentum, AdamW's first and second) are one vector over all
parameters (`optax.flatten` around the moment transformation; weight decay and the learning rate
stay per leaf). The update is the same element by element. Why: XLA:CPU fuses no sibling loops,
so a per-leaf update and gradient norm cost a few kernels per parameter leaf; over one vector
they are a handful, and the CPU demo's step compiles faster (docs/benchmarks.md, "The demo's
compile"). Accelerators fuse the per-leaf update well, and a flat copy of a large model's
moments costs a pass over them, so the paper's configs keep per-leaf moments.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
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


def flat_vector(tree) -> jax.Array:
  """Every leaf raveled and concatenated in tree order: `optax.flatten`'s vector, the same ops,
  so XLA computes it once where both are taken (the train step's gradient norm)."""
  return jnp.concatenate([jnp.reshape(leaf, [-1]) for leaf in jax.tree.leaves(tree)])


def gradient_norm(grads, opt_config) -> jax.Array:
  """Global L2 norm of `grads`; over their flat vector where the optimizer flattens them."""
  return optax.global_norm(flat_vector(grads) if opt_config.flatten else grads)


def make_optimizer(opt_config, total_steps: int) -> optax.GradientTransformation:
  """`optax.sgd` / `optax.adamw` as the chains of parts they are (the same state structure, so
  checkpoints carry over), so that `opt_config.flatten` can flatten the moments alone: weight
  decay and the learning rate stay per leaf (the kernel mask; no concatenation of parameters)."""
  schedule = learning_rate_schedule(opt_config, total_steps)
  flat = optax.flatten if opt_config.flatten else (lambda inner: inner)
  if opt_config.name == 'sgd':  # L2 on the kernels, then optax.sgd(schedule, momentum)
    return optax.chain(
        optax.add_decayed_weights(opt_config.weight_decay, mask=kernel_mask),
        optax.chain(flat(optax.trace(decay=opt_config.momentum)),
                    optax.scale_by_learning_rate(schedule)))
  if opt_config.name == 'adamw':  # optax.adamw(schedule, weight_decay, mask=kernel_mask)
    return optax.chain(
        flat(optax.scale_by_adam()),
        optax.add_decayed_weights(opt_config.weight_decay, mask=kernel_mask),
        optax.scale_by_learning_rate(schedule))
  raise ValueError(f'unknown optimizer {opt_config.name!r}')
