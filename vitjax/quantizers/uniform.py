"""Uniform quantizers, their calibration, and integer matmuls through AQT.

`Uniform` maps x to integer codes `round(clip((x + shift) / scale, +-qmax))`
(qmax = 2^(bits-1) - 1, round half to even, the arithmetic of AQT's int
numerics) and back to `codes * scale - shift`. Granularity:

  tensor   one scale (and shift) for the whole tensor;
  channel  one per channel of the last axis (value sites only: a per-channel
           scale on a matmul's contracted axis has no integer dot);
  token    one per token, from the token's own max |x + shift| at run time
           (`scale=None`, nothing to calibrate).

`fit_uniform` picks the clipping bound from calibration samples: minmax (the
largest |x + shift|), percentile, mse (expected error of a histogram model,
`histogram.choose_bound`) or omse (the bound minimizing the measured squared
error of the quantized samples). `Operands(lhs, rhs)` is the quantizer of a
matmul site of two activations (q.kT, probs.v); `quantized_dot_general` runs
such a matmul, or a linear layer's, as AQT's s8 x s8 -> s32 dot.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from aqt.jax.v2 import aqt_tensor
from aqt.jax.v2 import config as aqt_config
from jax import lax

from vitjax.quantizers.histogram import Histogram, choose_bound
from vitjax.storable import register_storable

Granularity = Literal["tensor", "channel", "token"]
GRANULARITIES: tuple[str, ...] = typing.get_args(Granularity)
Method = Literal["minmax", "percentile", "mse", "omse"]
METHODS: tuple[str, ...] = typing.get_args(Method)


def check_bits(bits: int, name: str = "bits") -> int:
  """Returns `bits` if it is an int in 2..8, else raises ValueError naming `name`."""
  if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
    raise ValueError(f"{name}={bits!r} is outside the supported range 2..8")
  return bits


def check_samples(samples: np.ndarray, site: str = "this site") -> np.ndarray:
  """`samples` as a float64 array; raises ValueError if it is empty or holds
  NaN/inf (naming `site`)."""
  x = np.asarray(samples, np.float64)
  if x.size == 0:
    raise ValueError(f"no calibration samples of {site} to fit a quantizer to")
  if not np.isfinite(x).all():
    raise ValueError(f"calibration samples of {site} hold NaN or inf")
  return x


def qmax(bits: int) -> int:
  """Largest code of a symmetric `bits`-bit quantizer, 2^(bits-1) - 1."""
  return 2 ** (bits - 1) - 1


@register_storable
@flax.struct.dataclass
class Uniform:
  """Symmetric uniform quantizer after an optional shift.

  Attributes:
    scale: scalar, (C,) over the last axis, or None (per token at run time).
    shift: scalar or (C,) added before quantizing (asymmetric), or None.
    bits: 2..8.
  """

  scale: jax.Array | None
  shift: jax.Array | None = None
  bits: int = flax.struct.field(pytree_node=False, default=8)

  def __post_init__(self) -> None:
    check_bits(self.bits)

  @property
  def granularity(self) -> Granularity:
    if self.scale is None:
      return "token"
    return "tensor" if jnp.ndim(self.scale) == 0 else "channel"

  def scale_of(self, x: jax.Array, axes: tuple[int, ...] = (-1,)) -> jax.Array:
    """The scale each element of `x` uses, broadcastable to x: the stored one,
    or per token, max |x + shift| over `axes` / qmax."""
    if self.scale is not None:
      return jnp.asarray(self.scale, jnp.float32)
    top = jnp.max(jnp.abs(self._shifted(x)), axis=axes, keepdims=True)
    return jnp.where(top > 0, top / qmax(self.bits), 1.0).astype(jnp.float32)

  def _shifted(self, x: jax.Array) -> jax.Array:
    return x if self.shift is None else x + jnp.asarray(self.shift, x.dtype)

  def codes(self, x: jax.Array, axes: tuple[int, ...] = (-1,)) -> jax.Array:
    """Integer codes of `x` (int32 values in [-qmax, qmax])."""
    m = qmax(self.bits)
    y = self._shifted(x).astype(jnp.float32) * lax.reciprocal(self.scale_of(x, axes))
    return lax.round(jnp.clip(y, -m, m), lax.RoundingMethod.TO_NEAREST_EVEN).astype(jnp.int32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """The quantized values of `x`, dequantized to x's dtype."""
    y = self.codes(x).astype(jnp.float32) * self.scale_of(x)
    if self.shift is not None:
      y = y - jnp.asarray(self.shift, jnp.float32)
    return y.astype(x.dtype)


@register_storable
@flax.struct.dataclass
class Operands:
  """Quantizers of the two activation operands of a matmul site (None:
  float): lhs any quantizer (uniform, log or twin-uniform for an integer
  dot), rhs uniform."""

  lhs: Any = None
  rhs: Uniform | None = None


def _contracting(dims, side: int, ndim: int) -> tuple[int, ...]:
  return tuple(a % ndim for a in dims[0][side])


