"""The browser page (`segment.py --serve`): its HTTP answers, and a real headless Chromium that
uploads an image, draws, moves and deletes a box with the mouse, and downloads the label PNG.

The masks the page shows are checked against the segmenter run in this process on the same
box: the page must add nothing and lose nothing on the way."""
from __future__ import annotations

import contextlib
import http.client
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from deepmarc_jax.ops import masks as mask_ops
from tests.conftest import CHROMEDRIVER, CHROMIUM, REPO

H, W = 100, 150


@pytest.fixture(scope='module')
def served(tiny_workdir, tmp_path_factory):
  """`segment.py --serve` of random weights on a free port with a small upload limit; yields
  (port, samples)."""
  samples = tmp_path_factory.mktemp('samples')
  image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
  Image.fromarray(image).save(samples / 'random.png')
  with _serving(tiny_workdir, samples, '--max_upload_mb=0.1') as port:
    yield port, samples


@contextlib.contextmanager
def _serving(workdir, samples, *flags):
  """Runs `segment.py --serve` on a free port until the block ends; yields the port."""
  server = subprocess.Popen(
      [sys.executable, str(REPO / 'segment.py'), f'--workdir={workdir}', '--serve',
       '--port=0', f'--samples={samples}', *flags],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  port = None
  deadline = time.time() + 180
  lines = []
  while time.time() < deadline:
    line = server.stdout.readline()
    if not line:
      break
    lines.append(line)
    match = re.search(r'serving http://127\.0\.0\.1:(\d+)/', line)
    if match:
      port = int(match.group(1))
      break
  try:
    assert port, 'server did not start:\n' + ''.join(lines[-20:])
    yield port
  finally:
    server.terminate()
    server.wait(timeout=30)


@contextlib.contextmanager
def _chromium(download_dir):
  """Headless Debian Chromium driven by Selenium; yields the driver."""
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = str(CHROMIUM)
  for argument in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                   '--window-size=1000,800'):
    options.add_argument(argument)
  options.add_experimental_option('prefs', {'download.default_directory': str(download_dir),
                                            'download.prompt_for_download': False})
  driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
  try:
    yield driver
  finally:
    driver.quit()


def _request(port, method, path, body=None, headers=None):
  connection = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
  connection.request(method, path, body=body, headers=headers or {})
  response = connection.getresponse()
  data = response.read()
  connection.close()
  return response.status, data


def _json(port, method, path, body=None, headers=None):
  status, data = _request(port, method, path, body, headers)
  return status, json.loads(data)


def test_http_answers_and_bad_requests(served):
  port, samples = served
  status, info = _json(port, 'GET', '/api/info')
  assert status == 200 and info['samples'] == ['random.png'] and info['image_size'] == 128
  status, page = _request(port, 'GET', '/')
  assert status == 200 and b'Masks from boxes' in page
  image = (samples / 'random.png').read_bytes()
  status, added = _json(port, 'POST', '/api/image', image)
  assert status == 200 and (added['width'], added['height']) == (W, H)
  boxes = [[20, 10, 90, 60], [1, 2, 3, float('nan')]]
  status, answer = _json(port, 'POST', '/api/segment',
                         json.dumps({'image_id': added['image_id'], 'boxes': boxes}))
  assert status == 200 and len(answer["coco"]) == 1, answer
  assert answer['boxes'][1]['used'] is None and 'not finite' in answer['boxes'][1]['problem']

  # Bad requests: each a 4xx with a message, and the server keeps serving.
  bad = [
      ('POST', '/api/image', b'x' * 200_000, 413, 'limit'),
      ('POST', '/api/image', b'not an image at all', 400, 'not a readable image'),
      ('POST', '/api/segment', b'{"image_id": ', 400, 'malformed JSON'),
      ('POST', '/api/segment', b'[1, 2]', 400, 'expected a JSON object'),
      ('POST', '/api/segment', json.dumps({'image_id': 'nope', 'boxes': []}).encode(), 404,
       'unknown image_id'),
      ('POST', '/api/segment', json.dumps({'image_id': added['image_id'], 'boxes': [],
                                           'box_format': 'ltrb'}).encode(), 400, 'allowed'),
      ('GET', '/samples/..%2Fconfig.json', None, 404, 'no sample'),
      ('GET', '/api/segment', None, 405, 'not allowed'),
      ('GET', '/etc/passwd', None, 404, 'no such page'),
  ]
  for method, path, body, expected, message in bad:
    status, data = _json(port, method, path, body)
    assert status == expected and message in data['error'], (path, status, data)
  status, _ = _json(port, 'GET', '/api/info')
  assert status == 200


