"""Quantization transforms (AQT): weight-only, dynamic and static int8, QAT.

Each returns a `LayerTransform` (`Model -> Model`) over the linear layers that
match `layers` and not `exclude` (regex over layer paths; the patch embedding
is a linear layer like any other). Weights are quantized symmetrically per
output channel with AQT's quantizer into a `QuantizedWeight` leaf.

  weight_only(bits)         int8/int4 weights, float activations;
  dynamic_int8()            int8 weights, int8 activations scaled per token at
                            run time, int8 x int8 -> int32 dots through AQT;
  static_int8(images)       int8 weights, int8 activations with per-matmul
                            scales fixed by calibration (minmax, percentile,
                            MSE), symmetric or shifted (asymmetric);
  qat(bits, act_bits)       float weights trained through AQT fake quantization;
  convert_qat()             the QAT model's weights frozen into int leaves.

A layer that is already quantized is refused unless `requantize=True`, which
quantizes its dequantized weight again.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from vitjax.leaves import FakeQuantWeight, LowRank, Masked, QuantizedWeight, map_weights
from vitjax.leaves.quantized import check_bits, quantize_per_channel
from vitjax.model import Model
from vitjax.transforms import calibrate
from vitjax.transforms.select import ALL, LayerTransform, Patterns, layer_transform


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


def static_int8(calibration: np.ndarray, *, calibrator: str = "percentile",
                percentile: float = 99.99, symmetric: bool | None = None,
                bits: int = 8, batch_size: int = 128, layers: Patterns = ALL,
                exclude: Patterns = (), requantize: bool = False,
                progress: bool = True) -> LayerTransform:
  """W8A8 with activation scales fixed from `calibration` images.

  Args:
    calibration: images (N, H, W, C), uint8 or normalized float; never the
      test split.
    calibrator: "minmax", "percentile" or "mse" (see `calibrate`).
    percentile: for "percentile", in (0, 100].
    symmetric: True, False (shift every input), or None (shift skewed inputs).
    bits: weight bits (activations are int8).

  Raises:
    ValueError: bits outside 2..8, unknown calibrator, percentile outside
      (0, 100], an empty calibration set or one holding NaN/inf (now).
      Pruned (masked) and low-rank layers are calibrated too: a low-rank
      layer's second factor gets the scale of its own input, x @ u.
  """
  check_bits(bits)
  if calibrator not in calibrate.CALIBRATORS:
    raise ValueError(f"calibrator={calibrator!r}; choose one of {calibrate.CALIBRATORS}")
  if not 0 < percentile <= 100:
    raise ValueError(f"percentile={percentile} is outside (0, 100]")
  calibrate.check_calibration_images(calibration)

  def prepare(model: Model, chosen: list[str]) -> dict[str, calibrate.ActivationStats]:
    return calibrate.collect(model, calibration, calibrate.points(model, chosen),
                             symmetric=symmetric, batch_size=batch_size, progress=progress)

  weights = _quantizer(bits, "static", requantize)

  def quantize(path: str, w: Any, stats: dict[str, calibrate.ActivationStats]) -> Any:
    def calibrated(q: Any, point: str) -> Any:
      if isinstance(q, Masked):
        # A pruned layer sees the same input as the dense one: its calibrated
        # scale goes on the quantized values inside the mask.
        return q.replace(w=calibrated(q.w, point))
      if isinstance(q, LowRank):
        # (x @ u) @ v: u sees the layer's input, v the calibrated x @ u.
        return LowRank(calibrated(q.u, point), calibrated(q.v, point + calibrate.SECOND_FACTOR))
      if not isinstance(q, QuantizedWeight):
        raise ValueError(f"layer {path}: static activation quantization needs plain, "
                         f"masked or low-rank weights, got {type(q).__name__}")
      s = stats[point]
      bound = calibrate.choose_bound(s.hist, calibrator, percentile=percentile, bits=8)
      return q.replace(act_scale=jnp.float32(bound / calibrate.quant_bound(8)),
                       act_shift=jnp.float32(s.shift) if s.shift else None)
    return calibrated(weights(path, w, None), path)

  return layer_transform(f"static-w{bits}a8-{calibrator}", quantize, layers=layers,
                         exclude=exclude, prepare=prepare)


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