def check_integer_operand(q: Uniform, right: bool = False) -> None:
  """Refuses a Uniform that cannot feed an integer matmul as an operand.

  Raises:
    ValueError: a per-channel scale (it varies along the contracted axis), or
      a shift on the right operand (`right`), which has no exact correction.
  """
  if q.granularity == "channel":
    raise ValueError("a per-channel activation scale cannot feed an integer matmul "
                     "(it varies along the contracted axis); use granularity 'tensor' "
                     "or 'token', or fold channel scales away with reparameterize()")
  if right and q.shift is not None:
    raise ValueError("the right operand of an integer matmul must be symmetric "
                     "(shift=None)")


def _operand_qtensor(q: Uniform, x: jax.Array, axes: tuple[int, ...], *,
                    right: bool = False) -> aqt_tensor.QTensor:
  check_integer_operand(q, right)
  scale = q.scale_of(x, axes)
  scale = jnp.broadcast_to(scale, (1,) * x.ndim) if scale.ndim == 0 else scale
  return aqt_tensor.QTensor(qvalue=None, scale=[scale], scale_t=None, bias=[],
                            dequant_dtype=x.dtype)


def output_layout(a: jax.Array, dims, lhs_ndim: int, rhs_shape: tuple[int, ...]) -> jax.Array:
  """`a` (broadcastable to the right operand, size 1 on its contracted axes,
  e.g. a per-channel or per-token scale) laid out like the dot's output:
  batch axes, the left operand's free axes as 1, the right's free axes."""
  a = jnp.asarray(a)
  if a.ndim == 0:
    return a
  (_, rc), (_, rb) = dims
  shape = tuple(1 if i in rc else n for i, n in enumerate(rhs_shape))
  a = jnp.broadcast_to(a, shape)
  free = [i for i in range(len(rhs_shape)) if i not in rc and i not in rb]
  a = jnp.transpose(a, tuple(rb) + tuple(free) + tuple(rc))
  n_lhs_free = lhs_ndim - len(dims[0][0]) - len(dims[1][0])
  kept = a.shape[:len(rb) + len(free)]
  return a.reshape(kept[:len(rb)] + (1,) * n_lhs_free + kept[len(rb):])


def _sum_over_contraction(rhs: jax.Array, dims, lhs_ndim: int) -> jax.Array:
  """Sum of `rhs` over its contracted axes, laid out like the dot's output."""
  return output_layout(jnp.sum(rhs, axis=tuple(dims[0][1]), keepdims=True), dims, lhs_ndim,
                       rhs.shape)


def with_integer_dot(cfg: aqt_config.DotGeneral,
                     integer_dot: Callable[..., jax.Array]) -> aqt_config.DotGeneral:
  """AQT config `cfg` whose forward dot of the integer codes is `integer_dot`
  (a `lax.dot_general` replacement, e.g. `vitjax.kernels.cpu_int8.dot_general`)
  instead of XLA's. AQT's custom gradient is left out: such a dot is for
  inference and needs none."""
  return dataclasses.replace(cfg, apply_custom_vjp_on_jax=False,
                             fwd=dataclasses.replace(cfg.fwd, dot_general=integer_dot))


def quantized_dot_general(lhs: jax.Array, lhs_q: Uniform, rhs: jax.Array | None,
                          rhs_q: Uniform | aqt_tensor.QTensor, dims,
                          rhs_bits: int | None = None,
                          integer_dot: Callable[..., jax.Array] | None = None) -> jax.Array:
  """`lax.dot_general(lhs_q(lhs), rhs_q(rhs), dims)` as an integer dot (AQT).

  Both operands are quantized to int8 (or fewer bits) and multiplied in
  int32; the scales are applied to the int32 result. `rhs_q` is a Uniform
  (an activation; it must be symmetric) or AQT's `QTensor` of a pre-quantized
  weight with `rhs_bits` bits (then `rhs` is ignored). An lhs shift is removed
  exactly afterwards: sum((a + s) b) - s sum(b). `integer_dot` replaces
  XLA's dot of the codes (`with_integer_dot`).

  Raises:
    ValueError: a per-channel operand scale, or an asymmetric rhs.
  """
  lhs_axes = _contracting(dims, 0, lhs.ndim)
  if isinstance(rhs_q, Uniform):
    rhs_axes = _contracting(dims, 1, rhs.ndim)
    rhs_qt = _operand_qtensor(rhs_q, rhs, rhs_axes, right=True)
    bits = rhs_q.bits
  else:
    rhs_qt = rhs_q.replace(dequant_dtype=lhs.dtype)
    rhs = jnp.zeros(rhs_qt.qvalue.shape, lhs.dtype)  # AQT's placeholder; unused
    bits = rhs_bits
  x = lhs_q._shifted(lhs)
  cfg = aqt_config.dot_general_make(lhs_bits=lhs_q.bits, rhs_bits=bits, bwd_bits=None,
                                    allow_dummy_gradients=True)
  if integer_dot is not None:
    cfg = with_integer_dot(cfg, integer_dot)
  y, _ = cfg.dg_core(x, rhs, _operand_qtensor(lhs_q, x, lhs_axes), rhs_qt, dims)
  if lhs_q.shift is not None:
    if isinstance(rhs_q, Uniform):
      rhs_hat = rhs_q(rhs)
    else:
      rhs_hat = rhs_qt.dequant()
    shift = jnp.asarray(lhs_q.shift, y.dtype)
    if shift.ndim:
      raise ValueError("a matmul operand's shift must be a scalar")
    y = y - shift * _sum_over_contraction(rhs_hat.astype(y.dtype), dims, lhs.ndim)
  return y