@pytest.mark.browser
@pytest.mark.slow
def test_draw_move_delete_and_download_in_chromium(served, segmenter_for_page, tmp_path):
  from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.keys import Keys  # pylint: disable=g-import-not-at-top
  port, samples = served
  with _chromium(tmp_path) as driver:
    answered = _answer_waiter(driver)
    driver.get(f'http://127.0.0.1:{port}/')
    driver.find_element(By.ID, 'upload').send_keys(str(samples / 'random.png'))
    answered.wait.until(lambda d: d.execute_script('return document.body.dataset.imageId'))
    overlay = driver.find_element(By.ID, 'overlay')
    assert (overlay.size['width'], overlay.size['height']) == (W, H)
    # Offsets are from the element's centre: draw from image pixel (20, 10) to (90, 60).
    ActionChains(driver).move_to_element_with_offset(overlay, 20 - W // 2, 10 - H // 2) \
        .click_and_hold().move_by_offset(35, 25).move_by_offset(35, 25).release().perform()
    answer = answered('state.answer.boxes.length === 1')
    (box,) = answer['boxes']
    x1, y1, x2, y2 = box['used']
    assert abs(x1 - 20) <= 1.5 and abs(y1 - 10) <= 1.5 and abs(x2 - 90) <= 1.5 \
        and abs(y2 - 60) <= 1.5, box
    _check_masks(answer, segmenter_for_page, samples / 'random.png')

    # Move it: drag from inside by (+20, +15).
    ActionChains(driver).move_to_element_with_offset(overlay, 50 - W // 2, 30 - H // 2) \
        .click_and_hold().move_by_offset(10, 8).move_by_offset(10, 7).release().perform()
    moved = answered(f'state.answer.boxes[0].used[0] > {x1 + 10}')
    mx1, my1, _, _ = moved['boxes'][0]['used']
    assert abs(mx1 - x1 - 20) <= 1.5 and abs(my1 - y1 - 15) <= 1.5, moved['boxes']
    _check_masks(moved, segmenter_for_page, samples / 'random.png')

    driver.find_element(By.ID, 'download-png').click()
    png = tmp_path / 'masks_labels.png'
    answered.wait.until(lambda d: png.exists() and png.stat().st_size > 0)
    labels = np.asarray(Image.open(png))
    decoded = mask_util.decode({'size': moved['coco'][0]['segmentation']['size'],
                                'counts': moved['coco'][0]['segmentation']['counts'].encode()})
    np.testing.assert_array_equal(labels == 1, decoded.astype(bool))

    # Select it (it is selected after the move) and delete it with the Delete key.
    ActionChains(driver).send_keys(Keys.DELETE).perform()
    deleted = answered('state.answer.boxes.length === 0')
    assert driver.execute_script('return state.boxes.length') == 0 and deleted['coco'] == []
    assert 'failed' not in driver.find_element(By.ID, 'status').text


@pytest.fixture(scope='module')
def segmenter_for_page(tiny_workdir):
  from deepmarc_jax.masks_from_boxes import segmenter as segmenter_lib  # pylint: disable=g-import-not-at-top
  return segmenter_lib.Segmenter.from_workdir(str(tiny_workdir))


def _answer_waiter(driver):
  """answered(condition): waits until no request is in flight and the last answer satisfies
  `condition` (a JS expression), and returns that answer."""
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  wait = WebDriverWait(driver, 120)

  def answered(condition):
    wait.until(lambda d: d.execute_script(
        f'return !state.pending && state.answer !== null && ({condition})'))
    return driver.execute_script('return state.answer')
  answered.wait = wait
  return answered


def _check_masks(answer, segmenter, image_path):
  """The page's mask (its COCO RLE) equals the in-process segmenter's for the box it used."""
  image = np.asarray(Image.open(image_path).convert('RGB'))
  x1, y1, x2, y2 = answer['boxes'][0]['used']
  yxyx = np.array([[y1, x1, y2, x2]])
  box_mask = segmenter.box_masks(segmenter.encode(image), yxyx)[0]
  expected = mask_ops.paste_box_mask(box_mask, yxyx[0], H, W) >= segmenter.mask_threshold
  segmentation = answer['coco'][0]['segmentation']
  page = mask_util.decode({'size': segmentation['size'],
                           'counts': segmentation['counts'].encode()}).astype(bool)
  iou = mask_ops.mask_iou(page, expected)
  assert iou >= 0.99 and 0 < expected.sum() < expected.size, iou


def _one_shape_per_unseen_class():
  """For each unseen class, the first image of the shapes dataset's style never trained on
  (split 'page') with a shape of it neither occluded nor cut by the border:
  [(image, true mask, category id)]."""
  from deepmarc_jax.data import shapes  # pylint: disable=g-import-not-at-top
  found = {}
  for index in range(300):
    image, instances = shapes.render_image(0, 'page', index, image_size=128)
    for instance in instances:
      mask, category = instance['mask'], instance['category_id']
      inside = not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
      if (category in shapes.UNSEEN_IDS and category not in found and inside
          and np.array_equal(mask, instance['full_mask'])):
        found[category] = (image, mask, category)
    if len(found) == len(shapes.UNSEEN_IDS):
      return [found[c] for c in shapes.UNSEEN_IDS]
  raise AssertionError(f'unseen classes without a whole shape in 300 images: '
                       f'{sorted(set(shapes.UNSEEN_IDS) - set(found))}')


@pytest.mark.browser
@pytest.mark.slow
def test_a_box_drawn_on_an_unseen_shape_gets_its_mask(demo_workdir, tmp_path):
  """Command 1's model behind the page: pick a sample, draw a box around a shape of a class it
  never saw a mask of, and the mask the page returns covers that shape (IoU with its true mask).
  """
  from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import Select  # pylint: disable=g-import-not-at-top
  samples = tmp_path / 'samples'
  samples.mkdir()
  cases = _one_shape_per_unseen_class()
  for k, (image, _, _) in enumerate(cases):
    Image.fromarray(image).save(samples / f'shapes_{k}.png')
  ious = []
  with _serving(demo_workdir, samples) as port, _chromium(tmp_path) as driver:
    answered = _answer_waiter(driver)
    driver.get(f'http://127.0.0.1:{port}/')
    for k, (image, true_mask, category) in enumerate(cases):
      before = driver.execute_script('return document.body.dataset.imageId || ""')
      Select(driver.find_element(By.ID, 'samples')).select_by_visible_text(f'shapes_{k}.png')
      answered.wait.until(lambda d, before=before: d.execute_script(
          'return document.body.dataset.imageId || ""') not in ('', before))
      size = image.shape[0]
      overlay = driver.find_element(By.ID, 'overlay')
      assert (overlay.size['width'], overlay.size['height']) == (size, size)
      rows, cols = np.flatnonzero(true_mask.any(1)), np.flatnonzero(true_mask.any(0))
      x1, y1, x2, y2 = cols[0], rows[0], cols[-1] + 1, rows[-1] + 1
      ActionChains(driver) \
          .move_to_element_with_offset(overlay, int(x1 - size // 2), int(y1 - size // 2)) \
          .click_and_hold().move_by_offset(int(x2 - x1) // 2, int(y2 - y1) // 2) \
          .move_by_offset(int(x2 - x1) - int(x2 - x1) // 2, int(y2 - y1) - int(y2 - y1) // 2) \
          .release().perform()
      answer = answered('state.answer.boxes.length === 1')
      segmentation = answer['coco'][0]['segmentation']
      page_mask = mask_util.decode({'size': segmentation['size'],
                                    'counts': segmentation['counts'].encode()}).astype(bool)
      ious.append(mask_ops.mask_iou(page_mask, true_mask))
      print(f'unseen class {category}: box {answer["boxes"][0]["used"]}, IoU {ious[-1]:.3f}')
  # Command 1's masks from GT boxes reach ~49 AP (IoU 0.5:0.95) on the unseen classes, some
  # shapes (square, hexagon) far better than others (cross, crescent). The baseline is the box
  # itself filled: what a model that learnt nothing about shapes would return.
  filled = [mask_ops.mask_iou(_box_filled(mask), mask) for _, mask, _ in cases]
  print(f'mean IoU {np.mean(ious):.3f}, of the filled boxes {np.mean(filled):.3f}')
  assert np.mean(ious) >= 0.7 and min(ious) >= 0.4, ious
  assert np.mean(ious) > np.mean(filled), (ious, filled)


def _box_filled(mask):
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  filled = np.zeros_like(mask)
  filled[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
  return filled
