"""Seen/unseen class splits (COCO category ids) and `data.mask_classes` resolution.

The VOC ids are the 20 PASCAL VOC classes in COCO's 1..90 id space, exactly as in the official
Deep-MARC configs (official/vision/detection/utils/class_utils.py); nonVOC is the other 60.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

COCO_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90)

VOC_IDS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72)
NONVOC_IDS: tuple[int, ...] = tuple(i for i in COCO_IDS if i not in VOC_IDS)

NAMED_SPLITS = ('voc', 'nonvoc', 'all')


def resolve_mask_classes(spec: str | Sequence[int] | None,
                         category_ids: Iterable[int] = COCO_IDS) -> tuple[int, ...]:
  """Returns the sorted category ids whose masks may be used for training.

  Args:
    spec: 'voc', 'nonvoc', 'all', a comma-separated string of ids ('1,3,7') or a sequence of ids.
    category_ids: the dataset's category ids; 'all' means all of them and explicit ids are
      checked against them.
  """
  category_ids = tuple(sorted(int(c) for c in category_ids))
  if spec is None or spec == 'all':
    return category_ids
  if isinstance(spec, str):
    if spec == 'voc':
      return VOC_IDS
    if spec == 'nonvoc':
      return NONVOC_IDS
    try:
      spec = [int(s) for s in spec.split(',') if s.strip()]
    except ValueError:
      raise ValueError(
          f'data.mask_classes={spec!r}: expected one of {NAMED_SPLITS} or a list of category '
          'ids such as "1,3,7"') from None
  ids = tuple(sorted({int(i) for i in spec}))
  unknown = [i for i in ids if i not in category_ids]
  if unknown:
    raise ValueError(f'data.mask_classes names category ids {unknown} that the dataset does not '
                     f'have; its ids are {list(category_ids)}')
  return ids


def split_of(mask_classes: Sequence[int], category_ids: Iterable[int]) -> dict[str, list[int]]:
  """Splits `category_ids` into 'seen' (masks trained) and 'unseen' (boxes only) id lists."""
  seen = set(mask_classes)
  ids = sorted(int(c) for c in category_ids)
  return {'seen': [c for c in ids if c in seen], 'unseen': [c for c in ids if c not in seen]}
