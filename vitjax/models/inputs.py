"""What a model does to raw images before its first layer.

The normalization statistics are part of the model config (`pixel_mean`,
`pixel_std`, taken from the training data), so a saved model preprocesses the
same way wherever it is loaded, and no dataset's constants are applied to
another dataset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vitjax.models.config import ViTConfig


def preprocess(images: jax.Array, config: ViTConfig) -> jax.Array:
  """Raw (B, H, W, C) pixels -> normalized float32 of the model's shape.

  uint8 pixels (0..255) are scaled to [0, 1]; float pixels must already be on
  the [0, 1] scale, so `x` and `x / 255.0` give the same result. A single
  channel is repeated to 3 when the model wants 3; then `(x - pixel_mean) /
  pixel_std` per channel (from `config`) and a bilinear resize to
  `config.image_size`.
  """
  x = images
  if x.dtype == jnp.uint8:
    x = x.astype(jnp.float32) / 255.0
  x = x.astype(jnp.float32)
  b, h, w, c = x.shape
  if c == 1 and config.channels == 3:
    x, c = jnp.repeat(x, 3, axis=-1), 3
  x = (x - jnp.asarray(config.pixel_mean, jnp.float32)) / jnp.asarray(config.pixel_std,
                                                                      jnp.float32)
  if (h, w) != (config.image_size, config.image_size):
    x = jax.image.resize(x, (b, config.image_size, config.image_size, c), "bilinear")
  return x
