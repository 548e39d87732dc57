"""Data: COCO-format reading, the TFDS builder, the synthetic dataset and the tf.data pipeline."""
