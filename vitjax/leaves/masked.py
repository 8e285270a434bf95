"""`Masked(w, mask)`: a pruned weight, values beside a boolean keep-mask.

The layer multiplies by `w * mask`. Training updates `w` only (the mask is not
trainable), and `constrain` re-applies `w * mask` after every update, so pruned
weights stay exactly zero through fine-tuning (the optax/jaxpruner way). The
values may be quantized afterwards (`map_weights`): zero quantizes to zero, so
the pattern survives, and the mask is still there to say where it is.
On disk the mask takes one bit per value and the values only their kept part.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.leaves.dispatch import (apply_mask, constrain, input_operand, input_quantized_matmul,
                                   logical_shape, map_weights, matmul, register_storable,
                                   trainable, value_count, weight_matmul)


@register_storable
@flax.struct.dataclass
class Masked:
  """Values `w` (any weight leaf) and a boolean `mask` of the same shape."""

  w: Any
  mask: jax.Array
  # Checkpoints store the arrays of `w` in the mask's shape as their kept
  # values only (vitjax.export); the pruned ones are zero.
  STORE_KEPT_BY: ClassVar[str] = "mask"

  @property
  def shape(self) -> tuple[int, ...]:
    return logical_shape(self.w)

  @property
  def sparsity(self) -> float:
    """Fraction of pruned (masked-out) values."""
    return 1.0 - float(jnp.mean(self.mask))


@weight_matmul.register
def _(w: Masked, x: jax.Array) -> jax.Array:
  return matmul(x, apply_mask(w.w, w.mask))


@input_quantized_matmul.register
def _(w: Masked, x: jax.Array, act: Callable[[jax.Array], jax.Array]) -> jax.Array:
  return input_quantized_matmul(apply_mask(w.w, w.mask), x, act)


@input_operand.register
def _(w: Masked) -> str:
  return "w"


@trainable.register
def _(w: Masked) -> Any:
  return Masked(trainable(w.w), False)


@constrain.register
def _(w: Masked) -> Any:
  return w.replace(w=apply_mask(w.w, w.mask))


@map_weights.register
def _(w: Masked, fn: Callable[[Any], Any]) -> Any:
  values = constrain(w).w
  return Masked(map_weights(values, fn), w.mask)


@value_count.register
def _(w: Masked) -> int:
  kept = int(jnp.sum(w.mask))
  return round(value_count(w.w) * kept / max(w.mask.size, 1))
