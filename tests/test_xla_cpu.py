"""The XLA:CPU flags the entry points add (deepmarc_jax/xla_cpu.py)."""
import os
import subprocess
import sys

from deepmarc_jax import xla_cpu
from tests.conftest import REPO


def test_adds_ynn_dots_to_other_flags_and_keeps_a_users_choice():
  environ = {}
  assert xla_cpu.add_default_flags(environ) == xla_cpu.YNN_DOTS == environ['XLA_FLAGS']
  environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  xla_cpu.add_default_flags(environ)
  assert environ['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=8',
                                          xla_cpu.YNN_DOTS]
  assert xla_cpu.add_default_flags(environ).split().count(xla_cpu.YNN_DOTS) == 1  # idempotent
  mine = '--xla_cpu_experimental_ynn_fusion_type=-dot --xla_cpu_enable_fast_math=false'
  environ = {'XLA_FLAGS': mine}
  assert xla_cpu.add_default_flags(environ) == mine == environ['XLA_FLAGS']


def test_this_jax_accepts_the_flag():
  """XLA aborts the process on a flag it does not know: a JAX upgrade that drops this one must
  fail here, not in a user's run. The child computes a matmul with exactly these flags."""
  code = ('import jax.numpy as jnp; x = jnp.arange(12.0).reshape(3, 4); '
          'print(float((x @ x.T).sum()))')
  env = dict(os.environ, XLA_FLAGS=xla_cpu.YNN_DOTS)
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  x = [[4 * i + j for j in range(4)] for i in range(3)]
  expected = sum(sum(a * b for a, b in zip(r, s)) for r in x for s in x)
  assert float(result.stdout.strip()) == expected
