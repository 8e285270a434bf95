"""GPTQ (Frantar et al. 2023): one-shot second-order weight quantization.

For a linear layer y = x W with inputs X seen on calibration images, GPTQ
quantizes W's input rows one at a time (in the order of decreasing Hessian
diagonal with act-order) and after each one moves the rounding error onto the
rows not yet quantized, weighted by the inverse Hessian H^-1 of the layer's
squared output error (H = 2 X^T X + damping). It works on blocks of rows
("lazy batch"): inside a block the error is propagated row by row, to the
rows after the block in one matmul. `gptq_quantize` is one jit-compiled
function of (W, H); it runs on sharded weights as they are (each output
column is independent given H).

`gptq(calibration, bits)` applies it to a model sequentially: each linear
layer's Hessian comes from the inputs it sees with every earlier layer
already quantized, so block i is calibrated on the outputs of the quantized
blocks before it. The result is the same `QuantizedWeight` leaf (AQT QTensor,
symmetric per output channel, the grid of `quantize.weight_only`) that
round-to-nearest produces, only with better-chosen integers.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from aqt.jax.v2 import aqt_tensor

from vitjax import leaves
from vitjax import model as model_lib
from vitjax import progress as progress_lib
from vitjax.leaves import QuantizedWeight
from vitjax.model import Model
from vitjax.models.inputs import preprocess
from vitjax.quantizers.uniform import check_bits, qmax
from vitjax.transforms import select, site_calibration


def channel_scales(w: jax.Array, bits: int) -> jax.Array:
  """(out,) scales of the symmetric per-output-channel grid of w (in, out):
  max |w| / (2^(bits-1) - 0.5), AQT's abs-max calibration."""
  top = jnp.max(jnp.abs(w), axis=0)
  return jnp.where(top > 0, top, 1.0) / (2.0 ** (bits - 1) - 0.5)


