"""Whole-file writes: readers (and a resumed run) see the old file or the new one, never half.

The run's small files (config.json, eval_<step>.json, metrics.jsonl when it is cut back) are
written through a temporary file and a rename, so a kill or a full disk mid-write leaves the
previous version intact.
"""
import os


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` through `path.tmp` and a rename. OSError (e.g. a full disk) names
  `path`; the old file, if any, is kept and no temporary file is left."""
  path = os.fspath(path)
  try:
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)
  except OSError as e:
    if os.path.exists(path + '.tmp'):
      os.remove(path + '.tmp')
    raise OSError(e.errno, f'{e.strerror} (writing {path})') from e
