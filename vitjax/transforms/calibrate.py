"""Activation ranges of linear-layer inputs, for static (W8A8) quantization.

Each calibration point is the input of one quantized matmul: a linear layer's
input, and for a low-rank layer (x @ u) @ v also the input x @ u of its second
factor (`points` names them). Two passes over the calibration images: the
first records each point's min and max, which fix an optional centering shift
(asymmetric quantization, for skewed inputs such as post-GELU activations) and
the histogram range; the second fills a histogram of |x + shift| per point. A
calibrator then picks the clipping bound from the histogram:

  minmax      the largest |x + shift| seen;
  percentile  the bound below which `percentile` % of the values lie;
  mse         the bound minimizing the expected squared quantization error
              (clipping error above it, uniform rounding noise below it).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import leaves
from vitjax import model as model_lib
from vitjax import progress as progress_lib
from vitjax.model import Model
from vitjax.models.inputs import preprocess
from vitjax.quantizers.histogram import (BINS, CALIBRATORS, Histogram, choose_bound,
                                         quant_bound)
from vitjax.transforms import select

SECOND_FACTOR = "/second_factor"


def points(model: Model, layers: list[str]) -> list[str]:
  """Calibration points of `layers`: each layer, plus `layer + SECOND_FACTOR`
  for a low-rank layer (the input of its second factor)."""
  out = []
  for layer in layers:
    out.append(layer)
    if isinstance(select.get_kernel(model.params, layer), leaves.LowRank):
      out.append(layer + SECOND_FACTOR)
  return out


def point_inputs(model: Model, images: jax.Array, names: list[str]) -> dict[str, jax.Array]:
  """The input each calibration point in `names` sees for preprocessed `images`."""
  inputs = model_lib.linear_inputs(model, images)
  out = {}
  for name in names:
    if name.endswith(SECOND_FACTOR):
      layer = name[:-len(SECOND_FACTOR)]
      out[name] = leaves.matmul(inputs[layer], select.get_kernel(model.params, layer).u)
    else:
      out[name] = inputs[name]
  return out


@dataclasses.dataclass(frozen=True)
class ActivationStats:
  """What calibration saw at one layer's input."""

  lo: float
  hi: float
  shift: float
  hist: Histogram


def check_calibration_images(images: np.ndarray) -> None:
  """Raises ValueError for an empty set or float images holding NaN or inf."""
  if images is None or len(images) == 0:
    raise ValueError("the calibration set is empty; pass at least one image")
  if np.issubdtype(np.asarray(images).dtype, np.floating) and not np.isfinite(images).all():
    raise ValueError("the calibration set holds NaN or inf values")


def _batches(images: np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
  for start in range(0, len(images), batch_size):
    yield images[start:start + batch_size]


def collect(model: Model, images: np.ndarray, layers: list[str], *,
            symmetric: bool | None = None, batch_size: int = 128, bins: int = BINS,
            progress: bool = True) -> dict[str, ActivationStats]:
  """Calibration statistics over `images` of the inputs of `layers`, calibration
  points as `points` names them (a linear layer, or a low-rank layer's second
  factor).

  Args:
    symmetric: True: no shift; False: shift every input to center its range;
      None: shift only inputs whose range is skewed (|lo + hi| > (hi - lo) / 4).

  Raises:
    ValueError: empty calibration set, NaN/inf in images or activations.
  """
  check_calibration_images(images)
  config = model.config

  @jax.jit
  def ranges(m: Model, x: jax.Array):
    inputs = point_inputs(m, preprocess(x, config), layers)
    return {k: (inputs[k].min(), inputs[k].max()) for k in layers}

  @jax.jit
  def histograms(m: Model, x: jax.Array, shift: dict, top: dict):
    inputs = point_inputs(m, preprocess(x, config), layers)
    out = {}
    for k in layers:
      mags = jnp.abs(inputs[k] + shift[k]).reshape(-1)
      idx = jnp.clip((mags / top[k] * bins).astype(jnp.int32), 0, bins - 1)
      out[k] = jnp.bincount(idx, length=bins)
    return out

  n_batches = -(-len(images) // batch_size)
  bar = progress_lib.bar(2 * n_batches, "calibrate", enabled=progress)
  lo = {k: np.inf for k in layers}
  hi = {k: -np.inf for k in layers}
  for batch in _batches(images, batch_size):
    for k, (a, b) in jax.device_get(ranges(model, batch)).items():
      lo[k], hi[k] = min(lo[k], float(a)), max(hi[k], float(b))
    bar.update(1)
  for k in layers:
    if not (np.isfinite(lo[k]) and np.isfinite(hi[k])):
      raise ValueError(f"the input of layer {k} is NaN or inf on the calibration set; "
                       "check the model's weights")
  shift, top = {}, {}
  for k in layers:
    skewed = abs(lo[k] + hi[k]) > (hi[k] - lo[k]) / 4
    use_shift = (not symmetric) if symmetric is not None else skewed
    shift[k] = -(lo[k] + hi[k]) / 2 if use_shift else 0.0
    top[k] = max(abs(lo[k] + shift[k]), abs(hi[k] + shift[k])) or 1.0
  counts = {k: np.zeros(bins) for k in layers}
  args = ({k: jnp.float32(v) for k, v in shift.items()},
          {k: jnp.float32(v) for k, v in top.items()})
  for batch in _batches(images, batch_size):
    for k, c in jax.device_get(histograms(model, batch, *args)).items():
      counts[k] += c
    bar.update(1)
  bar.close()
  return {k: ActivationStats(lo[k], hi[k], shift[k], Histogram(counts[k], top[k]))
          for k in layers}
