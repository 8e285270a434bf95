"""Losses that training, distillation and data-needing transforms share.

This module depends on JAX only, so compression code can score a model
without importing the training loop, optax, orbax or the dataset module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy of `logits` (B, K) against integer `labels` (B,),
  with the one-hot targets smoothed by `smoothing` (in [0, 1)).

  Raises:
    ValueError: `smoothing` outside [0, 1).
  """
  if not 0 <= smoothing < 1:
    raise ValueError(f"smoothing={smoothing} is outside [0, 1)")
  n = logits.shape[-1]
  targets = jax.nn.one_hot(labels, n)
  if smoothing:
    targets = targets * (1 - smoothing) + smoothing / n
  return -(targets * jax.nn.log_softmax(logits.astype(jnp.float32), -1)).sum(-1).mean()
