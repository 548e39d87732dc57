"""What both sides of a side-by-side benchmark share: the machine line and the inputs.

Plain numpy, so that the benchmarks in .venv (benchmarks/segment_speed.py) and the official
programs in the oracle venvs (official_segment_speed.py, official_deepmac_speed.py) import the
same code and time the same image and boxes.
"""
import os
import platform

import numpy as np

NUM_BOXES = 16


def cpu_line() -> str:
  """The CPU model and its vector extensions, from /proc/cpuinfo."""
  model, flags = platform.processor() or '?', []
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          model = value.strip()
        elif key.strip() == 'flags':
          flags = value.split()
          break
  except OSError:
    pass
  vector = [f for f in flags if f.startswith(('avx', 'amx', 'fma', 'f16c'))]
  return f'cpu {model}, {os.cpu_count()} cpus, {" ".join(sorted(vector)) or "no AVX"}'


def segment_inputs(size: int) -> tuple[np.ndarray, np.ndarray]:
  """The image [size, size, 3] uint8 (seed 0) and NUM_BOXES boxes [N, 4] (y1, x1, y2, x2
  pixels; seed 1, sides log-uniform in 1/16..1/2 of the image)."""
  image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
  rng = np.random.default_rng(1)
  boxes = np.zeros((NUM_BOXES, 4), np.float32)
  for k in range(NUM_BOXES):
    h, w = np.exp(rng.uniform(np.log(size / 16), np.log(size / 2), 2))
    y, x = rng.uniform(0, size - h), rng.uniform(0, size - w)
    boxes[k] = [y, x, y + h, x + w]
  return image, boxes


def checksum(image: np.ndarray, boxes: np.ndarray) -> str:
  return f'image sum {int(image.sum(dtype=np.int64))}, boxes sum {float(boxes.sum()):.3f}'
