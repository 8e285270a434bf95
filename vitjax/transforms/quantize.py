"""Quantization transforms (AQT): weight-only, dynamic and static int8, QAT.

Each returns a `Model -> Model` transform over the linear layers that match
`layers` and not `exclude` (regex over layer paths; the patch embedding is a
linear layer like any other); all but `static_int8`, which also calibrates
the layers' input sites, are `LayerTransform`s that `only` can narrow.
Weights are quantized symmetrically per output channel with AQT's quantizer
into a `QuantizedWeight` leaf.

  weight_only(bits)         int8/int4 weights, float activations;
  dynamic_int8()            int8 weights, int8 activations scaled per token at
                            run time, int8 x int8 -> int32 dots through AQT;
  static_int8(calibration)  int8 weights, int8 activations with per-layer
                            scales fixed by calibration at the layers' input
                            sites (minmax, percentile, MSE, OMSE), symmetric
                            or shifted (asymmetric);
  qat(bits, act_bits)       float weights trained through AQT fake quantization;
  convert_qat()             the QAT model's weights frozen into int leaves.

A layer that is already quantized is refused unless `requantize=True`, which
quantizes its dequantized weight again.
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp

from vitjax.leaves import FakeQuantWeight, QuantizedWeight, map_weights
from vitjax.leaves.quantized import check_bits, quantize_per_channel
from vitjax.model import Model
from vitjax.quantizers import uniform
from vitjax.transforms import site_calibration, sites
from vitjax.transforms.select import (ALL, LayerTransform, Patterns, Transform,
                                      layer_transform, resolve)


def _as_float(path: str, w: Any, requantize: bool) -> Any:
  if isinstance(w, QuantizedWeight):
    if not requantize:
      raise ValueError(
          f"layer {path} is already quantized ({w.bits}-bit weights, {w.activations} "
          "activations); pass requantize=True to quantize its dequantized weight again")
    return w.dequantize()
  if isinstance(w, FakeQuantWeight):
    raise ValueError(f"layer {path} is set up for QAT; freeze it with convert_qat() "
                     "instead of quantizing it again")
  return w


def _quantizer(bits: int, activations: str, requantize: bool, act_bits: int = 8):
  def quantize(path: str, w: Any, context: Any) -> Any:
    def one(x: Any) -> Any:
      x = _as_float(path, x, requantize)
      return QuantizedWeight(quantize_per_channel(x, bits), bits=bits,
                             activations=activations, act_bits=act_bits)
    return map_weights(w, one)
  return quantize


def weight_only(bits: int = 8, *, layers: Patterns = ALL, exclude: Patterns = (),
                requantize: bool = False) -> LayerTransform:
  """int`bits` weights (int4 packed two per byte on disk), float activations.

  Raises:
    ValueError: bits outside 2..8 (now); an already quantized layer (when applied).
  """
  check_bits(bits)
  return layer_transform(f"weight-int{bits}", _quantizer(bits, "float", requantize),
                         layers=layers, exclude=exclude)


def dynamic_int8(*, bits: int = 8, layers: Patterns = ALL, exclude: Patterns = (),
                 requantize: bool = False) -> LayerTransform:
  """int`bits` weights and int8 activations with per-token scales found at run time."""
  check_bits(bits)
  return layer_transform(f"dynamic-w{bits}a8", _quantizer(bits, "dynamic", requantize),
                         layers=layers, exclude=exclude)


def static_int8(calibration: Any, *, calibrator: uniform.Method = "percentile",
                percentile: float = 99.99, symmetric: bool | None = None,
                bits: int = 8, batch_size: int = 128, layers: Patterns = ALL,
                exclude: Patterns = (), requantize: bool = False,
                progress: bool = True) -> Transform:
  """W8A8 with activation scales fixed from `calibration` images.

  The chosen layers' weights become int`bits` leaves (as `weight_only`), and
  each chosen layer's input site gets an int8 `Uniform` quantizer fitted on
  the calibration images, so every chosen layer runs as an integer matmul.
  A pruned layer is multiplied through its masked int values; a low-rank
  layer's first factor takes the quantized input, its second factor a float
  input (weight-only).

  Args:
    calibration: a `data.Split` from the training split (`Dataset.calibration`).
    calibrator: "minmax", "percentile", "mse" or "omse" (`fit_uniform`).
    percentile: for "percentile", in (0, 100].
    symmetric: True, False (shift every input), or None (shift skewed inputs).
    bits: weight bits (activations are int8).

  Raises:
    ValueError: bits outside 2..8, unknown calibrator, percentile outside
      (0, 100], calibration images not from the training split, empty, or
      holding NaN/inf (now); what `quantize_sites` refuses (when applied).
  """
  check_bits(bits)
  spec = uniform.UniformSpec(8, calibrator, "tensor", symmetric, percentile)
  site_calibration.check_training_split(calibration)
  weights = weight_only(bits, layers=layers, exclude=exclude, requantize=requantize)

  def transform(model: Model) -> Model:
    chosen = resolve(model.params, weights.include, weights.exclude)
    pattern = "|".join(re.escape(layer) + "/input" for layer in chosen)
    rules = [sites.SiteRule(f"({pattern})", spec)]
    return sites.quantize_sites(rules, calibration, batch_size=batch_size,
                                progress=progress)(weights(model))

  return transform


def qat(bits: int = 4, act_bits: int | None = 8, *, layers: Patterns = ALL,
        exclude: Patterns = ()) -> LayerTransform:
  """Wraps float kernels for quantization-aware training (AQT fake quant, STE).

  The model trains with the ordinary training step; `convert_qat()` then
  freezes the weights into int leaves that compute the same forward pass.

  Raises:
    ValueError: bits or act_bits outside 2..8.
  """
  check_bits(bits)
  if act_bits is not None:
    check_bits(act_bits, "act_bits")

  def wrap(path: str, w: Any, context: Any) -> Any:
    def one(x: Any) -> Any:
      if isinstance(x, (QuantizedWeight, FakeQuantWeight)):
        raise ValueError(f"layer {path} is already quantized or set up for QAT")
      return FakeQuantWeight(jnp.asarray(x, jnp.float32), bits=bits, act_bits=act_bits)
    return map_weights(w, one)

  return layer_transform(f"qat-w{bits}a{act_bits or 'f'}", wrap, layers=layers,
                         exclude=exclude)


def convert_qat(*, layers: Patterns = ALL) -> LayerTransform:
  """Freezes every `FakeQuantWeight` into the `QuantizedWeight` it emulates.

  Layers that are not set up for QAT pass through unchanged.
  """
  def freeze(path: str, w: Any, context: Any) -> Any:
    def one(x: Any) -> Any:
      if not isinstance(x, FakeQuantWeight):
        return x
      return QuantizedWeight(quantize_per_channel(x.w, x.bits), bits=x.bits,
                             activations="float" if x.act_bits is None else "dynamic",
                             act_bits=x.act_bits or 8)
    return map_weights(w, one)
  return layer_transform("convert-qat", freeze, layers=layers)