def round_to_grid(w: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  """Integer codes of w on the grid `scale` (AQT's rounding: clip, then half
  to even)."""
  m = qmax(bits)
  y = jnp.clip(w * jax.lax.reciprocal(scale), -m, m)
  return jax.lax.round(y, jax.lax.RoundingMethod.TO_NEAREST_EVEN)


@functools.partial(jax.jit, static_argnames=("bits", "block_size", "act_order"))
def gptq_quantize(w: jax.Array, hessian: jax.Array, *, bits: int, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True
                  ) -> tuple[jax.Array, jax.Array]:
  """GPTQ codes of w (in, out) given the input Hessian (in, in).

  Returns:
    (codes (in, out) as float integers in [-qmax, qmax], scales (out,)); the
    quantized weight is codes * scales.
  """
  w = w.astype(jnp.float32)
  h = hessian.astype(jnp.float32)
  n = w.shape[0]
  scale = channel_scales(w, bits)
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  w = jnp.where(dead[:, None], 0.0, w)
  perm = jnp.argsort(-jnp.diag(h)) if act_order else jnp.arange(n)
  w, h = w[perm], h[perm][:, perm]
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(n, dtype=h.dtype)
  # Upper Cholesky factor of H^-1: row i holds how row i's error spreads.
  hinv = jnp.linalg.cholesky(jnp.linalg.inv(h)).T
  codes = jnp.zeros_like(w)
  for i1 in range(0, n, block_size):
    i2 = min(i1 + block_size, n)
    block, hb = w[i1:i2], hinv[i1:i2, i1:i2]

    def step(i, carry, hb=hb):
      block, q, err = carry
      row = block[i]
      c = round_to_grid(row, scale, bits)
      e = (row - c * scale) / hb[i, i]
      block = block - jnp.outer(hb[i], e)  # hb[i, :i] is 0: only later rows move
      return block, q.at[i].set(c), err.at[i].set(e)

    zeros = jnp.zeros_like(block)
    _, q, err = jax.lax.fori_loop(0, i2 - i1, step, (block, zeros, zeros))
    codes = codes.at[i1:i2].set(q)
    w = w.at[i2:].add(-hinv[i1:i2, i2:].T @ err)
  return codes[jnp.argsort(perm)], scale


def quantized_leaf(codes: jax.Array, scale: jax.Array, bits: int) -> QuantizedWeight:
  """The `QuantizedWeight` (float activations) holding integer `codes` (in, out)."""
  dtype = jnp.int4 if bits == 4 else jnp.int8  # as AQT stores them
  qt = aqt_tensor.QTensor(qvalue=codes.astype(dtype), scale=[scale[None, :]],
                          scale_t=None, bias=[], dequant_dtype=jnp.float32)
  return QuantizedWeight(qt, bits=bits, activations="float")


def _hessians_fn(config: Any, layers: list[str]):
  """jit: (model, images) -> {layer: X^T X of its inputs} for `layers`."""
  @jax.jit
  def hessians(m: Model, images: jax.Array) -> dict[str, jax.Array]:
    inputs = model_lib.linear_inputs(m, preprocess(images, config))
    out = {}
    for layer in layers:
      rows = inputs[layer].reshape(-1, inputs[layer].shape[-1]).astype(jnp.float32)
      out[layer] = 2.0 * rows.T @ rows
    return out
  return hessians


def _input_group(layer: str) -> str:
  parent, _, name = layer.rpartition("/")
  return f"{parent}/qkv" if name in ("query", "key", "value") else layer


def gptq(calibration: Any, *, bits: int = 4, block_size: int = 128, damp: float = 0.01,
         act_order: bool = True, layers: select.Patterns = select.ALL,
         exclude: select.Patterns = (), batch_size: int = 64,
         progress: bool = True):
  """The transform quantizing the chosen linear layers' weights with GPTQ,
  layer after layer, on `calibration` images (a training-split `data.Split`).

  Raises:
    ValueError: bits outside 2..8, block_size or batch_size < 1, damp <= 0,
      calibration not from the training split; when applied, a pattern that
      matches nothing, or a chosen layer whose weight is not a float array
      (quantize before pruning/low-rank into leaves, or use weight_only).
  """
  check_bits(bits)
  if block_size < 1 or batch_size < 1:
    raise ValueError(f"block_size={block_size} and batch_size={batch_size} must be >= 1")
  if not damp > 0:
    raise ValueError(f"damp={damp} must be > 0")
  site_calibration.check_training_split(calibration)
  include = (select.as_patterns(layers),)
  excluded = select.as_patterns(exclude)

  def transform(model: Model) -> Model:
    chosen = select.resolve(model.params, include, excluded)
    for layer in chosen:
      w = select.get_kernel(model.params, layer)
      if leaves.is_compressed(w) or not isinstance(w, (jax.Array, np.ndarray)):
        raise ValueError(f"gptq quantizes float weights; layer {layer} holds a "
                         f"{type(w).__name__}")
    images = calibration.images
    batches = range(0, len(images), batch_size)
    hessians_of = _hessians_fn(model.config, chosen)
    # The sequential pass holds each quantized weight as the float codes *
    # scale it stands for, so the tree keeps its structure and the Hessian
    # function compiles once; the int leaves replace them at the end.
    current, leaves_out = model, {}
    bar = progress_lib.bar(len(chosen), f"gptq w{bits}", enabled=progress)
    group, hessians = None, None
    for layer in chosen:
      if _input_group(layer) != group:  # query, key and value share their input
        group = _input_group(layer)
        parts = [hessians_of(current, images[s:s + batch_size]) for s in batches]
        hessians = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
      w = select.get_kernel(model.params, layer)
      codes, scale = gptq_quantize(w, hessians[layer], bits=bits, block_size=block_size,
                                   damp=damp, act_order=act_order)
      leaves_out[layer] = quantized_leaf(codes, scale, bits)
      current = current.replace(params=select.set_kernels(
          current.params, {layer: (codes * scale[None, :]).astype(w.dtype)}))
      bar.update(1)
    bar.close()
    return model.replace(params=select.set_kernels(model.params, leaves_out))

  return transform
