"""The XLA:CPU flags the entry points add (deepmarc_jax/xla_cpu.py)."""
import os
import subprocess
import sys

import pytest

from deepmarc_jax import xla_cpu
from tests.conftest import REPO


def test_adds_the_flag_to_other_flags_and_keeps_a_users_choice():
  environ = {}
  assert (xla_cpu.add_default_flags(environ) == xla_cpu.NO_YNN_CONVOLUTIONS
          == environ['XLA_FLAGS'])
  environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  xla_cpu.add_default_flags(environ)
  assert environ['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=8',
                                          xla_cpu.NO_YNN_CONVOLUTIONS]
  assert xla_cpu.add_default_flags(environ).split().count(xla_cpu.NO_YNN_CONVOLUTIONS) == 1
  mine = f'{xla_cpu.YNN_FLAG}=+individual_convolution --xla_cpu_enable_fast_math=false'
  environ = {'XLA_FLAGS': mine}
  assert xla_cpu.add_default_flags(environ) == mine == environ['XLA_FLAGS']


# A child compiles a 3x3 convolution with the given XLA_FLAGS and prints how many YNNPACK
# fusions its HLO holds, then the convolution's sum (XLA aborts the process on a flag it does
# not know, so a JAX upgrade that drops this one fails here, not in a user's run).
_CHILD = '''
import jax, jax.numpy as jnp
x = jnp.ones((2, 16, 16, 64)); w = jnp.ones((3, 3, 64, 32))  # XLA leaves tiny convs alone
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
print(conv.lower(x, w).compile().as_text().count('__ynn_fusion'), float(conv(x, w).sum()))
'''


@pytest.mark.parametrize('flags, ynn_fusions', [
    (xla_cpu.NO_YNN_CONVOLUTIONS, 0),
    (f'{xla_cpu.YNN_FLAG}=+individual_convolution', 1),  # XLA's default, for contrast
])
def test_the_flag_takes_convolutions_off_ynnpack(flags, ynn_fusions):
  result = subprocess.run([sys.executable, '-c', _CHILD], cwd=REPO,
                          env=dict(os.environ, XLA_FLAGS=flags), capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  count, total = result.stdout.split()
  # Each output pixel sums 64 channels over the in-image part of its 3x3 window; along one axis
  # of 16 pixels the windows hold 2 + 14 * 3 + 2 = 46 in-image pixels, so 46^2 in 2D; times 32
  # output channels and 2 images.
  assert (int(count), float(total)) == (ynn_fusions, 2 * 32 * 64 * 46 ** 2)


def test_configure_process_quiets_tf_unless_set_and_adds_the_flags():
  environ = {}
  assert xla_cpu.configure_process(environ) == xla_cpu.NO_YNN_CONVOLUTIONS
  assert environ == {'TF_CPP_MIN_LOG_LEVEL': '2', 'XLA_FLAGS': xla_cpu.NO_YNN_CONVOLUTIONS}
  environ = {'TF_CPP_MIN_LOG_LEVEL': '0', 'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  xla_cpu.configure_process(environ)
  assert environ == {'TF_CPP_MIN_LOG_LEVEL': '0',
                     'XLA_FLAGS': f'--xla_dump_to=/tmp/x {xla_cpu.NO_YNN_CONVOLUTIONS}'}
