"""Scoring models: the COCO evaluator (coco) and the evaluation of a model on a split (loop)."""
