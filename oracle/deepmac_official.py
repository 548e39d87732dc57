"""The official Deep-MAC (TF Object Detection API) built for the oracle programs.

Imported by the programs in this folder that run under the Deep-MAC oracle venv
(`.venv-oracle-deepmac`, built from shared/oracle/setup_deepmac_venv.sh): it sets up TensorFlow
quietly on one thread and builds a `DeepMACMetaArch` through the OD API's own `model_builder`
from the model block of configs/tf2/center_net_deepmac_1024x1024_voc_only_tpu-128.config, with
a small Hourglass-104-layout backbone registered as an extra CenterNet feature extractor (as
shared/oracle/official_deepmac_facts.py does): the official code runs unpatched.
"""
import os
import sys

os.environ['TF_USE_LEGACY_KERAS'] = '1'  # the OD API is Keras-2 code
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # noqa: E402

# Before anything starts the TF runtime; one thread: the tests run beside others on few cores.
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
from absl import logging as absl_logging  # noqa: E402

absl_logging.set_verbosity(absl_logging.ERROR)
tf.get_logger().setLevel('ERROR')

from google.protobuf import text_format  # noqa: E402
from object_detection.builders import model_builder  # noqa: E402
from object_detection.meta_architectures import deepmac_meta_arch  # noqa: E402
from object_detection.models import center_net_hourglass_feature_extractor as hg_fe  # noqa
from object_detection.models.keras_models import hourglass_network  # noqa: E402
from object_detection.protos import pipeline_pb2  # noqa: E402

# The model block of the voc_only config, verbatim but for the placeholders.
MODEL_TEMPLATE = r'''
model {
  center_net {
    num_classes: {num_classes}
    feature_extractor {
      type: "{feature_extractor}"
      bgr_ordering: true
      channel_means: [104.01362025, 114.03422265, 119.9165958 ]
      channel_stds: [73.6027665 , 69.89082075, 70.9150767 ]
    }
    image_resizer {
      keep_aspect_ratio_resizer {
        min_dimension: {size}
        max_dimension: {size}
        pad_to_max_dimension: true
      }
    }
    object_detection_task {
      task_loss_weight: 1.0
      offset_loss_weight: 1.0
      scale_loss_weight: 0.1
      localization_loss {
        l1_localization_loss {
        }
      }
    }
    object_center_params {
      object_center_loss_weight: 1.0
      min_box_overlap_iou: 0.7
      max_box_predictions: {max_detections}
      classification_loss {
        penalty_reduced_logistic_focal_loss {
          alpha: 2.0
          beta: 4.0
        }
      }
    }
    deepmac_mask_estimation {
      dim: 32
      task_loss_weight: 5.0
      pixel_embedding_dim: 16
      mask_size: 32
      use_xy: true
      use_instance_embedding: true
      network_type: "{network_type}"
      num_init_channels: {num_init_channels}
      use_only_last_stage: {use_only_last_stage}
      classification_loss {
        weighted_sigmoid {}
      }
      allowed_masked_classes_ids: [{allowed_ids}]
    }
  }
}
'''
# Hourglass-104's layout (two stacks, 7x7/2 + residual/2 stem, inter-stack merges) with two
# stages and narrow channels: our catalogue's 'hourglass104_tiny'.
TINY_HOURGLASS = dict(input_channel_dims=16, channel_dims_per_stage=[32, 32, 48],
                      num_hourglasses=2, num_stages=2, blocks_per_stage=[2, 2, 4])
TINY_FE_NAME = 'hourglass_104_tiny_deepmarc_jax'


def _tiny_hourglass_fe(channel_means, channel_stds, bgr_ordering, **kwargs):
  del kwargs
  net = hourglass_network.HourglassNetwork(**TINY_HOURGLASS)
  return hg_fe.CenterNetHourglassFeatureExtractor(
      net, channel_means=channel_means, channel_stds=channel_stds, bgr_ordering=bgr_ordering)


model_builder.CENTER_NET_EXTRACTOR_FUNCTION_MAP[TINY_FE_NAME] = _tiny_hourglass_fe


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def build(*, num_classes: int, input_size: int, allowed_ids, feature_extractor: str = TINY_FE_NAME,
          network_type: str = 'hourglass100', num_init_channels: int = 8,
          use_only_last_stage: bool = False, max_detections: int = 100, seed: int = 0):
  """A DeepMACMetaArch of the voc_only config with the given overrides (is_training=True)."""
  text = (MODEL_TEMPLATE.replace('{num_classes}', str(num_classes))
          .replace('{feature_extractor}', feature_extractor)
          .replace('{size}', str(input_size))
          .replace('{max_detections}', str(max_detections))
          .replace('{network_type}', network_type)
          .replace('{num_init_channels}', str(num_init_channels))
          .replace('{use_only_last_stage}', 'true' if use_only_last_stage else 'false')
          .replace('{allowed_ids}', ', '.join(str(i) for i in allowed_ids)))
  config = text_format.Parse(text, pipeline_pb2.TrainEvalPipelineConfig())
  tf.keras.utils.set_random_seed(seed)
  model = model_builder.build(config.model, is_training=True)
  assert isinstance(model, deepmac_meta_arch.DeepMACMetaArch), type(model)
  return model
