"""Masks for boxes a user gives: box parsing, the segmenter (encode once, many boxes), outputs."""
