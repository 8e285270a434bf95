"""RepQ-ViT's scale reparameterization of post-LayerNorm activations.

A LayerNorm's output varies hugely from channel to channel, which wants a
quantizer per channel; the matmul after it wants one per tensor. RepQ-ViT
finds per-channel asymmetric ranges [lo_c, hi_c] on calibration images, then
rescales and shifts each channel so that all share one range, and undoes that
exactly in the next linear layer:

  s_c = (hi_c - lo_c) / L, z_c = -lo_c / s_c    (L = levels; any L gives the same fold)
  r_c = s_c / mean(s),     m_c = s_c (z_c - mean(z))
  LayerNorm:   gamma' = gamma / r,  beta' = (beta + m) / r
  next linear: W' = diag(r) W,      b' = b - m W

so y' = (y + m) / r and y' W' + b' = y W + b: the float model computes the
same function (up to rounding), and every channel of y' spans the same
interval, where a per-tensor quantizer fits. Applies to LayerNorm_0 (before
query/key/value) and LayerNorm_2 (before Dense_0) of every block; the linear
layers must still hold float weights (reparameterize, then quantize).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import leaves
from vitjax.model import Model
from vitjax.transforms import select, site_calibration

# LayerNorm -> the linear layers that read its output, per encoder block.
FOLDS = {"LayerNorm_0": ("MultiHeadDotProductAttention_1/query",
                         "MultiHeadDotProductAttention_1/key",
                         "MultiHeadDotProductAttention_1/value"),
         "LayerNorm_2": ("MlpBlock_3/Dense_0",)}


def fold(model: Model, norm: str, consumers: tuple[str, ...], lo: np.ndarray,
         hi: np.ndarray) -> Model:
  """`model` with LayerNorm `norm` and its `consumers` reparameterized so the
  channel ranges [lo_c, hi_c] of its output all become one range.

  Raises:
    ValueError: a consumer whose weight is not a float array, or lo > hi.
  """
  if np.any(lo > hi):
    raise ValueError(f"{norm}: per-channel minima exceed maxima")
  width = np.maximum(hi - lo, 1e-8)
  s = width / 255.0
  z = -lo / s
  r = s / s.mean()
  m = s * (z - z.mean())
  params = model.params
  norm_params = select.get_module(params, norm)
  updates = {norm: {"scale": norm_params["scale"] / r,
                    "bias": (norm_params["bias"] + m) / r}}
  for layer in consumers:
    w = select.get_kernel(params, layer)
    if leaves.is_compressed(w) or not isinstance(w, (jax.Array, np.ndarray)):
      raise ValueError(f"reparameterize before compressing weights: {layer} holds a "
                       f"{type(w).__name__}")
    bias = select.get_module(params, layer)["bias"]
    updates[layer] = {"kernel": jnp.asarray(w * r[:, None], w.dtype),
                      "bias": bias - jnp.asarray(m @ np.asarray(w, np.float64), jnp.float32)}
  return model.replace(params=select.update_modules(params, updates))


def reparameterize(calibration: Any, *, batch_size: int = 64, progress: bool = True):
  """The transform folding per-channel post-LayerNorm ranges (measured on
  `calibration`, a training-split `data.Split`) into the LayerNorms and the
  linear layers after them, in every encoder block.

  Raises:
    ValueError: calibration not from the training split; when applied, a
      linear layer after a LayerNorm that does not hold a float weight, or a
      model with site quantizers already (reparameterize first).
  """
  site_calibration.check_training_split(calibration)

  def transform(model: Model) -> Model:
    if model.sites:
      raise ValueError("reparameterize before quantizing sites: the model already has "
                       f"quantizers at {len(model.sites)} sites")
    blocks = [f"Transformer/encoderblock_{i}" for i in range(model.config.depth)]
    addresses = {f"{b}/{norm}": f"{b}/{consumers[0]}/input"
                 for b in blocks for norm, consumers in FOLDS.items()}
    stats = site_calibration.record(model, calibration, list(addresses.values()),
                                    batch_size=batch_size, max_rows=1, progress=progress)
    for norm_path, address in addresses.items():
      rows = stats[address].values  # the last two rows: channel minima, maxima
      block, norm = norm_path.rsplit("/", 1)
      model = fold(model, norm_path, tuple(f"{block}/{c}" for c in FOLDS[norm]),
                   rows[-2].astype(np.float64), rows[-1].astype(np.float64))
    return model

  return transform
