"""FQ-ViT's power-of-two factor (PTF) quantizer for LayerNorm inputs.

The residual stream a LayerNorm reads varies hugely between channels, so one
scale for the tensor wastes levels on the quiet channels and a scale per
channel cannot be rescaled cheaply. PTF gives each channel c an integer
factor alpha_c in 0..K on one shared scale s: channel c is quantized with
scale s * 2^alpha_c, so all channels share s and differ by a shift.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.quantizers.uniform import check_bits, check_samples, qmax
from vitjax.storable import register_storable


@register_storable
@flax.struct.dataclass
class PowerOfTwoFactor:
  """x[..., c] -> round((x + shift) / (scale 2^alpha_c)) * scale 2^alpha_c - shift.

  Attributes:
    scale: the shared scalar scale s.
    alpha: (C,) int8 factors in 0..K.
    shift: scalar added before quantizing (centers the range).
    bits: 2..8.
  """

  scale: jax.Array
  alpha: jax.Array
  shift: jax.Array
  bits: int = flax.struct.field(pytree_node=False, default=8)

  def __post_init__(self) -> None:
    check_bits(self.bits)

  def channel_scales(self) -> jax.Array:
    """(C,) scale of every channel, s * 2^alpha_c (exact in float32)."""
    return jnp.ldexp(jnp.asarray(self.scale, jnp.float32), self.alpha.astype(jnp.int32))

  def __call__(self, x: jax.Array) -> jax.Array:
    m = qmax(self.bits)
    step = self.channel_scales()
    y = x.astype(jnp.float32) + self.shift
    y = jnp.clip(jnp.round(y / step), -m, m) * step - self.shift
    return y.astype(x.dtype)


def fit_power_of_two(samples: np.ndarray, *, bits: int = 8,
                     max_factor: int = 3) -> PowerOfTwoFactor:
  """PTF quantizer for `samples` (..., C): s makes the widest channel fit with
  factor 2^max_factor, and each channel takes the factor with the smallest
  squared error.

  Raises:
    ValueError: bits outside 2..8, max_factor outside 0..7, no samples, NaN/inf.
  """
  check_bits(bits)
  if not 0 <= max_factor <= 7:
    raise ValueError(f"max_factor={max_factor} is outside 0..7")
  x = check_samples(samples)
  rows = x.reshape(-1, x.shape[-1])
  shift = -(rows.min() + rows.max()) / 2
  rows = rows + shift
  m = qmax(bits)
  scale = max(np.abs(rows).max(), 1e-12) / m / 2 ** max_factor
  errors = []
  for k in range(max_factor + 1):
    step = scale * 2 ** k
    errors.append(((np.clip(np.round(rows / step), -m, m) * step - rows) ** 2).sum(0))
  alpha = np.argmin(np.stack(errors), axis=0).astype(np.int8)
  return PowerOfTwoFactor(jnp.float32(scale), jnp.asarray(alpha), jnp.float32(shift), bits)


@dataclasses.dataclass(frozen=True)
class PowerOfTwoSpec:
  """How to fit a `PowerOfTwoFactor` quantizer at a site."""

  bits: int = 8
  max_factor: int = 3
  needs_gradients = False

  def __post_init__(self) -> None:
    check_bits(self.bits)
    if not 0 <= self.max_factor <= 7:
      raise ValueError(f"max_factor={self.max_factor} is outside 0..7")

  def fit(self, samples: np.ndarray, weights: np.ndarray | None = None,
          site: str = "this site") -> PowerOfTwoFactor:
    return fit_power_of_two(samples, bits=self.bits, max_factor=self.max_factor)
