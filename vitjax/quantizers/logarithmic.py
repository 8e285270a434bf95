"""Logarithmic quantizers for post-softmax values (FQ-ViT's log2, RepQ-ViT's
log-sqrt2).

Attention probabilities follow a power law: most are tiny, a few are large.
A log quantizer spends its levels on orders of magnitude instead of equal
steps: code q = round(-log_base(x / scale)) in 0..2^bits - 1, value
scale * base^-q; a value whose code would pass 2^bits - 1 becomes 0 (FQ-ViT's
rule). Base 2 makes every level a power of two (a shift in integer
hardware); base sqrt(2) halves the step between levels (RepQ-ViT).
`planes` writes the values as int8 planes for integer matmuls (`planes.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.quantizers import planes as planes_lib
from vitjax.quantizers.uniform import check_bits, check_samples
from vitjax.storable import register_storable

Base = Literal["2", "sqrt2"]
BASES = {"2": 2.0, "sqrt2": math.sqrt(2.0)}


@register_storable
@flax.struct.dataclass
class Logarithmic:
  """x -> scale * base^-q for non-negative x.

  Attributes:
    scale: the largest representable value (scalar, a power of two when
      fitted, so base-2 levels are exact powers of two).
    bits: code bits, 2..8 (2^bits levels plus zero).
    base: "2" (log2) or "sqrt2" (log-sqrt2).
  """

  scale: jax.Array
  bits: int = flax.struct.field(pytree_node=False, default=4)
  base: Base = flax.struct.field(pytree_node=False, default="2")

  def __post_init__(self) -> None:
    check_bits(self.bits)
    if self.base not in BASES:
      raise ValueError(f"Logarithmic.base={self.base!r}; choose one of {tuple(BASES)}")

  def codes(self, x: jax.Array) -> jax.Array:
    """Codes 0..2^bits - 1 (int32), and 2^bits for values that become zero."""
    levels = 2 ** self.bits
    ratio = jnp.maximum(x.astype(jnp.float32), 0.0) / jnp.asarray(self.scale, jnp.float32)
    if self.base == "2":
      q = jnp.round(-jnp.log2(ratio))  # log2 of a power of two is exact
    else:
      q = jnp.round(-2.0 * jnp.log2(ratio))
    q = jnp.where(ratio > 0, jnp.maximum(q, 0.0), float(levels))
    return jnp.minimum(q, float(levels)).astype(jnp.int32)

  def __call__(self, x: jax.Array) -> jax.Array:
    q = self.codes(x)
    if self.base == "2":
      value = jnp.ldexp(jnp.float32(1.0), -q)
    else:
      # sqrt2^-q = 2^-(q // 2) * (1/sqrt2 if q is odd): a shift and one constant.
      value = jnp.ldexp(jnp.where(q % 2 == 1, jnp.float32(1 / math.sqrt(2)), 1.0), -(q // 2))
    value = jnp.where(q >= 2 ** self.bits, 0.0, value) * jnp.asarray(self.scale, jnp.float32)
    return value.astype(x.dtype)

  def planes(self, x: jax.Array) -> planes_lib.Planes:
    """`self(x)` as int8 planes (float32 values, see `planes.py`): base 2 in
    ceil(2^bits / 7) planes, base sqrt2 in twice ceil(2^(bits-1) / 7)."""
    q = self.codes(x)
    levels = 2 ** self.bits
    keep = q < levels
    scale = jnp.asarray(self.scale, jnp.float32)
    if self.base == "2":
      return planes_lib.power_planes(q, keep, levels, scale)
    half = levels // 2
    return planes_lib.concat([
        planes_lib.power_planes(q // 2, keep & (q % 2 == 0), half, scale),
        planes_lib.power_planes(q // 2, keep & (q % 2 == 1), half,
                                jnp.float32(1 / math.sqrt(2)) * scale)])


def fit_logarithmic(samples: np.ndarray, *, bits: int = 4, base: Base = "2",
                    site: str = "this site") -> Logarithmic:
  """A log quantizer whose top level is the power of two at or above the
  largest sample (1 for softmax outputs).

  Raises:
    ValueError: bits outside 2..8, unknown base, no samples, NaN/inf, or a
      negative sample (a log quantizer represents non-negative values only;
      `site` names where they came from).
  """
  check_bits(bits)
  if base not in BASES:
    raise ValueError(f"base={base!r}; choose one of {tuple(BASES)}")
  x = check_samples(samples, site)
  if x.min() < 0:
    raise ValueError(f"a log2 quantizer needs non-negative values, but {site} has values "
                     f"down to {x.min():.4g}; use it on post-softmax sites only")
  top = float(x.max())
  scale = 2.0 ** math.ceil(math.log2(top)) if top > 0 else 1.0
  return Logarithmic(jnp.float32(scale), bits, base)


@dataclasses.dataclass(frozen=True)
class LogarithmicSpec:
  """How to fit a `Logarithmic` quantizer at a site."""

  bits: int = 4
  base: Base = "2"
  needs_gradients = False

  def __post_init__(self) -> None:
    check_bits(self.bits)
    if self.base not in BASES:
      raise ValueError(f"base={self.base!r}; choose one of {tuple(BASES)}")

  def fit(self, samples: np.ndarray, weights: np.ndarray | None = None,
          site: str = "this site") -> Logarithmic:
    return fit_logarithmic(samples, bits=self.bits, base=self.base, site=site)
