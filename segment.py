r"""Masks for boxes you give, on any images, from any of our checkpoints (no detector).

  python segment.py --workdir=workdirs/demo --images=photo.jpg --boxes="10,20,90,120 40,5,80,60"
  python segment.py --workdir=workdirs/demo --images=a.png,b.png --boxes=boxes.json
  python segment.py --workdir=workdirs/demo --coco_annotations=instances.json --image_dir=images/
  python segment.py --config=experiments/deepmarc_spinenet.py --variables=/path/to/converted \
      --images=photo.jpg --boxes=0.1,0.2,0.5,0.6 --box_format=yxyx_norm
  python segment.py --workdir=workdirs/demo --serve [--port=8000] [--samples=DIR]
      the browser page on http://127.0.0.1:8000: upload or pick an image, draw, move and delete
      boxes, see the masks, download the COCO JSON and the label PNG

Boxes: inline (boxes separated by spaces or ';'), or a JSON file holding a list of boxes (one
image) or {image file name: [boxes]}, a box being four numbers or {"box": [...],
"category_id": id}; or the boxes of a COCO instances file (`bbox`, xywh) for the images it lists.
--box_format: xyxy (x1,y1,x2,y2 pixels, default), xywh (COCO), yxyx_norm (the official Colab's
normalised y1,x1,y2,x2). The boxes are printed back as interpreted; a bad box is reported and
skipped, a bad image file too, and the rest still runs (exit status 1 if any image failed).

Writes to --out_dir, per image NAME: NAME_labels.png (0 background, k = k-th box), NAME_overlay.png,
with --save_probabilities NAME_probabilities.npz; and results.json, COCO results with RLE masks
for all images (image ids from the COCO file, else 1, 2, ... in order).
"""
import os
import sys

from deepmarc_jax import xla_cpu  # noqa: E402  (imports nothing heavy)

xla_cpu.configure_process()  # before JAX and TF start (quiet TF logs, run.py's XLA:CPU flags)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'A run.py workdir (config.json + checkpoints/).')
_STEP = flags.DEFINE_integer('step', None, 'With --workdir: the checkpoint step (default latest).')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'With --variables: the experiment config that describes them.',
    lock_config=True)
_VARIABLES = flags.DEFINE_string(
    'variables', None, 'Converted variables (tools/convert_tf_checkpoint.py --out), with --config.')
_IMAGES = flags.DEFINE_list('images', [], 'Image files (comma-separated).')
_BOXES = flags.DEFINE_string('boxes', None, 'Inline boxes, or a JSON file of boxes.')
_COCO = flags.DEFINE_string('coco_annotations', None,
                            'A COCO instances JSON: segment the boxes of the images it lists.')
_IMAGE_DIR = flags.DEFINE_string('image_dir', '.', 'With --coco_annotations: the images\' folder.')
_BOX_FORMAT = flags.DEFINE_enum('box_format', 'xyxy', ['xyxy', 'xywh', 'yxyx_norm'],
                                'How to read the boxes\' numbers (a COCO file is always xywh).')
_OUT_DIR = flags.DEFINE_string('out_dir', 'segment_out', 'Where the outputs go.')
_THRESHOLD = flags.DEFINE_float('threshold', None,
                                'Mask probability threshold (default: the config\'s eval one).')
_SERVE = flags.DEFINE_bool('serve', False, 'Serve the browser page on 127.0.0.1 instead.')
_PORT = flags.DEFINE_integer('port', 8000, 'With --serve: the port (0 picks a free one).')
_SAMPLES = flags.DEFINE_string('samples', None, 'With --serve: a folder of images to pick from.')
_MAX_UPLOAD_MB = flags.DEFINE_float('max_upload_mb', 20.0, 'With --serve: the largest upload.')
_SAVE_PROBABILITIES = flags.DEFINE_bool(
    'save_probabilities', False, 'Also write NAME_probabilities.npz: the box-relative masks, the '
    'boxes and the probabilities pasted at the original resolution (float16).')


def _fail(message: str) -> None:
  sys.stderr.write(f'FATAL: {message}\n')
  sys.exit(2)


