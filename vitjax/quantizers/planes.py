"""Integer matmuls of non-uniform operands: values as a sum of int8 planes.

A log2, log-sqrt2 or twin-uniform quantizer's value is not one scale times
an integer code, so no single integer dot multiplies its outputs. Each such
quantizer instead writes its values exactly as a few int8 planes, each with
one scalar scale:

  q(x) = sum_p scales[p] * planes[p]       (exact in float32)

  twin-uniform  2 planes: R1's codes where a value lies in R1 (else 0), and
                R2's codes elsewhere; the scales s1 and s2 = s1 * 2^m
                (PTQ4ViT).
  log2          code q (value scale * 2^-q) in groups of 7: plane g holds
                2^(7g + 6 - q), 1..64, where 7g <= q < 7g + 7; its scale is
                scale * 2^-(7g + 6). 4 bits (16 levels): 3 planes; 8 bits: 37.
  log-sqrt2     the same for q // 2, with separate planes for odd q, whose
                scales carry the factor 1/sqrt2 (RepQ-ViT's shift and one
                constant).

`planes_dot_general` multiplies every plane by the other operand's int8 codes
in one s8 x s8 -> s32 dot (the planes are one more free axis of the left
operand) and adds the int32 results up in float32 with the planes' scales.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from aqt.jax.v2 import aqt_tensor
from jax import lax

from vitjax.quantizers.uniform import Uniform, check_integer_operand, output_layout

GROUP = 7  # exponents per plane: 2^0 .. 2^6 fit int8


@flax.struct.dataclass
class Planes:
  """`codes` (P, *shape) int8 and their `scales` (P,) float32; the values
  they stand for are sum_p scales[p] * codes[p]."""

  codes: jax.Array
  scales: jax.Array

  def values(self) -> jax.Array:
    """sum_p scales[p] * codes[p], float32 of the operand's shape."""
    s = self.scales.reshape((-1,) + (1,) * (self.codes.ndim - 1))
    return jnp.sum(self.codes.astype(jnp.float32) * s, axis=0)


def has_planes(q: Any) -> bool:
  """True for a quantizer that writes its values as int8 planes."""
  return callable(getattr(q, "planes", None))


def power_planes(exponent: jax.Array, keep: jax.Array, n_exponents: int,
                 unit: jax.Array) -> Planes:
  """Planes of the values unit * 2^-exponent where `keep` (0 elsewhere), for
  integer exponents in 0..n_exponents - 1 (see the module docstring)."""
  groups = -(-n_exponents // GROUP)
  group = exponent // GROUP
  code = jnp.left_shift(1, GROUP - 1 - (exponent - GROUP * group))
  index = jnp.arange(groups).reshape((-1,) + (1,) * exponent.ndim)
  codes = jnp.where((group[None] == index) & keep[None], code[None], 0).astype(jnp.int8)
  scales = jnp.ldexp(jnp.float32(1.0), -(GROUP * jnp.arange(groups) + GROUP - 1)) * unit
  return Planes(codes, scales.astype(jnp.float32))


def concat(parts: list[Planes]) -> Planes:
  """The planes of a sum of operands, one after another."""
  return Planes(jnp.concatenate([p.codes for p in parts]),
                jnp.concatenate([p.scales for p in parts]))


def _normalized(dims, lhs_ndim: int, rhs_ndim: int):
  (lc, rc), (lb, rb) = dims
  return ((tuple(a % lhs_ndim for a in lc), tuple(a % rhs_ndim for a in rc)),
          (tuple(a % lhs_ndim for a in lb), tuple(a % rhs_ndim for a in rb)))


def _rhs_codes(rhs: jax.Array | None, rhs_q: Uniform | aqt_tensor.QTensor, dims,
               lhs_ndim: int) -> tuple[jax.Array, jax.Array]:
  """The right operand's int8 codes and its scale laid out like the dot's
  output: a symmetric `Uniform` of the activation `rhs`, or the `QTensor` of
  a pre-quantized weight (then `rhs` is ignored).

  Raises:
    ValueError: what `uniform.check_integer_operand` refuses.
  """
  if isinstance(rhs_q, Uniform):
    check_integer_operand(rhs_q, right=True)
    axes = dims[0][1]
    codes, scale, shape = rhs_q.codes(rhs, axes), rhs_q.scale_of(rhs, axes), rhs.shape
  else:
    codes, scale, shape = rhs_q.qvalue, rhs_q.scale[0], rhs_q.qvalue.shape
  return codes.astype(jnp.int8), output_layout(scale.astype(jnp.float32), dims, lhs_ndim,
                                               shape)


def planes_dot_general(lhs: Planes, rhs: jax.Array | None,
                       rhs_q: Uniform | aqt_tensor.QTensor, dims) -> jax.Array:
  """`lax.dot_general(lhs.values(), rhs_q(rhs), dims)` as one integer dot:
  every int8 plane times the right operand's int8 codes, accumulated in
  int32, then scaled and summed in float32 (see `_rhs_codes` for `rhs_q`).
  The int32 sums are exact; they convert to float32 exactly while the
  contraction is shorter than 2^24 / (128 * 127), about 1,000 elements.

  Raises:
    ValueError: what `_rhs_codes` refuses.
  """
  lhs_ndim = lhs.codes.ndim - 1
  rhs_ndim = len(rhs.shape) if isinstance(rhs_q, Uniform) else rhs_q.qvalue.ndim
  dims = _normalized(dims, lhs_ndim, rhs_ndim)
  codes, scale = _rhs_codes(rhs, rhs_q, dims, lhs_ndim)
  (lc, rc), (lb, rb) = dims
  up = lambda axes: tuple(a + 1 for a in axes)  # noqa: E731  (the planes axis comes first)
  ints = lax.dot_general(lhs.codes, codes, ((up(lc), rc), (up(lb), rb)),
                         preferred_element_type=jnp.int32)
  # Output axes: batch, planes, lhs free, rhs free.
  n_batch = len(lb)
  plane_scales = lhs.scales.reshape((1,) * n_batch + (-1,) + (1,) * (ints.ndim - n_batch - 1))
  return jnp.sum(ints.astype(jnp.float32) * plane_scales, axis=n_batch) * scale
