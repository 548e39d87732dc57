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

The config must describe the checkpoint's architecture (backbone, widths, heads, mask head type
and num_filters, levels, classes); shapes check what they can. Numbers a checkpoint does not
hold must be set to the official values by the config: BatchNorm epsilons (SpineNet heads 1e-3,
ResNet-FPN 1e-4; hourglass 1e-5 is built in), anchors, input size.

Deep-MAC source model: `DeepMACMetaArch` (CenterNet with a stacked Hourglass feature extractor,
its prediction heads and the DeepMAC mask network, any hourglass `network_type`), saved with
`tf.train.Checkpoint(model=model)` as the OD API's trainer and the released
`deepmac_1024x1024_coco17` checkpoint are. All its names are object-graph attribute paths
(`_feature_extractor/_network/hourglass_network/1/...`, `_prediction_head_dict/object_center/0/
layer_with_weights-1/kernel`, `_mask_net/_net/...`, `_mask_net/project_out/kernel`).

How names are matched (never by list position):
* Subclassed Keras layers (heads, hourglass) by their object-graph attribute paths, e.g.
  `rpn_head/_norms/1/0/gamma` -> `rpn_head/norm_4_0/scale` (level = min_level + 1).
* The functional backbone / FPN by the Keras variable names recorded in the checkpoint
  (`full_name`, e.g. `bottleneck_block_2/conv2d_1/kernel`): SpineNet through
  `spinenet_keras_names`, ResNet through `resnet_keras_names`, FPN layers by their explicit names
  (`lateral_3`, `post_hoc_3`, `coarser_6`, `norm_3`, as ours). Keras numbers auto-named layers
  per session, so a backbone built after other layers has shifted suffixes: the offset of each
  layer class (conv2d, batch_normalization, bottleneck_block, residual_block) is measured from
  the checkpoint (its smallest suffix against the fresh-session expectation) and applied.
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


def rpn_head_key(path: str, min_level: int) -> str:
  """RPNHead attribute path -> our flat key ('_norms/{level index}/{conv}' -> 'norm_{l}_{i}')."""
  match path.split('/'):
    case ['_convs', i, leaf]:
      return _flax(f'rpn_head/conv_{int(i)}', leaf)
    case ['_norms', j, i, leaf] if leaf in _BN_LEAVES:
      return _flax(f'rpn_head/norm_{min_level + int(j)}_{int(i)}', leaf)
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
    # A name scope above the model (e.g. 'outer/conv2d_3') is tolerated.
    while ours is None and '/' in layer:
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
      'rpn_head': lambda p: rpn_head_key(p, settings.min_level),
      'detection_head': detection_head_key,
      'mask_head': mask_head_key,
  }
  for part, key_fn in parts.items():
    node = _head_node(ckpt, model, part)
    if node is None:
      raise ConversionError(f'{ckpt.path}: the model has no {part}')
    for path, variable in ckpt.variables_under(node).items():
      try:
        yield part, variable, key_fn(path)
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
  """Reads an official Deep-MARC TF checkpoint into our variables for `config`.

  Args:
    tf_checkpoint_path: a checkpoint prefix (e.g. '.../ckpt-231000') or a directory (its latest
      checkpoint).
    config: our ml_collections config; `config.model` (and `config.data.image_size`) must
      describe the checkpoint's architecture.
  Returns:
    {'params': ..., 'batch_stats': ...} nested dicts of float32 numpy arrays, ready for
    `MaskRCNN.apply`.
  Raises:
    ConversionError: listing every unmapped checkpoint variable, unfilled Flax leaf, duplicate
      and shape mismatch.
  """
  ckpt = TFCheckpoint(tf_checkpoint_path)
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
  config = flags.FLAGS.config
  config_lib.validate(config)
  variables = convert_checkpoint(flags.FLAGS.tf_checkpoint, config)
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
