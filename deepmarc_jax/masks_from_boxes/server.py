"""The browser page: a small HTTP server on 127.0.0.1, a thin client of the Segmenter.

Endpoints (JSON answers; errors are {"error": message} with a 4xx status):
  GET  /                  the page (static/index.html)
  GET  /api/info          the model, its input size and mask threshold, the sample images
  GET  /samples/NAME      a sample image (only names listed by /api/info)
  POST /api/image         body: an image file (any format PIL reads) -> {image_id, width, height};
                          the image is encoded once and kept (the last few, least recently used
                          dropped first)
  POST /api/segment       body: {"image_id", "boxes": [[x1, y1, x2, y2], ...] pixels,
                          optional "box_format"} -> {"boxes": per box as given / used / problem,
                          "labels_png": base64 indexed PNG (0 background, k = k-th box),
                          "coco": COCO results with RLE, "seconds"}
Limits: uploads over `max_upload_bytes` get 413, images over files.MAX_IMAGE_PIXELS or not
images 400, malformed JSON or fields 400, an unknown image id 404. Every request is handled on
its own; an error answers that request and the server keeps serving.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import http.server
import io
import json
import os
import threading
import time
from typing import Any

import numpy as np

from deepmarc_jax.masks_from_boxes import boxes as boxes_lib
from deepmarc_jax.masks_from_boxes import files
from deepmarc_jax.masks_from_boxes import outputs

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static')
SAMPLE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
MAX_JSON_BYTES = 1 << 20


class HttpError(Exception):

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class App:
  """The server's state: the segmenter, the encoded images, the sample folder."""

  def __init__(self, segmenter, samples_dir: str | None = None,
               max_upload_bytes: int = 20 << 20, cache_size: int = 8):
    self.segmenter = segmenter
    self.samples_dir = samples_dir
    self.max_upload_bytes = max_upload_bytes
    self.cache_size = cache_size
    self._images: collections.OrderedDict[str, tuple[np.ndarray, Any]] = (
        collections.OrderedDict())
    self._lock = threading.Lock()  # one model call at a time; the cache is shared

  def samples(self) -> list[str]:
    if not self.samples_dir or not os.path.isdir(self.samples_dir):
      return []
    return sorted(f for f in os.listdir(self.samples_dir)
                  if f.lower().endswith(SAMPLE_EXTENSIONS))

  def info(self) -> dict:
    config = self.segmenter.config
    return {'model': f'{config.model.backbone.type} + {config.model.mask_head.type} mask head',
            'image_size': self.segmenter.image_size,
            'threshold': self.segmenter.mask_threshold, 'samples': self.samples(),
            'max_upload_bytes': self.max_upload_bytes}

  def add_image(self, data: bytes) -> dict:
    image_id = hashlib.sha256(data).hexdigest()[:16]
    with self._lock:
      if image_id in self._images:
        self._images.move_to_end(image_id)
        image = self._images[image_id][0]
      else:
        try:
          image = files.read_image(io.BytesIO(data), name='upload')
        except files.ImageReadError as e:
          raise HttpError(400, str(e)) from e
        self._images[image_id] = (image, self.segmenter.encode(image))
        while len(self._images) > self.cache_size:
          self._images.popitem(last=False)
    return {'image_id': image_id, 'width': int(image.shape[1]), 'height': int(image.shape[0])}

  def segment(self, request: Any) -> dict:
    if not isinstance(request, dict):
      raise HttpError(400, 'expected a JSON object {"image_id", "boxes"}')
    image_id, raw = request.get('image_id'), request.get('boxes')
    box_format = request.get('box_format', 'xyxy')
    if not isinstance(image_id, str) or not isinstance(raw, list):
      raise HttpError(400, '"image_id" (string) and "boxes" (list) are required')
    if box_format not in boxes_lib.FORMATS:
      raise HttpError(400, f'box_format {box_format!r}; allowed: {", ".join(boxes_lib.FORMATS)}')
    start = time.perf_counter()
    with self._lock:
      if image_id not in self._images:
        raise HttpError(404, f'unknown image_id {image_id!r}: upload the image first')
      self._images.move_to_end(image_id)
      image, encoded = self._images[image_id]
      height, width = image.shape[:2]
      parsed = boxes_lib.interpret(raw, box_format, height, width)
      masks = self.segmenter.masks(encoded, parsed)
    threshold = self.segmenter.mask_threshold
    png = io.BytesIO()
    outputs.save_label_png(masks.labels(threshold), png)
    return {
        'boxes': [{'number': k, 'given': list(b.given),
                   'used': None if not b.usable else [b.yxyx[1], b.yxyx[0], b.yxyx[3], b.yxyx[2]],
                   'problem': b.problem} for k, b in enumerate(parsed, 1)],
        'labels_png': base64.b64encode(png.getvalue()).decode('ascii'),
        'coco': masks.coco_results(1, threshold), 'seconds': time.perf_counter() - start}


