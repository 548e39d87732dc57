"""An experiment built from its config: mesh, data builder, model, optimizer, and its state.

Everything the trainer, the evaluation loop and the tools share: `setup(config)`, the train
state (initialised directly into its shardings, or restored from a run's workdir), and the
model's jitted inference functions (`make_detect`, `make_segment_boxes`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from deepmarc_jax import checkpoint
from deepmarc_jax import optimizers
from deepmarc_jax import sharding
from deepmarc_jax.data import class_splits
from deepmarc_jax.data import pipeline
from deepmarc_jax.models import meta_archs


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds: the step (int32 scalar), params and BatchNorm statistics (the
  model's variable collections) and the optimizer state."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@dataclasses.dataclass
class Experiment:
  """Everything built from the config that the loop and the evaluator share.

  builder: the TFDS builder of config.data (None where no data is read, e.g. a benchmark);
  split_ids: {'seen': mask-trained category ids, 'unseen': box-only ones}.
  """
  config: Any
  mesh: jax.sharding.Mesh
  builder: Any
  model: Any  # a meta_archs model (mask_rcnn.MaskRCNN or centernet.DeepMAC)
  tx: optax.GradientTransformation
  split_ids: dict[str, list[int]]


def setup(config) -> Experiment:
  """Builds the mesh, the dataset (prepared if needed), the model and the optimizer."""
  mesh = sharding.make_mesh(config.mesh)
  if config.train.batch_size % mesh.shape['data']:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} is not divisible by '
                     f'the {mesh.shape["data"]} devices of the mesh\'s data axis')
  builder = pipeline.get_builder(config.data)
  category_ids = pipeline.category_ids(builder)
  seen = class_splits.resolve_mask_classes(config.data.mask_classes, category_ids)
  model = meta_archs.model_from_config(config)
  tx = optimizers.make_optimizer(config.train.optimizer, config.train.total_steps)
  return Experiment(config, mesh, builder, model, tx,
                    class_splits.split_of(seen, category_ids))


def for_inference(config) -> Experiment:
  """An Experiment on one device without data (no builder, no class splits): enough to restore
  a run's checkpoint and run the model (the masks-from-boxes tool)."""
  mesh = sharding.make_mesh([('data', 1)], devices=jax.devices()[:1])
  model = meta_archs.model_from_config(config)
  tx = optimizers.make_optimizer(config.train.optimizer, config.train.total_steps)
  return Experiment(config, mesh, None, model, tx, {})


def _init_fn(exp: Experiment):
  """rng -> a fresh TrainState of exp's model and optimizer."""
  data = exp.config.data
  spec = pipeline.PreprocessSpec(image_size=data.image_size, max_instances=data.max_instances,
                                 mask_size=data.mask_size, allowed_mask_ids=(), train=True)
  dummy = pipeline.dummy_batch(spec, batch_size=exp.mesh.shape['data'])

  def init(rng):
    variables = exp.model.init({'params': rng, 'sampling': rng, 'dropout': rng}, dummy,
                               train=True)
    params = variables['params']
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=exp.tx.init(params))
  return init


def abstract_state(exp: Experiment) -> TrainState:
  """The train state's shapes, dtypes and (replicated) shardings, as jax.ShapeDtypeStructs:
  what a checkpoint restores into. Nothing is computed or compiled."""
  shapes = jax.eval_shape(_init_fn(exp), jax.random.key(0))
  replicated = sharding.replicated(exp.mesh)
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


def init_state(exp: Experiment, rng: jax.Array) -> TrainState:
  """Initialises the train state directly into its (replicated) shardings."""
  shardings = jax.tree_util.tree_map(lambda s: s.sharding, abstract_state(exp))
  return jax.jit(_init_fn(exp), out_shardings=shardings)(rng)


def restore_checkpoint(exp: Experiment, workdir: str, step: int | None = None) -> TrainState:
  """The workdir's checkpoint of `step` (default the latest), restored into exp's state's
  shapes and shardings (exp may differ from the run's config where shapes do not, e.g. in a
  BatchNorm momentum). FileNotFoundError, naming the kept steps, if there is none of `step`."""
  kept = checkpoint.kept_steps(workdir)
  if not kept:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints')
  step = kept[-1] if step is None else step
  if step not in kept:
    raise FileNotFoundError(f'no checkpoint of step {step} in {workdir}/checkpoints; it keeps '
                            f'steps {kept}')
  ckpt = checkpoint.for_workdir(workdir)
  try:
    return ckpt.restore(abstract_state(exp), step)
  finally:
    ckpt.close()


def load_init_from(state: TrainState, path: str) -> TrainState:
  """`state` with params and batch_stats read from `path` (`checkpoint.save_variables`' layout).

  They are restored into the state's shapes, dtypes and shardings (orbax fails on any
  mismatch). The step and the optimizer state stay as initialised: SGD momentum and AdamW
  moments start at zero whatever the parameters are.
  """
  target = checkpoint.abstract({'params': state.params, 'batch_stats': state.batch_stats})
  variables = checkpoint.load_variables(path, target)
  return state.replace(params=variables['params'], batch_stats=variables['batch_stats'])


def make_detect(exp: Experiment):
  """Jitted `images [B,S,S,3] uint8 -> detections` (see the model's `detect`), replicated outputs."""
  def detect(state: TrainState, images):
    return exp.model.apply({'params': state.params, 'batch_stats': state.batch_stats}, images,
                           method='detect')
  return jax.jit(detect, out_shardings=sharding.replicated(exp.mesh))


def make_segment_boxes(exp: Experiment):
  """Jitted `(state, images [B,S,S,3] uint8, boxes [B,N,4] input pixels, classes [B,N]) ->
  mask probabilities [B,N,m,m]` (see the model's `segment_boxes`), replicated outputs."""
  def segment(state: TrainState, images, boxes, classes):
    return exp.model.apply({'params': state.params, 'batch_stats': state.batch_stats}, images,
                           boxes, classes, method='segment_boxes')
  return jax.jit(segment, out_shardings=sharding.replicated(exp.mesh))
