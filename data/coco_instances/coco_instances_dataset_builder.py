"""`tfds build data/coco_instances --config=NAME [--manual_dir=DIR]` finds the builder here.

The builder lives in the package (deepmarc_jax/data/coco_instances.py) so that training code
can import it. TFDS's command line wants the class defined in this module, so this is a
subclass that changes nothing: same name, configs, features and data dir.
"""
from deepmarc_jax.data import coco_instances


class Builder(coco_instances.CocoInstances):
  """`coco_instances` as seen by the `tfds` command line."""
