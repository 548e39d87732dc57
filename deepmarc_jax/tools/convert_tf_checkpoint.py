r"""Official Deep-MARC (TF Model Garden) or Deep-MAC (TF Object Detection API) checkpoint -> our
Flax `{'params', 'batch_stats'}` (by `config.model.meta_arch`).

Source model: `DeepMaskRCNNModel` (official/projects/deepmac_maskrcnn) saved with
`tf.train.Checkpoint(model=model)` (what Model Garden's trainer writes, optimizer slots and
counters beside it are ignored) or with the model's `checkpoint_items` at the root. Supported:
SpineNet (identity decoder) or ResNet + FPN backbones, the RPN head, one (non-cascade) Fast R-CNN
detection head, and a class-agnostic `DeepMaskHead` with any convnet_variant ('default',
'hourglass20/52/100'; the mapping is generic over hourglass depths).

  python -m deepmarc_jax.tools.convert_tf_checkpoint --config=experiments/deepmarc_spinenet.py \
      --tf_checkpoint=/path/to/ckpt-231000 --out=/path/to/converted
  python -m deepmarc_jax.tools.convert_tf_checkpoint --config=experiments/deepmac_centernet.py \
      --tf_checkpoint=/path/to/deepmac_1024x1024_coco17/checkpoint/ckpt-0 --out=/path/to/converted
  python run.py --config=experiments/deepmarc_spinenet.py --workdir=W \
      --config.init_from=/path/to/converted   # start training (or fine-tuning) from it

The config must describe the checkpoint's architecture; otherwise nothing is converted. Before
any variable is mapped, `architecture_mismatches` reads the architecture from
the checkpoint's variable names and shapes (Deep-MARC: backbone type and width_multiplier,
pyramid levels from the RPN's per-level BatchNorm names, FPN width, anchors per location, box
head, num_classes, mask head type and num_filters; Deep-MAC: the stacked hourglass, num_classes,
head and embedding widths, mask network type, nc and inputs) and compares it with the config's.
Any difference stops the conversion with one `ConversionError` listing each as
'WHAT: checkpoint has X, config says Y: set --config.FIELD=VALUE' (every flag together on one
line), followed by the variable-level problems. Numbers a checkpoint does not hold must be set
to the official values by the config: BatchNorm epsilons (SpineNet heads 1e-3, ResNet-FPN 1e-4;
hourglass 1e-5 is built in), anchor scales, ratios and size, input size.

Deep-MAC source model: `DeepMACMetaArch` (CenterNet with a stacked Hourglass feature extractor,
its prediction heads and the DeepMAC mask network, any hourglass `network_type`), saved with
`tf.train.Checkpoint(model=model)` as the OD API's trainer and the released
`deepmac_1024x1024_coco17` checkpoint are. All its names are object-graph attribute paths
(`_feature_extractor/_network/hourglass_network/1/...`, `_prediction_head_dict/object_center/0/
layer_with_weights-1/kernel`, `_mask_net/_net/...`, `_mask_net/project_out/kernel`).

How names are matched (never by list position):
* Subclassed Keras layers (heads, hourglass) by their object-graph attribute paths, e.g.
  `rpn_head/_norms/1/0/gamma` -> `rpn_head/norm_4_0/scale` (the level its Keras name
  `rpn-conv-norm_4_0` records; min_level + 1 for a name without one).
* The functional backbone / FPN by the Keras variable names recorded in the checkpoint
  (`full_name`, e.g. `bottleneck_block_2/conv2d_1/kernel`): SpineNet through
  `spinenet_keras_names`, ResNet through `resnet_keras_names`, FPN layers by their explicit names
  (`lateral_3`, `post_hoc_3`, `coarser_6`, `norm_3`, as ours). Keras numbers auto-named layers
  per session, so a backbone built after other layers has shifted suffixes: the offset of each
  layer class (conv2d, batch_normalization, bottleneck_block, residual_block) is measured from
  the checkpoint (its smallest suffix against the fresh-session expectation) and applied. A
  block's variables ('bottleneck_block_27/conv2d') match inside their block scope only.
Leaves: kernel/bias -> params kernel/bias (Keras HWIO kernels, Dense [in, out] and
Conv2DTranspose [h, w, out, in] are all our layouts), gamma/beta -> params scale/bias,
moving_mean/moving_variance -> batch_stats mean/var.

Any model variable of the checkpoint without a counterpart, any Flax leaf left unfilled, a
variable filled twice and every shape mismatch are collected and raised together as a
`ConversionError` naming both sides.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Callable, Iterator

import flax
import jax
import numpy as np

from deepmarc_jax import checkpoint
from deepmarc_jax.models import catalogue
from deepmarc_jax.models import mask_rcnn
from deepmarc_jax.models import meta_archs
from deepmarc_jax.models import spinenet as spinenet_lib

# Keras leaf -> (our collection, our leaf).
LEAVES = {
    'kernel': ('params', 'kernel'),
    'bias': ('params', 'bias'),
    'gamma': ('params', 'scale'),
    'beta': ('params', 'bias'),
    'moving_mean': ('batch_stats', 'mean'),
    'moving_variance': ('batch_stats', 'var'),
}
_BN_LEAVES = ('gamma', 'beta', 'moving_mean', 'moving_variance')
_ENCODER_DECODER_PARTS = ('encoder_block1', 'encoder_block2', 'inner_block', 'decoder_block')


class ConversionError(ValueError):
  """The checkpoint and the config's model do not correspond; the message lists every problem."""


class _Unmapped(Exception):
  """Internal: this variable path has no counterpart in our model."""


# --------------------------------------------------------------------------- checkpoint reading


@dataclasses.dataclass(frozen=True)
class Variable:
  """One saved variable: its checkpoint key, Keras name (`full_name`) and shape."""
  key: str
  full_name: str
  shape: tuple[int, ...]


class TFCheckpoint:
  """A TF2 object-based checkpoint: variables and the object graph that names them."""

  def __init__(self, path: str):
    import tensorflow as tf  # only the converter needs TF; keep `import deepmarc_jax` light
    from tensorflow.core.protobuf import trackable_object_graph_pb2
    if os.path.isdir(path):
      # The latest of a CheckpointManager's directory, else its only checkpoint (Checkpoint.write
      # records no 'checkpoint' state file).
      latest = tf.train.latest_checkpoint(path)
      indexes = sorted(f[:-len('.index')] for f in os.listdir(path) if f.endswith('.index'))
      if latest is None and len(indexes) != 1:
        raise FileNotFoundError(f'{path}: expected a checkpoint prefix, or a directory with a '
                                f'"checkpoint" file or exactly one *.index; found {indexes}')
      path = latest or os.path.join(path, indexes[0])
    self.path = path
    self.reader = tf.train.load_checkpoint(path)
    shapes = self.reader.get_variable_to_shape_map()
    if '_CHECKPOINTABLE_OBJECT_GRAPH' not in shapes:
      raise ConversionError(f'{path} is not a TF2 object-based checkpoint (no object graph); '
                            'save it with tf.train.Checkpoint(model=model)')
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(self.reader.get_tensor('_CHECKPOINTABLE_OBJECT_GRAPH'))
    self.nodes = graph.nodes
    self.variables: dict[int, Variable] = {}  # node id -> variable
    for i, node in enumerate(graph.nodes):
      for attr in node.attributes:
        if attr.name == 'VARIABLE_VALUE':
          self.variables[i] = Variable(attr.checkpoint_key, attr.full_name,
                                       tuple(shapes[attr.checkpoint_key]))

  def child(self, node: int, name: str) -> int | None:
    for ref in self.nodes[node].children:
      if ref.local_name == name:
        return ref.node_id
    return None

  def variables_under(self, node: int) -> dict[str, Variable]:
    """{attribute path relative to `node` (shortest, first found): variable} of its subtree.

    Paths through Keras' `_config_dict` aliases are avoided when another path exists.
    """
    found: dict[int, str] = {}
    queue = collections.deque([(node, '')])
    seen = {node}
    deferred = []
    while queue or deferred:
      if not queue:  # only aliased paths are left
        queue.append(deferred.pop(0))
      current, path = queue.popleft()
      if current in self.variables and current not in found:
        found[current] = path
      for ref in self.nodes[current].children:
        if ref.node_id in seen:
          continue
        child_path = f'{path}/{ref.local_name}' if path else ref.local_name
        if ref.local_name.startswith('_config_dict'):
          deferred.append((ref.node_id, child_path))
          continue
        seen.add(ref.node_id)
        queue.append((ref.node_id, child_path))
    return {path: self.variables[i] for i, path in found.items()}

  def tensor(self, variable: Variable) -> np.ndarray:
    return np.asarray(self.reader.get_tensor(variable.key), np.float32)