def _jobs():
  """[(image path, raw boxes or None if the source names none, box format, image id)]."""
  from deepmarc_jax.masks_from_boxes import boxes as boxes_lib  # pylint: disable=g-import-not-at-top
  if _COCO.value:
    if _IMAGES.value or _BOXES.value:
      _fail('--coco_annotations gives the images and boxes: drop --images and --boxes')
    return [(os.path.join(_IMAGE_DIR.value, name), raw, 'xywh', image_id)
            for name, image_id, raw in boxes_lib.read_coco_images(_COCO.value)]
  if not _IMAGES.value or not _BOXES.value:
    _fail('give --images and --boxes, or --coco_annotations')
  if os.path.isfile(_BOXES.value) or _BOXES.value.endswith('.json'):
    source = boxes_lib.read_json(_BOXES.value)
  else:
    source = boxes_lib.parse_inline(_BOXES.value)
  single = len(_IMAGES.value) == 1
  return [(path, boxes_lib.boxes_for_image(source, path, single), _BOX_FORMAT.value, i + 1)
          for i, path in enumerate(_IMAGES.value)]


def _serve(segmenter) -> None:
  from deepmarc_jax.masks_from_boxes import server  # pylint: disable=g-import-not-at-top
  app_state = server.App(segmenter, _SAMPLES.value, int(_MAX_UPLOAD_MB.value * (1 << 20)))
  try:
    httpd = server.make_server(app_state, '127.0.0.1', _PORT.value)
  except OSError as e:
    _fail(f'cannot listen on 127.0.0.1:{_PORT.value}: {e}')
  print(f'serving http://127.0.0.1:{httpd.server_address[1]}/ (Ctrl-C stops)', flush=True)
  try:
    httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    httpd.server_close()


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # the library's progress logs would drown the answer
  if bool(_WORKDIR.value) == bool(_VARIABLES.value):
    _fail('give --workdir (a run.py workdir) or --variables with --config')
  if _VARIABLES.value and _CONFIG.value is None:
    _fail('--variables needs --config, the experiment config that describes them')
  from deepmarc_jax.masks_from_boxes import boxes as boxes_lib  # pylint: disable=g-import-not-at-top
  jobs = []
  try:  # what needs no model first: argument errors come before TF and JAX start
    if not _SERVE.value:
      jobs = _jobs()
  except boxes_lib.BoxInputError as e:
    _fail(str(e))
  if _SERVE.value and (_IMAGES.value or _BOXES.value or _COCO.value):
    _fail('--serve takes images and boxes from the browser: drop --images, --boxes and '
          '--coco_annotations')
  if _WORKDIR.value and not os.path.isfile(os.path.join(_WORKDIR.value, 'config.json')):
    _fail(f'{_WORKDIR.value}/config.json not found: not a run.py workdir')

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # TF only resizes images; keep accelerators for JAX
  from deepmarc_jax.masks_from_boxes import files  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.masks_from_boxes import segmenter as segmenter_lib  # pylint: disable=g-import-not-at-top
  try:
    if _WORKDIR.value:
      segmenter = segmenter_lib.Segmenter.from_workdir(_WORKDIR.value, _STEP.value)
      source = f'{_WORKDIR.value} (step {_STEP.value or "latest"})'
    else:
      segmenter = segmenter_lib.Segmenter.from_variables(_CONFIG.value, _VARIABLES.value)
      source = _VARIABLES.value
  except (FileNotFoundError, segmenter_lib.CheckpointMismatchError) as e:
    _fail(str(e))
  print(f'model: {segmenter.config.model.backbone.type} + {segmenter.config.model.mask_head.type} '
        f'mask head at {segmenter.image_size} px, from {source}', flush=True)
  if _THRESHOLD.value is not None:
    segmenter.mask_threshold = _THRESHOLD.value
  threshold = segmenter.mask_threshold
  if _SERVE.value:
    _serve(segmenter)
    return
  summary = files.segment_files(segmenter, jobs, _OUT_DIR.value, threshold,
                                _SAVE_PROBABILITIES.value, log=lambda line: print(line, flush=True))
  print(f'{summary.images_done} image(s) segmented, {summary.boxes_done} mask(s); '
        f'{summary.boxes_skipped} box(es) skipped, {len(summary.failed)} image(s) failed; '
        f'results: {summary.results_path}', flush=True)
  if summary.failed:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
