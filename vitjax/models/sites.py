"""Quantization sites: the places where the ViT lets a quantizer act.

The model calls one of three functions at every place a fully quantized ViT
needs a quantizer; each place has the address `<module path>/<op>`:

  `<linear layer>/input`   the input of a linear layer (patch embedding,
                           query/key/value/out, Dense_0/Dense_1, heads);
                           `linear` runs the layer, an integer matmul when the
                           weight is an int leaf and the input quantizer is
                           uniform, log or twin-uniform;
  `<attention>/qk`         the q.kT matmul, quantizer `Operands(lhs, rhs)`;
  `<attention>/pv`         the probs.v matmul, `Operands(lhs, rhs)`;
  `<attention>/softmax`    the attention probabilities (any quantizer);
  `<mlp>/gelu`             the GELU output (any quantizer);
  `<layernorm>/input`      the input of a LayerNorm (any quantizer).

A value site (`value`) returns its quantizer's dequantized values; a matmul
site (`einsum`, `linear`) quantizes its operands and multiplies integers:
the codes through AQT when both are uniform, or the int8 planes of a log or
twin-uniform left operand (`quantizers.planes`) against a uniform right one.
The softmax output is also pv's left operand, and the GELU output Dense_1's
input: a quantizer at the value site (`softmax`, `gelu`) is followed by a
float matmul, the same quantizer at the matmul's operand (`pv` lhs,
`Dense_1/input`) by an integer one; the named recipes use the latter.

Quantizers live in the `sites` collection (`Model.sites`, a flat dict from
address to quantizer); a site without one computes in float. Every site also
sows what it sees into `site_inputs` (only when that collection is mutable:
calibration) and adds `site_delta` (only when given: the perturbation
calibration differentiates to get each value's loss gradient).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from jax import lax

from vitjax import leaves
from vitjax.quantizers.planes import has_planes, planes_dot_general
from vitjax.quantizers.uniform import Operands, Uniform, quantized_dot_general

COLLECTION = "sites"
RECORD = "site_inputs"
DELTA = "site_delta"


def _quantizer(module: nn.Module, op: str) -> Any:
  return module.get_variable(COLLECTION, op) if module.has_variable(COLLECTION, op) else None


def _observe(module: nn.Module, op: str, x: Any) -> Any:
  if module.has_variable(DELTA, op):
    x = jax.tree_util.tree_map(lambda a, d: a + d, x, module.get_variable(DELTA, op))
  module.sow(RECORD, op, x)
  return x


def value(module: nn.Module, op: str, x: jax.Array) -> jax.Array:
  """The value site `<module path>/<op>`: `x`, quantized if it has a quantizer."""
  x = _observe(module, op, x)
  q = _quantizer(module, op)
  return x if q is None else q(x)


def linear(module: nn.Module, x: jax.Array, kernel: Any, bias: jax.Array | None
           ) -> jax.Array:
  """`x @ kernel + bias` at site `<module path>/input` (see `leaves.linear`)."""
  x = _observe(module, "input", x)
  return leaves.linear(x, kernel, bias, act=_quantizer(module, "input"))


def einsum(module: nn.Module, op: str, lhs: jax.Array, rhs: jax.Array, dims: Any
           ) -> jax.Array:
  """`lax.dot_general(lhs, rhs, dims)` at the matmul site `<module path>/<op>`.

  With `Operands(lhs_q, rhs_q)` there: both uniform gives an integer dot
  (AQT), a log or twin-uniform lhs_q with a uniform rhs_q an integer dot of
  the lhs planes (`planes_dot_general`); otherwise each quantizer given is
  applied to its operand and the values are multiplied in float.

  Raises:
    TypeError: the site holds something other than `Operands`.
  """
  lhs, rhs = _observe(module, op, {"lhs": lhs, "rhs": rhs}).values()
  q = _quantizer(module, op)
  if q is None:
    return lax.dot_general(lhs, rhs, dims)
  if not isinstance(q, Operands):
    raise TypeError(f"matmul site {op} needs an Operands(lhs, rhs) quantizer, got "
                    f"{type(q).__name__}")
  if isinstance(q.lhs, Uniform) and isinstance(q.rhs, Uniform):
    return quantized_dot_general(lhs, q.lhs, rhs, q.rhs, dims).astype(lhs.dtype)
  if has_planes(q.lhs) and isinstance(q.rhs, Uniform):
    return planes_dot_general(q.lhs.planes(lhs), rhs, q.rhs, dims).astype(lhs.dtype)
  lhs = lhs if q.lhs is None else q.lhs(lhs)
  rhs = rhs if q.rhs is None else q.rhs(rhs)
  return lax.dot_general(lhs, rhs, dims)