def _model_node(ckpt: TFCheckpoint) -> int:
  """The DeepMaskRCNNModel: root child 'model' (trainer checkpoints) or the root itself."""
  model = ckpt.child(0, 'model')
  node = 0 if model is None else model
  if ckpt.child(node, 'backbone') is None:
    names = [ref.local_name for ref in ckpt.nodes[node].children]
    raise ConversionError(f'{ckpt.path}: no backbone under the checkpoint root or its "model" '
                          f'(children: {names}); expected tf.train.Checkpoint(model=model)')
  return node


# --------------------------------------------------------------------------- name mappings


def _flax(module: str, keras_leaf: str) -> str:
  """Flat key 'collection/module/leaf' of our variables for a Keras leaf of `module`."""
  if keras_leaf not in LEAVES:
    raise _Unmapped(keras_leaf)
  collection, leaf = LEAVES[keras_leaf]
  return f'{collection}/{module}/{leaf}'


def _conv_bn(module: str, keras_part: str, keras_leaf: str) -> tuple[str, str]:
  """A Keras (conv, norm) pair -> (our ConvBN's Conv_0 / BatchNorm_0 path, Keras leaf)."""
  if keras_part == 'conv' and keras_leaf == 'kernel':
    return f'{module}/Conv_0', keras_leaf
  if keras_part == 'norm' and keras_leaf in _BN_LEAVES:
    return f'{module}/BatchNorm_0', keras_leaf
  raise _Unmapped(keras_part)


_RPN_NORM = re.compile(r'rpn-conv-norm_(\d+)_(\d+)$')


def _rpn_norm_level(full_name: str) -> int | None:
  """The pyramid level in an RPN norm's Keras name ('.../rpn-conv-norm_3_0/gamma' -> 3)."""
  match = _RPN_NORM.search(full_name.rsplit('/', 1)[0])
  return None if match is None else int(match.group(1))


def rpn_head_key(path: str, min_level: int, full_name: str = '') -> str:
  """RPNHead attribute path -> our flat key ('_norms/{level index}/{conv}' -> 'norm_{l}_{i}').

  The level is the one the Keras name records ('rpn-conv-norm_{level}_{conv}'); only a name
  without it falls back to min_level + the list index.
  """
  match path.split('/'):
    case ['_convs', i, leaf]:
      return _flax(f'rpn_head/conv_{int(i)}', leaf)
    case ['_norms', j, i, leaf] if leaf in _BN_LEAVES:
      level = _rpn_norm_level(full_name)
      level = min_level + int(j) if level is None else level
      return _flax(f'rpn_head/norm_{level}_{int(i)}', leaf)
    case ['_classifier', leaf]:
      return _flax('rpn_head/scores', leaf)
    case ['_box_regressor', leaf]:
      return _flax('rpn_head/boxes', leaf)
  raise _Unmapped(path)


def detection_head_key(path: str) -> str:
  """DetectionHead attribute path -> our flat key."""
  names = {'_convs': 'conv_{}', '_conv_norms': 'conv_bn_{}', '_fcs': 'fc_{}',
           '_fc_norms': 'fc_bn_{}'}
  match path.split('/'):
    case [part, i, leaf] if part in names:
      return _flax('detection_head/' + names[part].format(int(i)), leaf)
    case ['_classifier', leaf]:
      return _flax('detection_head/scores', leaf)
    case ['_box_regressor', leaf]:
      return _flax('detection_head/boxes', leaf)
  raise _Unmapped(path)


def _hourglass_residual_block(parts: list[str]) -> tuple[str, str]:
  """hourglass_network.ResidualBlock attributes -> (our hourglass.ResidualBlock path, leaf)."""
  match parts:
    case [('conv_block' | 'skip') as sub, part, leaf]:
      return _conv_bn(sub, part, leaf)
    case [('conv' | 'norm') as part, leaf]:  # the block's second conv and its norm
      return _conv_bn('conv', part, leaf)
  raise _Unmapped('/'.join(parts))


def _hourglass_encoder_decoder(parts: list[str]) -> tuple[str, str]:
  """EncoderDecoderBlock attributes (lists of blocks, a recursive inner block) -> ours."""
  match parts:
    case ['inner_block', '0', nested, *rest] if nested in _ENCODER_DECODER_PARTS:
      module, leaf = _hourglass_encoder_decoder([nested, *rest])
      return f'inner_block/{module}', leaf
    case [part, i, *rest] if part in _ENCODER_DECODER_PARTS and i.isdigit():
      module, leaf = _hourglass_residual_block(rest)
      return f'{part}/block_{int(i)}/{module}', leaf
  raise _Unmapped('/'.join(parts))


def hourglass_key(path: str) -> tuple[str, str]:
  """HourglassNetwork (initial_downsample=False, one hourglass) attribute path -> (our
  hourglass.Hourglass module path, Keras leaf)."""
  match path.split('/'):
    case ['conv_input', 'conv_block', part, leaf]:
      return _conv_bn('conv_input_conv_block', part, leaf)
    case ['conv_input', 'residual_block', *rest]:
      module, leaf = _hourglass_residual_block(rest)
      return f'conv_input_residual_block/{module}', leaf
    case ['hourglass_network', '0', *rest]:
      module, leaf = _hourglass_encoder_decoder(rest)
      return f'hourglass_network/{module}', leaf
    case ['output_conv', '0', part, leaf]:
      return _conv_bn('output_conv', part, leaf)
  raise _Unmapped(path)


def mask_head_key(path: str) -> str:
  """DeepMaskHead attribute path -> our flat key (convnet 'default' or an hourglass)."""
  match path.split('/'):
    case ['_convs', i, leaf]:
      return _flax(f'mask_head/convnet/conv_{int(i)}', leaf)
    case ['_conv_norms', i, leaf]:
      return _flax(f'mask_head/convnet/conv_bn_{int(i)}', leaf)
    case ['_hourglass', *rest]:
      module, leaf = hourglass_key('/'.join(rest))
      return _flax(f'mask_head/convnet/{module}', leaf)
    case ['_deconv', leaf]:
      return _flax('mask_head/deconv', leaf)
    case ['_deconv_bn', leaf]:
      return _flax('mask_head/deconv_bn', leaf)
    case ['_mask_regressor', leaf]:
      return _flax('mask_head/logits', leaf)
  raise _Unmapped(path)


# Deep-MAC (the TF OD API's DeepMACMetaArch): its prediction heads' dict keys -> ours.
DEEPMAC_HEADS = {'object_center': 'center', 'box/scale': 'box_scale', 'box/offset': 'box_offset',
                 'INSTANCE_EMBEDDING': 'instance_embedding',
                 'PIXEL_EMBEDDING': 'pixel_embedding'}


