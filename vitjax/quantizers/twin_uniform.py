"""PTQ4ViT's twin-uniform quantizer for post-softmax and post-GELU values.

Two uniform ranges share the codes, each with bits - 1 bits (the remaining bit
says which range a value is in), and the larger scale is the smaller one
times a power of two, so both rescale by a shift:

  softmax (unsigned): R1 = [0, 2^(b-1) s1) for the many small probabilities,
           R2 = [0, (2^(b-1) - 1) s2] for the few large ones; a value is in
           R1 if it fits there;
  gelu (signed):      R1 = [-2^(b-1) s1, 0] for the small negative tail,
           R2 = [0, (2^(b-1) - 1) s2] for the positive values.

`fit_twin_uniform` searches s2 on a grid and s1 = s2 / 2^m over m, keeping
the pair whose quantization error, weighted per value by a Hessian estimate
(PTQ4ViT: the squared gradient of the task loss with respect to that value),
is smallest. `planes` writes the values as two int8 planes, one per range,
for integer matmuls (`planes.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.quantizers import planes as planes_lib
from vitjax.quantizers.uniform import check_bits, check_samples
from vitjax.storable import register_storable

Mode = Literal["softmax", "gelu"]
MODES = ("softmax", "gelu")


def _twin_codes(x, s1, s2, bits: int, mode: str, xp):
  """(in R1, R1's codes, R2's codes) of every value."""
  half = 2 ** (bits - 1)
  if mode == "softmax":
    in_r1 = x < half * s1
    c1 = xp.clip(xp.round(x / s1), 0, half - 1)
  else:
    in_r1 = x < 0
    c1 = xp.clip(xp.round(x / s1), -half, 0)
  return in_r1, c1, xp.clip(xp.round(x / s2), 0, half - 1)


def _twin(x, s1, s2, bits: int, mode: str, xp):
  in_r1, c1, c2 = _twin_codes(x, s1, s2, bits, mode, xp)
  return xp.where(in_r1, c1 * s1, c2 * s2)


@register_storable
@flax.struct.dataclass
class TwinUniform:
  """Two uniform ranges with scales s1 (small values) and s2 = s1 * 2^m.

  Attributes:
    s1, s2: scalar scales of ranges R1 and R2.
    bits: total code bits, 2..8 (bits - 1 per range).
    mode: "softmax" (non-negative values) or "gelu" (R1 holds the negatives).
  """

  s1: jax.Array
  s2: jax.Array
  bits: int = flax.struct.field(pytree_node=False, default=8)
  mode: Mode = flax.struct.field(pytree_node=False, default="softmax")

  def __post_init__(self) -> None:
    check_bits(self.bits)
    if self.mode not in MODES:
      raise ValueError(f"TwinUniform.mode={self.mode!r}; choose one of {MODES}")

  def ranges(self) -> tuple[tuple[float, float], tuple[float, float]]:
    """(R1, R2) as (low, high) value bounds."""
    half = 2 ** (self.bits - 1)
    s1, s2 = float(self.s1), float(self.s2)
    r1 = (0.0, (half - 1) * s1) if self.mode == "softmax" else (-half * s1, 0.0)
    return r1, (0.0, (half - 1) * s2)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = _twin(x.astype(jnp.float32), jnp.asarray(self.s1, jnp.float32),
              jnp.asarray(self.s2, jnp.float32), self.bits, self.mode, jnp)
    return y.astype(x.dtype)

  def planes(self, x: jax.Array) -> planes_lib.Planes:
    """`self(x)` as two int8 planes (float32 values): R1's codes where a
    value lies in R1, R2's codes elsewhere (see `planes.py`)."""
    s1, s2 = jnp.asarray(self.s1, jnp.float32), jnp.asarray(self.s2, jnp.float32)
    in_r1, c1, c2 = _twin_codes(x.astype(jnp.float32), s1, s2, self.bits, self.mode, jnp)
    codes = jnp.stack([jnp.where(in_r1, c1, 0), jnp.where(in_r1, 0, c2)]).astype(jnp.int8)
    return planes_lib.Planes(codes, jnp.stack([s1, s2]))


def fit_twin_uniform(samples: np.ndarray, *, bits: int = 8, mode: Mode = "softmax",
                     weights: np.ndarray | None = None, max_shift: int = 12,
                     grid: int = 24, max_values: int = 1 << 16) -> TwinUniform:
  """The twin-uniform quantizer with the smallest weighted squared error on
  `samples`; `weights` (same shape, e.g. squared loss gradients) weight each
  value's error (default: all 1). Past `max_values` values, the search scores
  a fixed random subset of them that keeps the smallest and largest.

  Raises:
    ValueError: bits outside 2..8, unknown mode, no samples, NaN/inf, a
      negative sample in softmax mode, or weights of another shape.
  """
  check_bits(bits)
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; choose one of {MODES}")
  x = check_samples(samples).reshape(-1)
  if mode == "softmax" and x.min() < 0:
    raise ValueError(f"twin-uniform softmax mode needs non-negative values, got {x.min():.4g}")
  w = np.ones_like(x) if weights is None else np.asarray(weights, np.float64).reshape(-1)
  if w.shape != x.shape:
    raise ValueError(f"weights hold {w.size} values, the samples {x.size}")
  if x.size > max_values:  # the search scores a fixed random subset (and the extremes)
    keep = np.random.default_rng(0).choice(x.size, max_values, replace=False)
    keep[:2] = np.argmin(x), np.argmax(x)
    x, w = x[keep], w[keep]
  half = 2 ** (bits - 1)
  top = max(float(x.max()), 1e-12)
  best, best_err = None, np.inf
  for alpha in np.linspace(0.3, 1.0, grid):
    s2 = alpha * top / (half - 1)
    for m in range(max_shift + 1):
      s1 = s2 / 2 ** m
      err = float(np.sum(w * (_twin(x, s1, s2, bits, mode, np) - x) ** 2))
      if err < best_err:
        best, best_err = (s1, s2), err
  return TwinUniform(jnp.float32(best[0]), jnp.float32(best[1]), bits, mode)


@dataclasses.dataclass(frozen=True)
class TwinUniformSpec:
  """How to fit a `TwinUniform` quantizer at a site; `hessian` weights the
  search by the squared loss gradient of every value (PTQ4ViT)."""

  bits: int = 8
  mode: Mode = "softmax"
  hessian: bool = True

  def __post_init__(self) -> None:
    check_bits(self.bits)
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r}; choose one of {MODES}")

  @property
  def needs_gradients(self) -> bool:
    return self.hessian

  def fit(self, samples: np.ndarray, weights: np.ndarray | None = None,
          site: str = "this site") -> TwinUniform:
    if self.hessian and weights is None:
      raise ValueError(f"the Hessian-guided twin-uniform fit of {site} needs loss gradients")
    if self.mode == "softmax" and np.min(samples) < 0:
      raise ValueError(f"twin-uniform softmax mode needs non-negative values, but {site} "
                       f"has values down to {np.min(samples):.4g}")
    return fit_twin_uniform(samples, bits=self.bits, mode=self.mode,
                            weights=weights if self.hessian else None)
