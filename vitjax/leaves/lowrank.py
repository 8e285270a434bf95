"""`LowRank(u, v)`: a weight w (in, out) stored as two thin factors, w ~ u @ v.

The layer runs `(x @ u) @ v`, two matmuls of r (in + out) multiply-adds per
token instead of in * out, and stores r (in + out) values. The factors are
weight leaves themselves, so they may be quantized (`map_weights` reaches both).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax

from vitjax.leaves.dispatch import (constrain, input_operand, input_quantized_matmul,
                                   logical_shape, map_weights, matmul, register_storable,
                                   trainable, value_count, weight_matmul)


@register_storable
@flax.struct.dataclass
class LowRank:
  """Factors `u` (in, r) and `v` (r, out) of a weight; each any weight leaf."""

  u: Any
  v: Any

  @property
  def shape(self) -> tuple[int, int]:
    return (logical_shape(self.u)[0], logical_shape(self.v)[1])

  @property
  def rank(self) -> int:
    return logical_shape(self.u)[1]


@weight_matmul.register
def _(w: LowRank, x: jax.Array) -> jax.Array:
  return matmul(matmul(x, w.u), w.v)


@input_quantized_matmul.register
def _(w: LowRank, x: jax.Array, act: Callable[[jax.Array], jax.Array]) -> jax.Array:
  return matmul(input_quantized_matmul(w.u, x, act), w.v)


@input_operand.register
def _(w: LowRank) -> str:
  return "u"


@trainable.register
def _(w: LowRank) -> Any:
  return LowRank(trainable(w.u), trainable(w.v))


@constrain.register
def _(w: LowRank) -> Any:
  return LowRank(constrain(w.u), constrain(w.v))


@map_weights.register
def _(w: LowRank, fn: Callable[[Any], Any]) -> Any:
  return LowRank(map_weights(w.u, fn), map_weights(w.v, fn))


@value_count.register
def _(w: LowRank) -> int:
  return value_count(w.u) + value_count(w.v)