def stacked_hourglass_key(path: str) -> tuple[str, str]:
  """HourglassNetwork (initial_downsample=True, stacked: Hourglass-104) attribute path -> (our
  hourglass.StackedHourglass module path, Keras leaf)."""
  match path.split('/'):
    case ['downsample_input', 'conv_block', part, leaf]:
      return _conv_bn('downsample_input_conv_block', part, leaf)
    case ['downsample_input', 'residual_block', *rest]:
      module, leaf = _hourglass_residual_block(rest)
      return f'downsample_input_residual_block/{module}', leaf
    case ['hourglass_network', i, *rest] if i.isdigit():
      module, leaf = _hourglass_encoder_decoder(rest)
      return f'hourglass_network_{int(i)}/{module}', leaf
    case [('output_conv' | 'intermediate_conv1' | 'intermediate_conv2') as name, i, part,
          leaf] if i.isdigit():
      return _conv_bn(f'{name}_{int(i)}', part, leaf)
    case ['intermediate_residual', i, *rest] if i.isdigit():
      module, leaf = _hourglass_residual_block(rest)
      return f'intermediate_residual_{int(i)}/{module}', leaf
  raise _Unmapped(path)


def deepmac_key(path: str) -> str:
  """DeepMACMetaArch attribute path (below the model) -> our centernet.DeepMAC flat key."""
  match path.split('/'):
    case ['_feature_extractor', '_network', *rest]:
      module, leaf = stacked_hourglass_key('/'.join(rest))
      return _flax(f'backbone/{module}', leaf)
    case ['_prediction_head_dict', *head, i, layer, leaf] if (
        '/'.join(head) in DEEPMAC_HEADS and i.isdigit()):
      # Heads are keyed by name ('box/scale' holds a '/'); the Sequential's layers with
      # weights are its conv (0) and its 1x1 output conv (1).
      ours = {'layer_with_weights-0': 'conv', 'layer_with_weights-1': 'out'}.get(layer)
      if ours is None:
        raise _Unmapped(path)
      return _flax(f'heads_{DEEPMAC_HEADS["/".join(head)]}_{int(i)}/{ours}', leaf)
    case ['_mask_net', '_net', *rest]:
      module, leaf = hourglass_key('/'.join(rest))
      return _flax(f'mask_net/convnet/{module}', leaf)
    case ['_mask_net', 'project_out', leaf]:
      return _flax('mask_net/project_out', leaf)
  raise _Unmapped(path)


def spinenet_keras_names(spec: catalogue.SpineNetSpec, min_level: int = 3, max_level: int = 7
                         ) -> dict[str, tuple[str, str]]:
  """{our ConvBN path: (Keras conv layer name, Keras BN layer name)} for a fresh Keras session.

  Paths are '/'-joined flax module names ('stem', 'block_3_0/conv1', 'resample_5_1/downsample');
  Keras names are top-level ('conv2d_7') or block-scoped ('bottleneck_block_2/conv2d_1').
  """
  nodes = spinenet_lib.build_graph(spec.filter_size_scale)
  outputs = spinenet_lib.output_nodes(min_level, max_level)
  built = spinenet_lib.built_nodes(nodes, outputs)
  counters = {'conv2d': 0, 'bottleneck_block': 0, 'residual_block': 0}
  mapping = {}

  def unique(kind):
    n = counters[kind]
    counters[kind] += 1
    return kind if n == 0 else f'{kind}_{n}'

  def top_level(path, keep):
    conv = unique('conv2d')  # every Keras Conv2D here is followed by its own BN
    if keep:
      mapping[path] = (conv, conv.replace('conv2d', 'batch_normalization'))

  def blocks(prefix, node, in_channels, keep):
    for r in range(spec.block_repeats):
      scope = unique(f'{node.block_fn}_block')
      convs = ['conv1', 'conv2'] + (['conv3'] if node.block_fn == 'bottleneck' else [])
      if r == 0 and in_channels != node.channels:
        convs.insert(0, 'shortcut')
      for n, c in enumerate(convs):
        suffix = '' if n == 0 else f'_{n}'
        if keep:
          mapping[f'{prefix}_{r}/{c}'] = (f'{scope}/conv2d{suffix}',
                                          f'{scope}/batch_normalization{suffix}')

  top_level('stem', True)
  in_channels = 64
  for g in range(spinenet_lib.NUM_INIT_BLOCKS):
    blocks(f'stem_block_{g + 1}', nodes[g], in_channels, True)
    in_channels = nodes[g].channels
  for i in range(1, len(nodes) - spinenet_lib.NUM_INIT_BLOCKS + 1):
    j = i + spinenet_lib.NUM_INIT_BLOCKS - 1
    node, keep = nodes[j], j in built
    for k, p in enumerate(node.parents[:2]):
      convs = ['conv_in'] + (['downsample'] if node.level > nodes[p].level else []) + ['conv_out']
      for c in convs:
        top_level(f'resample_{i}_{k}/{c}', keep)
    blocks(f'block_{i}', node, node.channels, keep)  # fused input already has the block width
  for level in outputs:
    top_level(f'endpoint_{level}', True)
  return mapping


def resnet_keras_names(depth: int) -> dict[str, tuple[str, str]]:
  """{our ConvBN path: (Keras conv layer, Keras BN layer)} of Model Garden's ResNet (fresh session).

  The stem is 'conv2d' / 'batch_normalization'; blocks are 'bottleneck_block[_n]' in creation
  order (levels 2..5, then repeats); inside a block the shortcut (first block of a group) comes
  first, then conv1..conv3, numbered locally ('conv2d', 'conv2d_1', ...).
  """
  mapping = {'stem': ('conv2d', 'batch_normalization')}
  n = 0
  for i, repeats in enumerate(catalogue.RESNETS[f'resnet{depth}']):
    for j in range(repeats):
      scope = 'bottleneck_block' if n == 0 else f'bottleneck_block_{n}'
      n += 1
      convs = (['shortcut'] if j == 0 else []) + ['conv1', 'conv2', 'conv3']
      for k, conv in enumerate(convs):
        suffix = '' if k == 0 else f'_{k}'
        mapping[f'block_group_l{i + 2}_{j}/{conv}'] = (f'{scope}/conv2d{suffix}',
                                                      f'{scope}/batch_normalization{suffix}')
  return mapping


_AUTO_NAME = re.compile(
    r'^(conv2d|batch_normalization|bottleneck_block|residual_block)(?:_(\d+))?$')


def _split_auto_name(name: str) -> tuple[str, int] | None:
  match = _AUTO_NAME.match(name)
  return None if match is None else (match.group(1), int(match.group(2) or 0))


def _is_block_scope(name: str) -> bool:
  split = _split_auto_name(name)
  return split is not None and split[0] in ('bottleneck_block', 'residual_block')


def _shift_names(expected: dict[str, str], actual: list[str]) -> dict[str, str]:
  """Re-numbers the top-level auto names of `expected` ({keras layer: ours}) by the per-class
  offset between the checkpoint's smallest suffix and the expected smallest one."""
  def lowest(names):
    out = {}
    for name in names:
      split = _split_auto_name(name.split('/')[0])
      if split:
        out[split[0]] = min(out.get(split[0], split[1]), split[1])
    return out

  have, want = lowest(actual), lowest(expected)
  offsets = {kind: have[kind] - want[kind] for kind in want if kind in have}

  def shift(name):
    top, *rest = name.split('/')
    split = _split_auto_name(top)
    if split and offsets.get(split[0]):
      index = split[1] + offsets[split[0]]
      top = split[0] if index == 0 else f'{split[0]}_{index}'
    return '/'.join([top, *rest])

  return {shift(k): v for k, v in expected.items()}


