r"""Training-pipeline throughput (images/s) on real COCO images with masks.

  .venv/bin/python benchmarks/pipeline_speed.py [--image_size=1024] [--batches=40]

Reads coco_mini_seg (128 real COCO train images, 7.3 instances each) from ../shared/data,
builds it into a temporary TFDS dir and times the train pipeline (decode, flip, scale jitter,
crop/pad, RLE decode and per-instance mask crops at 112x112, batching) after a warm-up, for
the R50 recipe's jitter (0.8-1.25) and the SpineNet recipe's (0.1-2.0). Printed, not asserted;
results in docs/benchmarks.md.
"""
import argparse
import os
import pathlib
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import ml_collections  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from deepmarc_jax.data import pipeline  # noqa: E402
from deepmarc_jax.data.coco_instances import CocoInstances  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'coco_mini_seg'


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--image_size', type=int, default=1024)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--batches', type=int, default=40)
  args = parser.parse_args()
  tf.config.set_visible_devices([], 'GPU')

  builder = CocoInstances(config='coco_mini_seg', data_dir=tempfile.mkdtemp())
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(DATA), try_download_gcs=False))
  print(f'cores: {os.cpu_count()}; image_size {args.image_size}, batch {args.batch_size}, '
        f'max_instances 100, mask_size 112')
  for jitter in ((0.8, 1.25), (0.1, 2.0)):
    config = ml_collections.ConfigDict(dict(
        tfds_name='coco_instances/coco_mini_seg', train_split='train', image_size=args.image_size,
        max_instances=100, mask_size=112, hflip=True, scale_jitter=jitter, mask_classes='voc',
        shuffle_buffer=128))
    ds = pipeline.train_dataset(config, builder, batch_size=args.batch_size, seed=0)
    it = iter(ds)
    for _ in range(5):  # warm-up: fills the shuffle buffer and the prefetch queue
      next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    seconds = time.perf_counter() - start
    print(f'scale jitter {jitter}: {args.batches * args.batch_size / seconds:6.1f} images/s '
          f'({seconds / args.batches * 1000:.0f} ms per batch of {args.batch_size})')


if __name__ == '__main__':
  main()
