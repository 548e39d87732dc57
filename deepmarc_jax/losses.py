"""Mask R-CNN losses, as Model Garden defines them (official/vision/losses/maskrcnn_losses.py).

All take global-batch arrays with explicit validity weights, so padding (anchors that are
neither positive nor negative, unused ROI slots, empty mask slots) contributes nothing.
Normalisers are global counts, which equals Model Garden's per-replica normalisation followed
by its mean over replicas.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def huber(x: jax.Array, delta: float) -> jax.Array:
  """Elementwise Huber: 0.5 x^2 for |x| <= delta, else delta (|x| - delta / 2)."""
  abs_x = jnp.abs(x)
  return jnp.where(abs_x <= delta, 0.5 * x * x, delta * (abs_x - 0.5 * delta))


def rpn_score_loss(logits: jax.Array, labels: jax.Array, samples_per_image: int) -> jax.Array:
  """Sigmoid CE over sampled anchors, / (batch * samples_per_image).

  Args:
    logits: [B, A] objectness logits.
    labels: [B, A] int, 1 positive, 0 negative, -1 not sampled.
  """
  weights = (labels >= 0).astype(jnp.float32)
  ce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                          (labels == 1).astype(jnp.float32))
  return jnp.sum(ce * weights) / (logits.shape[0] * samples_per_image)


def rpn_box_loss(deltas: jax.Array, targets: jax.Array, positive: jax.Array,
                 delta: float = 1.0 / 9.0) -> jax.Array:
  """Huber on positive anchors' (dy, dx, dh, dw), / (4 * #positives + 0.01).

  Args:
    deltas, targets: [B, A, 4]; positive: [B, A] bool.
  """
  weights = jnp.broadcast_to(positive[..., None], deltas.shape).astype(jnp.float32)
  loss = jnp.sum(huber(deltas.astype(jnp.float32) - targets, delta) * weights)
  return loss / (jnp.sum(weights) + 0.01)


def frcnn_class_loss(logits: jax.Array, classes: jax.Array, valid: jax.Array) -> jax.Array:
  """Softmax CE over sampled ROIs (mean over valid ROIs).

  Args:
    logits: [B, S, K]; classes: [B, S] int (0 background); valid: [B, S] bool.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), classes)
  weights = valid.astype(jnp.float32)
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def frcnn_box_loss(deltas: jax.Array, classes: jax.Array, targets: jax.Array,
                   foreground: jax.Array, delta: float = 1.0) -> jax.Array:
  """Huber on the target class's box deltas of foreground ROIs, / (4 * #foreground + 0.01).

  Args:
    deltas: [B, S, K, 4] class-specific (or [B, S, 1, 4] class-agnostic) predictions.
    classes: [B, S] int target classes; targets: [B, S, 4]; foreground: [B, S] bool.
  """
  index = classes if deltas.shape[2] > 1 else jnp.zeros_like(classes)
  selected = jnp.take_along_axis(deltas, index[..., None, None], axis=2)[:, :, 0]
  weights = jnp.broadcast_to(foreground[..., None], targets.shape).astype(jnp.float32)
  loss = jnp.sum(huber(selected.astype(jnp.float32) - targets, delta) * weights)
  return loss / (jnp.sum(weights) + 0.01)


def mask_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Per-pixel sigmoid CE of weighted masks, / (#pixels of weighted masks + 0.01).

  Args:
    logits, targets: [B, R, m, m] (targets soft, in [0, 1]); weights: [B, R] (0 or 1: real,
      mask-allowed instances).
  """
  ce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)
  pixel_weights = jnp.broadcast_to(weights[..., None, None], ce.shape).astype(jnp.float32)
  return jnp.sum(ce * pixel_weights) / (jnp.sum(pixel_weights) + 0.01)