def _functional_keys(variables: dict[str, Variable], layers: dict[str, str],
                     module: str) -> Iterator[tuple[Variable, str | None]]:
  """(variable, our flat key or None) for a functional Keras model's variables, by full_name.

  layers: {Keras layer name (fresh session): our module path} (a Conv_0/BatchNorm_0 or a
  plain Conv/BatchNorm module), re-numbered by `_shift_names`.
  """
  layers = _shift_names(layers, [v.full_name.rsplit('/', 1)[0] for v in variables.values()])
  for variable in variables.values():
    layer, leaf = variable.full_name.rsplit('/', 1) if '/' in variable.full_name else ('', '')
    ours = layers.get(layer)
    # A name scope above the model (e.g. 'outer/conv2d_3') is tolerated; a block's own scope
    # ('bottleneck_block_27/conv2d') is not: without it the name would be a top-level layer's.
    while ours is None and '/' in layer and not _is_block_scope(layer.split('/', 1)[0]):
      layer = layer.split('/', 1)[1]
      ours = layers.get(layer)
    try:
      yield variable, None if ours is None else _flax(f'{module}/{ours}', leaf)
    except _Unmapped:
      yield variable, None


def _conv_bn_layers(names: dict[str, tuple[str, str]]) -> dict[str, str]:
  """{our ConvBN path: (keras conv, keras bn)} -> {keras layer: our Conv_0 / BatchNorm_0 path}."""
  out = {}
  for path, (conv, norm) in names.items():
    out[conv] = f'{path}/Conv_0'
    out[norm] = f'{path}/BatchNorm_0'
  return out


def backbone_layers(settings: mask_rcnn.Settings) -> dict[str, str]:
  """{fresh-session Keras layer name: our module path under 'backbone'} for the config."""
  if settings.backbone in catalogue.SPINENETS:
    spec = spinenet_scaled_spec(settings)
    return _conv_bn_layers(spinenet_keras_names(spec, settings.min_level,
                                                    settings.max_level))
  return _conv_bn_layers(resnet_keras_names(int(settings.backbone[len('resnet'):])))


def spinenet_scaled_spec(settings: mask_rcnn.Settings) -> catalogue.SpineNetSpec:
  """The SpineNet spec `MaskRCNN.setup` builds (width_multiplier applied)."""
  spec = catalogue.SPINENETS[settings.backbone]
  return dataclasses.replace(
      spec, filter_size_scale=spec.filter_size_scale * settings.width_multiplier,
      endpoints_num_filters=int(spec.endpoints_num_filters * settings.width_multiplier))


def fpn_layers(settings: mask_rcnn.Settings) -> dict[str, str]:
  """Model Garden's FPN names its layers like ours: lateral_l, post_hoc_l, coarser_l, norm_l."""
  names = [f'{kind}_{level}' for kind in ('lateral', 'post_hoc', 'coarser', 'norm')
           for level in range(settings.min_level, settings.max_level + 1)]
  return {name: name for name in names}


# --------------------------------------------------------------------------- architecture check
#
# Before any variable is mapped, the checkpoint's architecture is read from its variables' names
# and shapes and compared with what the config describes. Names on our side are derived from the
# config, so a config that describes another architecture would otherwise be reported only as
# per-variable problems under names that follow the config (or, worse, mapped where names happen
# to agree). Every difference is reported with the config fields that describe the checkpoint.


@dataclasses.dataclass(frozen=True)
class Mismatch:
  """One architecture fact on which the checkpoint and the config differ.

  fix: (config field below `config.`, value) pairs that describe the checkpoint; empty when no
  config field can (the checkpoint holds something our models do not build).
  """
  what: str
  checkpoint: str
  config: str
  fix: tuple[tuple[str, object], ...] = ()

  def flags(self) -> str:
    return ' '.join(f'--config.{field}={_flag_value(value)}' for field, value in self.fix)

  def __str__(self) -> str:
    line = f'{self.what}: checkpoint has {self.checkpoint}, config says {self.config}'
    if self.fix:
      return f'{line}: set {self.flags()}'
    return f'{line}: no config field builds this, so our models cannot hold this checkpoint'


def _flag_value(value) -> str:
  if isinstance(value, float):
    text = f'{value:.6g}'
    return text if any(c in text for c in '.e') else text + '.0'
  return str(value)


def _simplest_value(accept: Callable[[float], bool], low: float, high: float) -> float | None:
  """The value in [low, high) with the fewest decimals that `accept`s (e.g. a width multiplier
  0.125 rather than 32 / 256.0000001), or None."""
  for decimals in range(7):
    step = 10.0 ** -decimals
    value = round(float(np.ceil(low / step - 1e-9)) * step, decimals)
    while value < high:
      if accept(value):
        return value
      value = round(value + step, decimals)
  return None


