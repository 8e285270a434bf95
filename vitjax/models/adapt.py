"""Fit an imported ViT to other data: a new head, another image size, other
input channels. Each returns a new fp32 `Model`; the source is unchanged.

- `new_head`: a zero-initialized classifier (and distillation head) for
  `num_classes` classes (big_vision's head init; the first fine-tuning steps
  train it from there).
- `resample_positions`: the patch-grid part of the position embedding resized
  bilinearly to the new grid (`scipy.ndimage.zoom(order=1)`, as big_vision's
  `resample_posemb`); the class/distillation entries are kept as they are.
- `set_channels`: a 3-channel model made to read 1 channel (grayscale) with no
  change in function: the model fed a gray image repeated to RGB (what
  vitjax's preprocessing does) equals the adapted model fed the gray image,
  because the per-channel normalization and the patch-embedding columns of the
  three channels fold into one column and a bias; and the inverse direction,
  1 to 3 channels, as the mean of the three.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import scipy.ndimage

from vitjax import leaves
from vitjax import model as model_lib
from vitjax.models.config import ViTConfig


def _plain(model: model_lib.Model, what: str) -> dict[str, Any]:
  if model.sites or any(leaves.is_compressed(leaf) for leaf in
                        jax.tree_util.tree_leaves(model.params, is_leaf=leaves.is_compressed)):
    raise ValueError(f"{what} adapts fp32 models; this one is compressed (adapt first, "
                     "then compress)")
  return jax.tree_util.tree_map(lambda a: np.array(a, np.float32), model.params)


def new_head(model: model_lib.Model, num_classes: int) -> model_lib.Model:
  """`model` with a zero classifier (and distillation head) of `num_classes`.

  Raises:
    ValueError: `num_classes` < 1, or a compressed model.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  params = _plain(model, "new_head")
  for name in ("head", "head_dist"):
    if name in params:
      params[name] = {"kernel": np.zeros((model.config.dim, num_classes), np.float32),
                      "bias": np.zeros(num_classes, np.float32)}
  return model_lib.Model(model.config.replace(num_classes=num_classes), params)


def resample_positions(model: model_lib.Model, image_size: int) -> model_lib.Model:
  """`model` taking `image_size` images: its position embedding's patch grid
  resized bilinearly, prefix-token entries kept.

  Raises:
    ValueError: `image_size` is not a positive multiple of the patch size, or
      a compressed model.
  """
  cfg = model.config
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1 or \
      image_size % cfg.patch_size:
    raise ValueError(
        f"image_size={image_size!r} cannot be used: the position embedding is resampled "
        f"per patch, so the image size must be a positive multiple of patch_size="
        f"{cfg.patch_size} ({cfg.patch_size}, {2 * cfg.patch_size}, ...)")
  params = _plain(model, "resample_positions")
  old, new = cfg.image_size // cfg.patch_size, image_size // cfg.patch_size
  pos = params["pos_embedding"]
  prefix, grid = pos[:, :cfg.num_prefix_tokens], pos[0, cfg.num_prefix_tokens:]
  grid = grid.reshape(old, old, cfg.dim)
  if new != old:
    grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  params["pos_embedding"] = np.concatenate(
      [prefix, grid.reshape(1, new * new, cfg.dim).astype(np.float32)], axis=1)
  return model_lib.Model(cfg.replace(image_size=image_size), params)


def set_channels(model: model_lib.Model, channels: int) -> model_lib.Model:
  """`model` reading `channels` input channels (3 -> 1 or 1 -> 3).

  3 -> 1 folds the pixel normalization into the patch embedding and is exact
  for gray images; the new model's pixel statistics are mean 0, std 1.

  Raises:
    ValueError: a change other than 3 -> 1 or 1 -> 3, a shifted-patch
      tokenizer (its LayerNorm mixes the channels), or a compressed model.
  """
  cfg = model.config
  if (cfg.channels, channels) not in ((3, 1), (1, 3)):
    raise ValueError(f"channels={channels!r}: this model has {cfg.channels}; vitjax "
                     "changes 3 channels to 1 (grayscale) or 1 to 3")
  if cfg.tokenizer != "patch":
    raise ValueError(f"set_channels needs tokenizer 'patch', this model has "
                     f"{cfg.tokenizer!r} (its patch LayerNorm mixes the channels)")
  params = _plain(model, "set_channels")
  p = cfg.patch_size
  kernel = params["embedding"]["kernel"].reshape(p, p, cfg.channels, cfg.dim)
  mean = np.broadcast_to(np.asarray(cfg.pixel_mean, np.float32), (cfg.channels,))
  std = np.broadcast_to(np.asarray(cfg.pixel_std, np.float32), (cfg.channels,))
  scaled = kernel / std[None, None, :, None]
  if channels == 1:
    params["embedding"]["kernel"] = scaled.sum(axis=2).reshape(p * p, cfg.dim)
    params["embedding"]["bias"] = params["embedding"]["bias"] - np.einsum(
        "pqcd,c->d", scaled, mean)
    new_cfg = cfg.replace(channels=1, pixel_mean=(0.0,), pixel_std=(1.0,))
  else:
    params["embedding"]["kernel"] = np.repeat(kernel / 3, 3, axis=2).reshape(
        p * p * 3, cfg.dim)
    new_cfg = cfg.replace(channels=3, pixel_mean=tuple(mean.tolist()) * 3,
                          pixel_std=tuple(std.tolist()) * 3)
  return model_lib.Model(new_cfg, params)


def adapt(model: model_lib.Model, *, num_classes: int | None = None,
          image_size: int | None = None, channels: int | None = None) -> model_lib.Model:
  """`new_head`, `resample_positions` and `set_channels` where asked (None
  leaves that part as it is).

  Raises:
    ValueError: from the three steps; or nothing asked at all.
  """
  if num_classes is None and image_size is None and channels is None:
    raise ValueError("adapt needs num_classes, image_size or channels")
  if channels is not None and channels != model.config.channels:
    model = set_channels(model, channels)
  if image_size is not None and image_size != model.config.image_size:
    model = resample_positions(model, image_size)
  if num_classes is not None and num_classes != model.config.num_classes:
    model = new_head(model, num_classes)
  return model


def describe(config: ViTConfig) -> str:
  """One line naming a config's shape, for logs."""
  return (f"{config.image_size}x{config.image_size}x{config.channels} images, patch "
          f"{config.patch_size}, dim {config.dim}, {config.depth} blocks, "
          f"{config.num_heads} heads, mlp {config.mlp_dim}, {config.num_classes} classes"
          f"{', DeiT' if config.distilled else ''}")
