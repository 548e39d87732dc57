"""Device mesh and shardings from `config.mesh` (jax.jit with shardings: what pjit became).

The global batch is split over the 'data' axis; parameters and optimizer state are replicated
(`P()`), so BatchNorm statistics computed inside the jitted step are global (sync BN) for free.
Each process feeds its own slice of the batch; `global_batch` assembles the global arrays.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(axes: Sequence[tuple[str, int]], devices=None) -> jax.sharding.Mesh:
  """A mesh from [(name, size), ...]; one size may be -1 (all remaining devices).

  Axes are `Auto` (GSPMD propagation): jax >= 0.7 defaults `make_mesh` to Explicit axes.
  """
  devices = list(devices if devices is not None else jax.devices())
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'config.mesh={list(axes)}: {len(devices)} devices are not divisible by '
                       f'the fixed axes ({known})')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'config.mesh={list(axes)} needs {int(np.prod(sizes))} devices, '
                     f'{len(devices)} are available')
  return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data'."""
  return NamedSharding(mesh, P('data'))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """This process's slice of the batch (numpy) -> global jax.Arrays sharded on 'data'."""
  sharding = data_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