def _count(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
  """Entries of the list attribute `prefix` ('{prefix}/{i}/...' paths)."""
  indices = set()
  for path in shapes:
    if path.startswith(prefix + '/'):
      head = path[len(prefix) + 1:].split('/', 1)[0]
      if head.isdigit():
        indices.add(int(head))
  return len(indices)


def _out(shapes: dict[str, tuple[int, ...]], path: str) -> int | None:
  """Output width of the kernel at `path` (last axis), None if there is none."""
  shape = shapes.get(path)
  return None if not shape else shape[-1]


@dataclasses.dataclass(frozen=True)
class HourglassShape:
  """What a checkpoint's recursive EncoderDecoderBlock shows: channels and blocks per stage,
  whether its encoder strides (None: no stage shows it) and keeps the full-resolution branch."""
  channel_dims: tuple[int, ...]
  blocks_per_stage: tuple[int, ...]
  downsample: bool | None
  encoder_shortcut: bool


def hourglass_shape(shapes: dict[str, tuple[int, ...]], prefix: str) -> HourglassShape | None:
  """The hourglass_network.py EncoderDecoderBlock at attribute path `prefix` (e.g.
  '_hourglass/hourglass_network/0'), from its paths and kernel shapes; None if there is none."""
  dims, blocks, downsample = [], [], None
  shortcut = _count(shapes, f'{prefix}/encoder_block1') > 0
  while True:
    num_blocks = _count(shapes, f'{prefix}/encoder_block2')
    features = _out(shapes, f'{prefix}/decoder_block/{num_blocks - 1}/conv/kernel')
    inner = _out(shapes, f'{prefix}/encoder_block2/0/conv/kernel')
    if not num_blocks or features is None or inner is None:
      return None
    dims.append(features)
    blocks.append(num_blocks)
    # The first encoder block has a 1x1 skip conv when it strides, or when the width changes in
    # a stack of several blocks (hourglass.residual_stack_plan).
    if downsample is None and (num_blocks == 1 or features == inner):
      downsample = f'{prefix}/encoder_block2/0/skip/conv/kernel' in shapes
    nested = f'{prefix}/inner_block/0'
    if any(path.startswith(nested + '/encoder_block2/') for path in shapes):
      prefix = nested
      continue
    dims.append(inner)
    blocks.append(_count(shapes, f'{prefix}/inner_block'))
    return HourglassShape(tuple(dims), tuple(blocks), downsample, shortcut)


def hourglass_mask_heads(shape: HourglassShape, num_channels: int) -> list[str]:
  """catalogue.MASK_HEADS names whose hourglass at nc = num_channels has this shape."""
  if num_channels <= 0 or any(d % num_channels for d in shape.channel_dims):
    return []
  multipliers = tuple(d // num_channels for d in shape.channel_dims)
  return [name for name, spec in catalogue.MASK_HEADS.items()
          if isinstance(spec, catalogue.HourglassSpec)
          and spec.blocks_per_stage == shape.blocks_per_stage
          and spec.channel_multipliers == multipliers
          and spec.encoder_shortcut == shape.encoder_shortcut
          and shape.downsample in (None, spec.downsample)]


def _mask_type_fix(names: list[str], crop_field: str, crop_size: int
                   ) -> tuple[tuple[str, object], ...]:
  """Sets the mask head type to names[0], and the crop size to a multiple of its stride-2
  stages' total stride where it is not one (config_lib.validate's rule)."""
  if not names:
    return ()
  fix = [('model.mask_head.type', names[0])]
  spec = catalogue.MASK_HEADS[names[0]]
  if isinstance(spec, catalogue.HourglassSpec) and spec.downsample:
    multiple = 2 ** (len(spec.blocks_per_stage) - 1)
    if crop_size % multiple:
      fix.append((crop_field, -(-crop_size // multiple) * multiple))
  return tuple(fix)


def _hourglass_text(shape: HourglassShape | None) -> str:
  if shape is None:
    return 'an unrecognised network'
  return (f'an hourglass that no catalogue entry builds (channels {list(shape.channel_dims)}, '
          f'blocks per stage {list(shape.blocks_per_stage)})')


def _keras_layers(names: dict[str, tuple[int, ...]]
                  ) -> tuple[dict[str, dict[str, tuple[int, ...]]], dict[int, tuple[int, ...]]]:
  """A functional backbone's {block scope: {name below it: shape}} and {n: kernel shape} of its
  top-level 'conv2d_n' layers, from Keras full names (outer name scopes dropped)."""
  blocks, convs = {}, {}
  for name, shape in names.items():
    parts = name.split('/')
    while len(parts) > 2 and _split_auto_name(parts[0]) is None:
      parts = parts[1:]
    if len(parts) > 1 and _is_block_scope(parts[0]):
      blocks.setdefault(parts[0], {})['/'.join(parts[1:])] = shape
    elif len(parts) == 2 and parts[1] == 'kernel':
      split = _split_auto_name(parts[0])
      if split and split[0] == 'conv2d':
        convs[split[1]] = shape
  return blocks, convs


def _spinenet_widths(spec: catalogue.SpineNetSpec, width: float, levels: set[int]
                     ) -> tuple[int, ...]:
  """(block filters of each distinct width, endpoint filters) of `spec` at `width` with blocks
  at `levels`, scaled as MaskRCNN.setup scales them."""
  scale = spec.filter_size_scale * width
  blocks = {int(spinenet_lib.FILTER_SIZE_MAP[level] * scale) for level in levels}
  return (*sorted(blocks), int(spec.endpoints_num_filters * width))


def _resnet_widths(width: float) -> tuple[int, ...]:
  """(stem filters, block filters per group) of Model Garden's ResNet at depth_multiplier
  `width` (resnet.py)."""
  return (int(64 * width), *(int(64 * 2**i * width) for i in range(4)))


def _block_filters(blocks: dict[str, dict[str, tuple[int, ...]]]) -> list[int]:
  """Distinct inner widths of a backbone's bottleneck / residual blocks (their narrowest conv)."""
  widths = {min((shape[-1] for name, shape in block.items() if name.endswith('kernel')),
                default=None) for block in blocks.values()}
  return sorted(widths - {None})


@dataclasses.dataclass(frozen=True)
class _Backbone:
  """A backbone as the checkpoint shows it: its catalogue name and width_multiplier (None when
  nothing in the catalogue builds it), and the widths that pin the multiplier down."""
  family: str               # 'spinenet' | 'resnet'
  name: str | None
  width: float | None
  widths: tuple[int, ...]   # _spinenet_widths / _resnet_widths
  text: str
  block_levels: frozenset[int] = frozenset()  # SpineNet: levels of its built nodes


def backbone_from_keras_names(backbone: dict[str, tuple[int, ...]], has_fpn: bool,
                              levels: tuple[int, int] | None) -> _Backbone | None:
  """The catalogue backbone and width_multiplier a functional Keras backbone's variables
  ({Keras full name: shape}) show, None if it is neither a SpineNet nor a ResNet.

  A SpineNet (residual and bottleneck blocks, no FPN) is told by its block count per built node
  (block_repeats; which nodes are built depends on the output `levels`) and its block and
  endpoint widths; a ResNet (bottleneck blocks only) by its block count and its stem and block
  widths. The width multiplier is the one with the fewest decimals that gives those widths.
  """
  blocks, convs = _keras_layers(backbone)
  kinds = {_split_auto_name(scope)[0] for scope in blocks}
  if 'residual_block' in kinds and 'bottleneck_block' in kinds and not has_fpn:
    if levels is None or not convs:
      return None
    try:
      outputs = spinenet_lib.output_nodes(*levels)
    except ValueError:
      return None
    nodes = spinenet_lib.build_graph(1.0)
    built = spinenet_lib.built_nodes(nodes, outputs)
    block_levels = frozenset(nodes[j].level for j in built)
    endpoints = convs[max(convs)][-1]  # the endpoint convs are the last top-level ones
    widths = (*_block_filters(blocks), endpoints)
    repeats = len(blocks) // len(built) if len(blocks) % len(built) == 0 else None
    facts = (f'{len(blocks)} blocks = {repeats} per node' if repeats else
             f'{len(blocks)} blocks for {len(built)} nodes')
    facts += f', block filters {list(widths[:-1])}, endpoint filters {endpoints}'
    for name, spec in catalogue.SPINENETS.items():
      if spec.block_repeats != repeats:
        continue
      width = _simplest_value(
          lambda w, spec=spec: _spinenet_widths(spec, w, block_levels) == widths,
          endpoints / spec.endpoints_num_filters, (endpoints + 1) / spec.endpoints_num_filters)
      if width is not None:
        return _Backbone('spinenet', name, width, widths,
                         f'{name} at width_multiplier {_flag_value(width)} ({facts})',
                         block_levels)
    return _Backbone('spinenet', None, None, widths,
                     f'a SpineNet that no catalogue.SPINENETS row builds ({facts})',
                     block_levels)
  if kinds == {'bottleneck_block'}:
    stems = [shape for shape in convs.values() if shape[:3] == (7, 7, 3)]
    if not stems:
      return None
    widths = (stems[0][-1], *_block_filters(blocks))
    facts = (f'{len(blocks)} bottleneck blocks, stem of {widths[0]} filters, block filters '
             f'{list(widths[1:])}')
    width = _simplest_value(lambda w: _resnet_widths(w) == widths, widths[0] / 64,
                            (widths[0] + 1) / 64)
    for name, repeats in catalogue.RESNETS.items():
      if sum(repeats) == len(blocks) and width is not None:
        return _Backbone('resnet', name, width, widths,
                         f'{name} at width_multiplier {_flag_value(width)} ({facts})')
    return _Backbone('resnet', None, None, widths,
                     f'a ResNet that no catalogue.RESNETS entry builds ({facts})')
  return None


def _backbone_mismatches(found: _Backbone | None, m) -> list[Mismatch]:
  if found is None:
    return []
  said = f'{m.backbone.type} at width_multiplier {_flag_value(float(m.width_multiplier))}'
  if found.name is None:
    return [Mismatch('backbone', found.text, said)]
  if found.family == 'spinenet':
    config_widths = _spinenet_widths(catalogue.SPINENETS[found.name], m.width_multiplier,
                                     found.block_levels)
  else:
    config_widths = _resnet_widths(m.width_multiplier)
  fix = [('model.backbone.type', found.name)] if m.backbone.type != found.name else []
  if config_widths != found.widths:
    fix.append(('model.width_multiplier', found.width))
  return [Mismatch('backbone', found.text, said, tuple(fix))] if fix else []


def _levels_text(levels: tuple[int, int]) -> str:
  return f'{levels[0]}-{levels[1]}'


def _mask_rcnn_mismatches(ckpt: TFCheckpoint, model: int, config) -> list[Mismatch]:
  m = config.model
  problems: list[Mismatch] = []

  def under(name):
    node = ckpt.child(model, name)
    return {} if node is None else ckpt.variables_under(node)

  rpn, decoder = under('rpn_head'), under('decoder')
  backbone = {v.full_name: v.shape for v in under('backbone').values()}
  fpn = {v.full_name: v.shape for v in decoder.values()}

  # Pyramid levels: the RPN's per-level norms carry their level in the Keras name, so does FPN.
  levels = {_rpn_norm_level(v.full_name) for v in rpn.values()} - {None}
  source = 'its RPN has BatchNorms for levels'
  if not levels:
    levels = {int(x.group(1)) for name in fpn if (x := re.search(r'(?:^|/)norm_(\d+)/', name))}
    source = 'its FPN has outputs for levels'
  span = None
  if levels and sorted(levels) == list(range(min(levels), max(levels) + 1)):
    span = (min(levels), max(levels))
  found = backbone_from_keras_names(backbone, bool(fpn), span)
  problems += _backbone_mismatches(found, m)
  if span and span != (m.min_level, m.max_level):
    problems.append(Mismatch(
        'pyramid levels', f'{_levels_text(span)} ({source} {", ".join(map(str, sorted(levels)))})',
        _levels_text((m.min_level, m.max_level)),
        (('model.min_level', span[0]), ('model.max_level', span[1]))))
  lateral = [shape for name, shape in fpn.items() if re.search(r'(?:^|/)lateral_\d+/kernel$', name)]
  if lateral and lateral[0][-1] != m.fpn_filters:
    problems.append(Mismatch('FPN width', f'{lateral[0][-1]} filters', f'{m.fpn_filters}',
                             (('model.fpn_filters', lateral[0][-1]),)))

  # RPN: anchors per location (its score channels) and the conv our RPNHead builds (one conv of
  # the feature width).
  shapes = {path: v.shape for path, v in rpn.items()}
  anchors = _out(shapes, '_classifier/kernel')
  ratios = len(m.anchor.aspect_ratios)
  if anchors is not None and anchors != m.anchor.num_scales * ratios:
    fix = (('model.anchor.num_scales', anchors // ratios),) if anchors % ratios == 0 else ()
    problems.append(Mismatch(
        'anchors per location', f'{anchors} (RPN score channels)',
        f'{m.anchor.num_scales * ratios} (model.anchor.num_scales {m.anchor.num_scales} x '
        f'{ratios} model.anchor.aspect_ratios)', fix))
  conv = shapes.get('_convs/0/kernel')
  if _count(shapes, '_convs') > 1 or (conv and conv[-1] != conv[-2]):
    problems.append(Mismatch(
        'RPN convs', f'{_count(shapes, "_convs")} of {conv[-1] if conv else "?"} filters',
        'one conv of the feature width (the only RPN head we build)'))

  # Detection head (Model Garden keeps a list, one per cascade stage).
  node = ckpt.child(model, 'detection_head')
  if node is not None and ckpt.child(node, '1') is not None:
    problems.append(Mismatch('detection heads', 'a cascade of them', 'one (our model)'))
  if node is not None and ckpt.child(node, '0') is not None:
    node = ckpt.child(node, '0')
  shapes = {} if node is None else {p: v.shape for p, v in ckpt.variables_under(node).items()}
  box = m.box_head
  num_convs, num_fcs = _count(shapes, '_convs'), _count(shapes, '_fcs')
  facts = [('model.box_head.num_convs', 'box head convs', num_convs, box.num_convs),
           ('model.box_head.num_fcs', 'box head fully connected layers', num_fcs, box.num_fcs)]
  if num_convs:
    filters = _out(shapes, '_convs/0/kernel')
    facts.append(('model.box_head.num_filters', 'box head conv filters', filters,
                  box.num_filters))
    fc_in = shapes.get('_fcs/0/kernel', (None,))[0]
    crop = round((fc_in / filters) ** 0.5) if fc_in and filters else None
    if crop and crop * crop * filters == fc_in:
      facts.append(('model.box_head.crop_size', 'box head ROI size', crop, box.crop_size))
  if num_fcs:
    facts.append(('model.box_head.fc_dims', 'box head fully connected width',
                  _out(shapes, '_fcs/0/kernel'), box.fc_dims))
  classes = _out(shapes, '_classifier/kernel')
  facts.append(('model.num_classes', 'classes (background included)', classes, m.num_classes))
  for field, what, found_value, said in facts:
    if found_value is not None and found_value != said:
      problems.append(Mismatch(what, f'{found_value}', f'{said}', ((field, found_value),)))
  boxes = _out(shapes, '_box_regressor/kernel')
  if classes and boxes is not None and boxes != 4 * classes:
    problems.append(Mismatch('box regression outputs', f'{boxes} (class-agnostic boxes)'
                             if boxes == 4 else f'{boxes}', f'4 per class ({4 * classes})'))

  # Mask head: its convnet, its width (the deconv's filters), class-agnostic logits.
  shapes = {path: v.shape for path, v in under('mask_head').items()}
  deconv = shapes.get('_deconv/kernel')  # Conv2DTranspose [h, w, out, in]
  num_conv_layers = _count(shapes, '_convs')
  if num_conv_layers:
    names = [name for name, spec in catalogue.MASK_HEADS.items()
             if isinstance(spec, catalogue.ConvHeadSpec) and spec.num_convs == num_conv_layers]
    text = names[0] if names else f'a {num_conv_layers}-conv head that no catalogue entry builds'
  elif '_hourglass/conv_input/conv_block/conv/kernel' in shapes:
    shape = hourglass_shape(shapes, '_hourglass/hourglass_network/0')
    nc = _out(shapes, '_hourglass/conv_input/conv_block/conv/kernel')
    names = [] if shape is None else hourglass_mask_heads(shape, nc)
    text = names[0] if names else _hourglass_text(shape)
  else:
    names, text = [], None
  if text is not None and m.mask_head.type not in names:
    problems.append(Mismatch('mask head', text, m.mask_head.type,
                             _mask_type_fix(names, 'model.mask_head.crop_size',
                                            m.mask_head.crop_size)))
  if deconv and deconv[2] != m.mask_head.num_filters:
    problems.append(Mismatch('mask head filters', f'{deconv[2]}', f'{m.mask_head.num_filters}',
                             (('model.mask_head.num_filters', deconv[2]),)))
  if deconv and deconv[0] != 2:
    problems.append(Mismatch('mask upsampling', f'x{deconv[0]}', 'x2 (the only one we build)'))
  logits = _out(shapes, '_mask_regressor/kernel')
  if logits is not None and logits != 1:
    problems.append(Mismatch('mask logits', f'{logits} (a class-specific mask head)',
                             '1 (our mask heads are class-agnostic)'))
  return problems


def _deepmac_mismatches(ckpt: TFCheckpoint, model: int, config) -> list[Mismatch]:
  m, d = config.model, config.model.deepmac
  problems: list[Mismatch] = []
  shapes = {path: v.shape for path, v in ckpt.variables_under(model).items()}

  # Backbone: the stacked hourglass (stem width, channels and blocks per stage, stacks).
  net = '_feature_extractor/_network'
  stem = _out(shapes, f'{net}/downsample_input/conv_block/conv/kernel')
  shape = hourglass_shape(shapes, f'{net}/hourglass_network/0')
  if stem is not None and shape is not None:
    spec = catalogue.HourglassBackboneSpec(stem, shape.channel_dims, shape.blocks_per_stage,
                                           _count(shapes, f'{net}/hourglass_network'))
    names = [n for n, s in catalogue.HOURGLASS_BACKBONES.items() if s == spec]
    if m.backbone.type not in names:
      text = names[0] if names else (
          f'a stacked hourglass that no catalogue.HOURGLASS_BACKBONES entry builds ({spec})')
      problems.append(Mismatch('backbone', text, m.backbone.type,
                               (('model.backbone.type', names[0]),) if names else ()))

  # Prediction heads (first stack): classes are the centre heatmap's channels + background.
  def head(name, layer):
    return _out(shapes, f'_prediction_head_dict/{name}/0/layer_with_weights-{layer}/kernel')

  centers = head('object_center', 1)
  facts = [('model.num_classes', 'classes (background included)',
            None if centers is None else centers + 1, m.num_classes),
           ('model.deepmac.head_filters', 'prediction head filters', head('object_center', 0),
            d.head_filters),
           ('model.deepmac.instance_embedding_dim', 'instance embedding channels',
            head('INSTANCE_EMBEDDING', 1), d.instance_embedding_dim),
           ('model.deepmac.pixel_embedding_dim', 'pixel embedding channels',
            head('PIXEL_EMBEDDING', 1), d.pixel_embedding_dim)]
  for field, what, found_value, said in facts:
    if found_value is not None and found_value != said:
      problems.append(Mismatch(what, f'{found_value}', f'{said}', ((field, found_value),)))

  # Mask network: its type and nc, and its input (pixel embedding [+ y/x] [+ instance
  # embedding]).
  first = shapes.get('_mask_net/_net/conv_input/conv_block/conv/kernel')
  if first is not None:
    shape = hourglass_shape(shapes, '_mask_net/_net/hourglass_network/0')
    names = [] if shape is None else hourglass_mask_heads(shape, first[-1])
    if m.mask_head.type not in names:
      problems.append(Mismatch('mask network', names[0] if names else _hourglass_text(shape),
                               m.mask_head.type,
                               _mask_type_fix(names, 'model.deepmac.mask_size', d.mask_size)))
    if first[-1] != m.mask_head.num_filters:
      problems.append(Mismatch('mask network filters (nc)', f'{first[-1]}',
                               f'{m.mask_head.num_filters}',
                               (('model.mask_head.num_filters', first[-1]),)))
    pixel = head('PIXEL_EMBEDDING', 1) or d.pixel_embedding_dim
    instance = head('INSTANCE_EMBEDDING', 1) or d.instance_embedding_dim
    said = (d.pixel_embedding_dim + 2 * bool(d.use_xy)
            + d.instance_embedding_dim * bool(d.use_instance_embedding))
    if first[-2] != said:
      options = [(xy, inst) for xy in (True, False) for inst in (True, False)
                 if pixel + 2 * xy + instance * inst == first[-2]]
      fix = ()
      if len(options) == 1:
        fix = tuple((f'model.deepmac.{field}', value) for field, value in
                    zip(('use_xy', 'use_instance_embedding'), options[0])
                    if value != bool(d[field]))
      problems.append(Mismatch(
          'mask network input channels', f'{first[-2]}',
          f'{said} (pixel_embedding_dim {d.pixel_embedding_dim} + 2 if use_xy ({d.use_xy}) + '
          f'instance_embedding_dim {d.instance_embedding_dim} if use_instance_embedding '
          f'({d.use_instance_embedding}))', fix))
  return problems


_META_ARCHS = {
    'mask_rcnn': ('backbone', 'a Deep-MARC Mask R-CNN (a backbone, no _feature_extractor; '
                  'configs: experiments/deepmarc_spinenet.py, deepmarc_resnet.py)'),
    'deepmac': ('_feature_extractor', 'a Deep-MAC CenterNet (a _feature_extractor, no backbone; '
                'config: experiments/deepmac_centernet.py)'),
}


def architecture_mismatches(ckpt: TFCheckpoint, config) -> list[Mismatch]:
  """Every architecture fact the checkpoint's variable names and shapes show that the config's
  model does not match (empty when they agree, or for a model of neither kind)."""
  root = ckpt.child(0, 'model')
  model = 0 if root is None else root
  kinds = [kind for kind, (child, _) in _META_ARCHS.items() if ckpt.child(model, child) is not None]
  if len(kinds) != 1:
    return []
  kind = kinds[0]
  if kind != config.model.meta_arch:
    return [Mismatch('model', _META_ARCHS[kind][1], config.model.meta_arch,
                     (('model.meta_arch', kind),))]
  if kind == 'deepmac':
    return _deepmac_mismatches(ckpt, model, config)
  return _mask_rcnn_mismatches(ckpt, model, config)


_DETAILS = ('Variable by variable, against the config\'s model as it stands (its names follow the '
            'config, so these follow from the above):')


def _mismatch_message(path: str, mismatches: list[Mismatch], details: str | None,
                      heading: str = _DETAILS) -> str:
  lines = [f'{path}: the config describes another architecture than the checkpoint\'s; '
           'nothing was converted. Set these fields (or start from a config that describes '
           'the checkpoint):']
  lines += [f'  {m}' for m in mismatches]
  flags = ' '.join(m.flags() for m in mismatches if m.fix)
  if flags:
    lines.append(f'All together: {flags}')
  if details:
    lines += [heading, details]
  return '\n'.join(lines)



# --------------------------------------------------------------------------- conversion


def abstract_variables(config) -> dict[str, jax.ShapeDtypeStruct]:
  """Our model's variables for `config` as {'params/...': ShapeDtypeStruct} (no compute)."""
  from deepmarc_jax.data import pipeline
  model = meta_archs.model_from_config(config)
  spec = pipeline.PreprocessSpec(image_size=config.data.image_size, max_instances=2,
                                 mask_size=config.data.mask_size, allowed_mask_ids=(),
                                 train=True)
  batch = pipeline.dummy_batch(spec, batch_size=1)
  rng = jax.random.key(0)
  variables = jax.eval_shape(lambda: model.init(
      {'params': rng, 'sampling': rng, 'dropout': rng}, batch, train=True))
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep='/')


def _head_node(ckpt: TFCheckpoint, model: int, name: str) -> int | None:
  node = ckpt.child(model, name)
  if node is None or name != 'detection_head':
    return node
  # MaskRCNNModel keeps a list of detection heads (one per cascade stage).
  first, second = ckpt.child(node, '0'), ckpt.child(node, '1')
  if second is not None:
    raise ConversionError('the checkpoint has a cascade of detection heads; our model has one')
  return node if first is None else first


def mapped_variables(ckpt: TFCheckpoint, settings: mask_rcnn.Settings
                     ) -> Iterator[tuple[str, Variable, str | None]]:
  """(part, variable, our flat key or None when unmapped) for every variable of the model."""
  model = _model_node(ckpt)
  parts: dict[str, Callable[[str], str]] = {
      'rpn_head': lambda p, name: rpn_head_key(p, settings.min_level, name),
      'detection_head': lambda p, _: detection_head_key(p),
      'mask_head': lambda p, _: mask_head_key(p),
  }
  for part, key_fn in parts.items():
    node = _head_node(ckpt, model, part)
    if node is None:
      raise ConversionError(f'{ckpt.path}: the model has no {part}')
    for path, variable in ckpt.variables_under(node).items():
      try:
        yield part, variable, key_fn(path, variable.full_name)
      except _Unmapped:
        yield part, variable, None
  backbone = ckpt.variables_under(ckpt.child(model, 'backbone'))
  for variable, key in _functional_keys(backbone, backbone_layers(settings), 'backbone'):
    yield 'backbone', variable, key
  decoder = ckpt.child(model, 'decoder')
  decoder_vars = {} if decoder is None else ckpt.variables_under(decoder)
  if decoder_vars and settings.backbone in catalogue.SPINENETS:
    raise ConversionError(f'the checkpoint has a decoder ({len(decoder_vars)} variables) but '
                          f'our {settings.backbone} model uses the identity decoder')
  if not decoder_vars and settings.backbone not in catalogue.SPINENETS:
    raise ConversionError(f'the checkpoint has no FPN decoder variables, which our '
                          f'{settings.backbone} model needs')
  for variable, key in _functional_keys(decoder_vars, fpn_layers(settings), 'decoder'):
    yield 'decoder', variable, key


def mapped_deepmac_variables(ckpt: TFCheckpoint) -> Iterator[tuple[str, Variable, str | None]]:
  """(part, variable, our flat key or None when unmapped) for every variable of a Deep-MAC.

  The model is the root's child 'model' (the OD API trainer's `tf.train.Checkpoint(model=...)`)
  or the root itself; its stateless-RNG counter (`_self_supervised_rng`, for a loss whose weight
  is 0 in every released config) is not a model weight and is skipped.
  """
  model = ckpt.child(0, 'model')
  model = 0 if model is None else model
  if ckpt.child(model, '_feature_extractor') is None:
    names = [ref.local_name for ref in ckpt.nodes[model].children]
    raise ConversionError(f'{ckpt.path}: no _feature_extractor under the checkpoint root or '
                          f'its "model" (children: {names}); expected a Deep-MAC (CenterNet) '
                          'model saved with tf.train.Checkpoint(model=model)')
  for path, variable in ckpt.variables_under(model).items():
    part = path.split('/')[0].lstrip('_')
    if part == 'self_supervised_rng':
      continue
    try:
      yield part, variable, deepmac_key(path)
    except _Unmapped:
      yield part, variable, None


def convert_checkpoint(tf_checkpoint_path: str, config) -> dict:
  """Reads an official Deep-MARC (or Deep-MAC) TF checkpoint into our variables for `config`.

  Args:
    tf_checkpoint_path: a checkpoint prefix (e.g. '.../ckpt-231000') or a directory (its latest
      checkpoint).
    config: our ml_collections config; `config.model` (and `config.data.image_size`) must
      describe the checkpoint's architecture.
  Returns:
    {'params': ..., 'batch_stats': ...} nested dicts of float32 numpy arrays, ready for
    `MaskRCNN.apply` (or `DeepMAC.apply`).
  Raises:
    ConversionError: when the checkpoint's architecture (read from its variable names and
      shapes) is not the config's, naming the config fields and values that describe the
      checkpoint, followed by the variable-level problems; otherwise listing every unmapped
      checkpoint variable, unfilled Flax leaf, duplicate and shape mismatch.
  """
  ckpt = TFCheckpoint(tf_checkpoint_path)
  mismatches = architecture_mismatches(ckpt, config)
  try:
    variables = _convert(ckpt, config)
  except ConversionError as error:
    if not mismatches:
      raise
    details = str(error)
  except Exception as error:  # pylint: disable=broad-except
    if not mismatches:
      raise
    # E.g. a mask head type whose stages do not fit the config's crop size.
    details = f'(the config\'s model cannot be built: {type(error).__name__}: {error})'[:2000]
  else:
    if not mismatches:
      return variables
    details = None  # every name and shape fitted, yet the architecture differs: still refused
  raise ConversionError(_mismatch_message(ckpt.path, mismatches, details))


def _convert(ckpt: TFCheckpoint, config) -> dict:
  """convert_checkpoint's name-by-name mapping, with every problem raised together."""
  settings = meta_archs.model_from_config(config).settings
  template = abstract_variables(config)
  out, source = {}, {}
  problems = collections.defaultdict(list)  # kind -> messages
  if config.model.meta_arch == 'deepmac':
    variables = mapped_deepmac_variables(ckpt)
  else:
    variables = mapped_variables(ckpt, settings)
  for part, variable, key in variables:
    label = f'TF {variable.key} ({variable.full_name}, shape {list(variable.shape)})'
    if key is None:
      problems[f'{part} variables with no counterpart in our model'].append(label)
      continue
    claimed = key in source
    source.setdefault(key, variable.key)
    if key not in template:
      problems['variables mapped to a leaf our model does not have'].append(
          f'{label} -> ours {key}')
    elif claimed:
      problems['leaves filled twice'].append(f'{key}: by {source[key]} and by {variable.key}')
    elif tuple(template[key].shape) != variable.shape:
      hint = (' (a class-specific official mask head; ours is class-agnostic)'
              if key == 'params/mask_head/logits/kernel' and variable.shape[-1] > 1 else '')
      problems['shape mismatches'].append(
          f'shape mismatch: {label} vs ours {key} {list(template[key].shape)}{hint}')
    else:
      out[key] = ckpt.tensor(variable)
  unfilled = sorted(set(template) - set(source))
  if unfilled:
    problems['our leaves no TF variable fills'] = [
        f'ours {key} {list(template[key].shape)}' for key in unfilled]
  if problems:
    lines = []
    for kind, messages in problems.items():
      lines.append(f'{len(messages)} {kind}:')
      lines += [f'  {m}' for m in messages[:20]]
      lines += [f'  ... and {len(messages) - 20} more'] if len(messages) > 20 else []
    raise ConversionError(
        f'{ckpt.path} does not match the config\'s model ({settings.backbone}, mask head '
        f'{settings.mask_head_type}):\n' + '\n'.join(lines))
  return flax.traverse_util.unflatten_dict(out, sep='/')


# --------------------------------------------------------------------------- command line


def main(argv) -> None:
  from absl import flags
  if len(argv) > 1:
    raise SystemExit(f'unexpected arguments: {argv[1:]}')
  from deepmarc_jax import config_lib
  config, path = flags.FLAGS.config, flags.FLAGS.tf_checkpoint
  try:
    try:
      config_lib.validate(config)
    except config_lib.ConfigError as error:
      # A config written for another architecture can fail validation first (e.g. a mask head
      # whose stages need larger crops): then what the checkpoint needs comes first.
      ckpt = TFCheckpoint(path)
      mismatches = architecture_mismatches(ckpt, config)
      if not mismatches:
        raise
      raise ConversionError(_mismatch_message(
          ckpt.path, mismatches, str(error),
          'The config as it stands is also invalid (which may follow from the above):')
                            ) from error
    variables = convert_checkpoint(path, config)
  except (ConversionError, config_lib.ConfigError) as error:
    raise SystemExit(f'convert_tf_checkpoint: {error}') from None
  checkpoint.save_variables(variables, flags.FLAGS.out)
  counts = {k: sum(x.size for x in jax.tree_util.tree_leaves(v)) for k, v in variables.items()}
  print(f'wrote {flags.FLAGS.out} ({counts} values); train from it with '
        f'--config.init_from={os.path.abspath(flags.FLAGS.out)}', flush=True)


if __name__ == '__main__':
  from absl import app
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Our experiment config (its architecture must '
                                  'match the checkpoint), e.g. experiments/deepmarc_spinenet.py.')
  flags.DEFINE_string('tf_checkpoint', None, 'Official checkpoint prefix or directory.')
  flags.DEFINE_string('out', None, 'Directory for the converted orbax checkpoint (must not '
                      'exist).')
  flags.mark_flags_as_required(['config', 'tf_checkpoint', 'out'])
  app.run(main)
