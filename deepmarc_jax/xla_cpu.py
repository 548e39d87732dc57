"""XLA:CPU settings the framework runs with, set in XLA_FLAGS before JAX starts its backend.

jaxlib 0.10.2's XLA:CPU hands each convolution to YNNPACK by default (a `__ynn_fusion` around the
convolution in the compiled HLO). XLA's Eigen convolutions measured faster on x86 CPU, forward
and backward, and so did whole train steps (docs/benchmarks.md, "What limits speed").
`NO_YNN_CONVOLUTIONS` removes convolutions from XLA's YNNPACK list and keeps the rest of XLA's
defaults. The flag concerns the CPU backend only; TPU and GPU runs ignore it.

Entry points call `configure_process()` (TF's C++ logs quiet, then `add_default_flags()`) before
JAX starts its backend (importing jax is fine;
XLA reads the flags when the first computation creates the CPU client). A user's own setting of
the same flag in XLA_FLAGS wins: `--xla_cpu_experimental_ynn_fusion_type=+individual_convolution`
restores XLA's default.
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
NO_YNN_CONVOLUTIONS = f'{YNN_FLAG}=-individual_convolution'


def add_default_flags(environ: MutableMapping[str, str] = os.environ) -> str:
  """Adds NO_YNN_CONVOLUTIONS to environ['XLA_FLAGS'] unless it already sets that flag.

  Returns:
    The resulting XLA_FLAGS.
  """
  flags = environ.get('XLA_FLAGS', '')
  if not any(f.split('=', 1)[0] == YNN_FLAG for f in flags.split()):
    flags = f'{flags} {NO_YNN_CONVOLUTIONS}'.strip()
    environ['XLA_FLAGS'] = flags
  return flags


def configure_process(environ: MutableMapping[str, str] = os.environ) -> str:
  """What every entry point does first: TF's C++ logs quiet (TF_CPP_MIN_LOG_LEVEL=2 unless set)
  and `add_default_flags()`. Call it before JAX or TensorFlow start; returns the XLA_FLAGS."""
  environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  return add_default_flags(environ)
