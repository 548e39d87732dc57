import pytest

from deepmarc_jax.data import class_splits


def test_voc_and_nonvoc_partition_the_80_coco_classes():
  assert len(class_splits.COCO_IDS) == 80
  assert len(class_splits.VOC_IDS) == 20 and len(class_splits.NONVOC_IDS) == 60
  assert not set(class_splits.VOC_IDS) & set(class_splits.NONVOC_IDS)
  assert set(class_splits.VOC_IDS) | set(class_splits.NONVOC_IDS) == set(class_splits.COCO_IDS)
  # The official VOC ids (class_utils.py): person .. tv, including bottle 44 and tv 72.
  assert class_splits.VOC_IDS == (1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63,
                                  64, 67, 72)


def test_resolve_mask_classes_forms():
  assert class_splits.resolve_mask_classes('voc') == class_splits.VOC_IDS
  assert class_splits.resolve_mask_classes('nonvoc') == class_splits.NONVOC_IDS
  assert class_splits.resolve_mask_classes('all', [3, 1, 2]) == (1, 2, 3)
  assert class_splits.resolve_mask_classes('7, 3,1') == (1, 3, 7)
  assert class_splits.resolve_mask_classes([5, 1, 5]) == (1, 5)


def test_resolve_mask_classes_errors_name_the_problem():
  with pytest.raises(ValueError, match='voc'):
    class_splits.resolve_mask_classes('vocc')
  with pytest.raises(ValueError, match=r'\[12\]'):
    class_splits.resolve_mask_classes([1, 12])  # 12 is not a COCO id


def test_split_of():
  assert class_splits.split_of([1, 3], [1, 2, 3, 8]) == {'seen': [1, 3], 'unseen': [2, 8]}
