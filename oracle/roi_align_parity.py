"""The official `multilevel_crop_and_resize` (Model Garden ROIAlign) on given features and boxes.

The oracle side of tests/test_ops_roi_align.py's
test_parity_with_official_multilevel_crop_and_resize. Runs under .venv-oracle (tf-models-official
2.20; `bash setup.sh` builds it), not .venv:

  .venv-oracle/bin/python oracle/roi_align_parity.py IN_NPZ OUT_NPZ

IN_NPZ holds `level_{l}` ([B, H_l, W_l, C] float32 features of pyramid level l), `boxes`
([B, N, 4] input pixels, y1 x1 y2 x2) and `sizes` (output sizes S). OUT_NPZ gets `out_{S}`
([B, N, S, S, C]) for each S: the official
`official.vision.ops.spatial_transform_ops.multilevel_crop_and_resize(features, boxes, S)`.
"""
import sys

import numpy as np
import tensorflow as tf
from official.vision.ops import spatial_transform_ops as sto


def main(argv):
  in_npz, out_npz = argv[1:]
  # One thread: the test runs beside others on few cores.
  tf.config.threading.set_intra_op_parallelism_threads(1)
  data = np.load(in_npz)
  features = {k.split('_')[1]: tf.constant(data[k]) for k in data.files if k.startswith('level_')}
  np.savez(out_npz, **{
      f'out_{s}': sto.multilevel_crop_and_resize(features, tf.constant(data['boxes']), s).numpy()
      for s in data['sizes']})


if __name__ == '__main__':
  main(sys.argv)