class Handler(http.server.BaseHTTPRequestHandler):
  """Routes requests to the server's App (`self.server.app`)."""
  server_version = 'deepmarc-segment/1'

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args  # quiet: the terminal shows what segment.py prints

  def _send(self, status: int, body: bytes, content_type: str) -> None:
    self.send_response(status)
    self.send_header('Content-Type', content_type)
    self.send_header('Content-Length', str(len(body)))
    self.send_header('Cache-Control', 'no-store')
    self.end_headers()
    self.wfile.write(body)

  def _json(self, status: int, data: Any) -> None:
    self._send(status, json.dumps(data).encode(), 'application/json')

  def _body(self, limit: int) -> bytes:
    try:
      length = int(self.headers.get('Content-Length', ''))
    except ValueError as e:
      raise HttpError(411, 'a Content-Length header is required') from e
    if length > limit:
      raise HttpError(413, f'request body of {length:,} bytes; the limit is {limit:,}')
    return self.rfile.read(length)

  def _handle(self, method: str) -> None:
    app = self.server.app
    path = self.path.split('?', 1)[0]
    try:
      if method == 'GET' and path in ('/', '/index.html'):
        with open(os.path.join(STATIC_DIR, 'index.html'), 'rb') as f:
          self._send(200, f.read(), 'text/html; charset=utf-8')
      elif method == 'GET' and path == '/api/info':
        self._json(200, app.info())
      elif method == 'GET' and path.startswith('/samples/'):
        name = path[len('/samples/'):]
        if name not in app.samples():
          raise HttpError(404, f'no sample {name!r}')
        with open(os.path.join(app.samples_dir, name), 'rb') as f:
          self._send(200, f.read(), 'application/octet-stream')
      elif method == 'POST' and path == '/api/image':
        self._json(200, app.add_image(self._body(app.max_upload_bytes)))
      elif method == 'POST' and path == '/api/segment':
        try:
          request = json.loads(self._body(MAX_JSON_BYTES))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          raise HttpError(400, f'malformed JSON: {e}') from e
        self._json(200, app.segment(request))
      elif path in ('/', '/index.html', '/api/info', '/api/image', '/api/segment'):
        raise HttpError(405, f'{method} not allowed on {path}')
      else:
        raise HttpError(404, f'no such page: {path}')
    except HttpError as e:
      self._json(e.status, {'error': str(e)})
    except Exception as e:  # pylint: disable=broad-except
      self._json(500, {'error': f'internal error: {type(e).__name__}: {e}'})

  def do_GET(self):  # pylint: disable=invalid-name
    self._handle('GET')

  def do_POST(self):  # pylint: disable=invalid-name
    self._handle('POST')


def make_server(app: App, host: str = '127.0.0.1', port: int = 8000
                ) -> http.server.ThreadingHTTPServer:
  """The server (not started); port 0 picks a free one (`server.server_address[1]`)."""
  server = http.server.ThreadingHTTPServer((host, port), Handler)
  server.daemon_threads = True
  server.app = app
  return server
