"""Flax (linen) models: backbones, FPN, RPN, ROI heads, mask heads, meta-architectures."""