def _bound(mags: np.ndarray, method: Method, bits: int, percentile: float) -> float:
  top = float(mags.max()) if mags.size else 0.0
  if top == 0.0:
    return 1.0
  if method == "minmax":
    return top
  if method == "percentile":
    return float(np.percentile(mags, percentile)) or top
  if method == "mse":
    return choose_bound(Histogram.of(mags), "mse", bits=bits)
  # omse: the measured squared error of every candidate bound.
  m = qmax(bits)
  candidates = top * np.linspace(0.05, 1.0, 96)
  errs = [np.mean((np.clip(np.round(mags / (c / m)), -m, m) * (c / m) - mags) ** 2)
          for c in candidates]
  return float(candidates[int(np.argmin(errs))])


def fit_uniform(samples: np.ndarray, *, bits: int = 8, method: Method = "minmax",
                granularity: Granularity = "tensor", symmetric: bool | None = True,
                percentile: float = 99.99) -> Uniform:
  """A Uniform quantizer fitted to `samples` (..., C) of one site's values.

  `symmetric`: True (no shift), False (shift the range's center to 0), or
  None (shift only a skewed range, |lo + hi| > (hi - lo) / 4).

  Raises:
    ValueError: unknown method or granularity, bits outside 2..8, percentile
      outside (0, 100], no samples, or samples holding NaN/inf.
  """
  check_bits(bits)
  if method not in METHODS:
    raise ValueError(f"method={method!r}; choose one of {METHODS}")
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r}; choose one of {GRANULARITIES}")
  if not 0 < percentile <= 100:
    raise ValueError(f"percentile={percentile} is outside (0, 100]")
  x = check_samples(samples)
  rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
  if granularity == "token":
    return Uniform(None, None, bits)
  m = qmax(bits)
  if granularity == "tensor":
    lo, hi = rows.min(), rows.max()
    if symmetric is None:  # shift only a skewed range
      symmetric = not abs(lo + hi) > (hi - lo) / 4
    shift = 0.0 if symmetric else -(lo + hi) / 2
    bound = _bound(np.abs(rows + shift).reshape(-1), method, bits, percentile)
    return Uniform(jnp.float32(bound / m), None if symmetric else jnp.float32(shift), bits)
  lo, hi = rows.min(0), rows.max(0)
  if symmetric is None:
    symmetric = not np.any(np.abs(lo + hi) > (hi - lo) / 4)
  shift = np.zeros_like(lo) if symmetric else -(lo + hi) / 2
  bounds = np.array([_bound(np.abs(rows[:, c] + shift[c]), method, bits, percentile)
                     for c in range(rows.shape[1])])
  return Uniform(jnp.asarray(bounds / m, jnp.float32),
                 None if symmetric else jnp.asarray(shift, jnp.float32), bits)


@dataclasses.dataclass(frozen=True)
class UniformSpec:
  """How to fit a `Uniform` quantizer at a site (see `fit_uniform`)."""

  bits: int = 8
  method: Method = "minmax"
  granularity: Granularity = "tensor"
  symmetric: bool | None = True
  percentile: float = 99.99
  needs_gradients = False

  def __post_init__(self) -> None:
    check_bits(self.bits)
    if self.method not in METHODS:
      raise ValueError(f"method={self.method!r}; choose one of {METHODS}")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity={self.granularity!r}; choose one of {GRANULARITIES}")
    if not 0 < self.percentile <= 100:
      raise ValueError(f"percentile={self.percentile} is outside (0, 100]")

  def fit(self, samples: np.ndarray, weights: np.ndarray | None = None,
          site: str = "this site") -> Uniform:
    return fit_uniform(samples, bits=self.bits, method=self.method,
                       granularity=self.granularity, symmetric=self.symmetric,
                       percentile=self.percentile)


@dataclasses.dataclass(frozen=True)
class OperandsSpec:
  """How to fit the two operand quantizers of a matmul site (None: float)."""

  lhs: Any = None
  rhs: Any = None

  @property
  def needs_gradients(self) -> bool:
    return any(s is not None and s.needs_gradients for s in (self.lhs, self.rhs))

  def fit(self, samples: dict[str, np.ndarray], weights: dict[str, Any] | None = None,
          site: str = "this site") -> Operands:
    weights = weights or {}
    return Operands(*(None if spec is None else
                      spec.fit(samples[side], weights.get(side), f"{site} ({side})")
                      for side, spec in (("lhs", self.lhs), ("rhs", self.rhs))))
