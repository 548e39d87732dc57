"""XLA:CPU settings the framework runs with, set in XLA_FLAGS before JAX starts its backend.

`YNN_DOTS` routes XLA:CPU's dot products (matmuls, and the dots XLA makes of convolutions and
their gradients) to YNNPACK kernels instead of Eigen: on this project's 2-core CPU the train
steps run faster and with less memory (README, Benchmarks, measures both side by side). The flag
only concerns the CPU backend; TPU and GPU runs ignore it.

Entry points call `add_default_flags()` before anything starts JAX's backend (importing jax is
fine; the flags are read when the first computation creates the CPU client). A user's own
setting of the same flag in XLA_FLAGS wins, e.g. `--xla_cpu_experimental_ynn_fusion_type=-dot`
for XLA's own Eigen kernels.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
YNN_DOTS = f'{YNN_FLAG}=dot'


def add_default_flags(environ: MutableMapping[str, str] = os.environ) -> str:
  """Adds YNN_DOTS to environ['XLA_FLAGS'] unless it already sets that flag; returns the value."""
  flags = environ.get('XLA_FLAGS', '')
  if not any(f.split('=', 1)[0] == YNN_FLAG for f in flags.split()):
    flags = f'{flags} {YNN_DOTS}'.strip()
    environ['XLA_FLAGS'] = flags
  return flags
