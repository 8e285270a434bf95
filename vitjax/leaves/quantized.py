"""Quantized weight leaves, multiplied through AQT's dot_general.

`QuantizedWeight` holds AQT's own `QTensor` (int8 or int4 values and one float
scale per output channel) and no float copy of the weight, so a checkpoint of
it really shrinks; `linear` serves it by handing the QTensor to AQT's
`dg_core` as the pre-quantized right-hand side (AQT's SERVE path). Activations
are left in float (weight-only), quantized per token at run time (dynamic), or
quantized with a scale fixed by calibration (static), optionally after a fixed
shift that centers a skewed distribution (asymmetric; the shift's product with
the weights is subtracted again exactly).

`FakeQuantWeight` holds a float weight for quantization-aware training: its
matmul is AQT's fake-quantized dot_general, whose custom VJP passes gradients
straight through the rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp
from aqt.jax.v2 import aqt_quantizer, aqt_tensor
from aqt.jax.v2 import config as aqt_config

from vitjax.kernels import cpu_int8
from vitjax.leaves.dispatch import (apply_mask, input_quantized_matmul, trainable,
                                   value_count, weight_matmul)
from vitjax.quantizers.planes import has_planes, planes_dot_general
from vitjax.quantizers.uniform import (Uniform, check_bits, quantized_dot_general,
                                       with_integer_dot)
from vitjax.storable import register_storable

register_storable(aqt_tensor.QTensor)


def _dims(x: jax.Array) -> tuple:
  """lax.dot_general dimension numbers of x (..., in) @ w (in, out)."""
  return (((x.ndim - 1,), (0,)), ((), ()))


def aqt_dot_general(act_bits: int | None, weight_bits: int) -> aqt_config.DotGeneral:
  """AQT config: activations at `act_bits` (None: float), weights at `weight_bits`.

  Deterministic rounding (no stochastic noise), float gradients. Gradients
  reach the activations through pre-quantized (frozen, never trained) weights
  too, as site calibration needs them.
  """
  return aqt_config.dot_general_make(lhs_bits=act_bits, rhs_bits=weight_bits,
                                     bwd_bits=None, allow_dummy_gradients=True)


def quantize_per_channel(w: jax.Array, bits: int) -> aqt_tensor.QTensor:
  """AQT's symmetric abs-max quantization of w (in, out), one scale per output.

  Values are round-to-nearest in [-(2^(b-1) - 1), 2^(b-1) - 1], stored as int8
  (int4 for 4 bits); |w - dequant| <= scale / 2 everywhere.
  """
  return _quantize_per_channel(jnp.asarray(w, jnp.float32), check_bits(bits))


@functools.partial(jax.jit, static_argnums=1)
def _quantize_per_channel(w: jax.Array, bits: int) -> aqt_tensor.QTensor:
  qt, _ = aqt_quantizer.quantizer_make(bits).quant(w, calibration_axes=[0])
  return qt.replace(scale_t=None)


# How a checkpoint treats a field: runtime-only fields are never written, and
# load as their default (vitjax.export).
RUNTIME_ONLY = {"stored": False}

Activations = Literal["float", "dynamic", "static"]
ACTIVATIONS: tuple[str, ...] = typing.get_args(Activations)


@register_storable
@flax.struct.dataclass
class QuantizedWeight:
  """An int8/int4 weight (AQT `QTensor`) and how its layer treats activations.

  Attributes:
    qt: AQT QTensor; `qvalue` (in, out) int8 or int4, `scale` [(1, out)].
    act_scale: static activation scale (scalar) when `activations == "static"`.
    act_shift: static shift added to activations before quantization
      (asymmetric static quantization), or None.
    bits: weight bits (2..8).
    activations: "float" (weight-only), "dynamic" or "static".
    act_bits: activation bits for "dynamic" and "static".
    packed: the weight in the layout of vitjax's CPU int8 kernel
      (`vitjax.kernels.cpu_int8`), set by `vitjax.model.use_cpu_int8_kernel`;
      the layer's integer dot then runs on that kernel (forward only, CPU
      backend). Runtime-only: never saved, and dropped by `replace`, since it
      belongs to these exact int values.
  """

  qt: aqt_tensor.QTensor
  act_scale: jax.Array | None = None
  act_shift: jax.Array | None = None
  packed: cpu_int8.PackedInt8 | None = flax.struct.field(default=None, metadata=RUNTIME_ONLY)
  bits: int = flax.struct.field(pytree_node=False, default=8)
  activations: Activations = flax.struct.field(pytree_node=False, default="float")
  act_bits: int = flax.struct.field(pytree_node=False, default=8)

  def __post_init__(self) -> None:
    if self.activations not in ACTIVATIONS:
      raise ValueError(f"QuantizedWeight.activations={self.activations!r}; choose one of "
                       f"{ACTIVATIONS}")
    check_bits(self.bits)
    check_bits(self.act_bits, "act_bits")

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.qt.qvalue.shape)

  def dequantize(self) -> jax.Array:
    """The float weight these int values and scales stand for."""
    return self.qt.dequant()

  def multiplies_integers(self, has_input_site: bool = False) -> bool:
    """Whether this layer's matmul is an integer dot: it quantizes its own
    activations, or (`has_input_site`) its input site's quantizer does."""
    return self.activations != "float" or has_input_site


def _replace(self: QuantizedWeight, **changes: Any) -> QuantizedWeight:
  """`dataclasses.replace`, dropping the kernel's packed copy unless given:
  it belongs to the old int values."""
  changes.setdefault("packed", None)
  return dataclasses.replace(self, **changes)


QuantizedWeight.replace = _replace  # flax.struct.dataclass sets its own replace


def with_cpu_int8_kernel(w: QuantizedWeight, isa: cpu_int8.Isa | None = None) -> QuantizedWeight:
  """`w` carrying its weight in the CPU int8 kernel's layout (packed now, once),
  for the kernel's code path `isa` (None: the fastest this CPU has)."""
  return dataclasses.replace(w, packed=cpu_int8.pack(w.qt.qvalue, isa))


def without_cpu_int8_kernel(tree: Any) -> Any:
  """`tree` with the kernel's packed copy removed from every QuantizedWeight."""
  return jax.tree_util.tree_map(
      lambda x: x.replace() if isinstance(x, QuantizedWeight) else x, tree,
      is_leaf=lambda x: isinstance(x, QuantizedWeight))


def _integer_dot(w: QuantizedWeight) -> Callable | None:
  """The integer dot of `w`'s matmul: the CPU int8 kernel on its packed copy,
  or None (XLA's dot)."""
  return None if w.packed is None else functools.partial(cpu_int8.dot_general,
                                                          packed=w.packed)


@weight_matmul.register
def _quantized_matmul(w: QuantizedWeight, x: jax.Array) -> jax.Array:
  act_bits = None if w.activations == "float" else w.act_bits
  cfg = aqt_dot_general(act_bits, w.bits)
  if act_bits is not None and w.packed is not None:
    cfg = with_integer_dot(cfg, _integer_dot(w))
  lhs_qt = None
  if w.activations == "static":
    if w.act_shift is not None:
      x = x + w.act_shift.astype(x.dtype)
    scale = jnp.reshape(w.act_scale, (1,) * x.ndim).astype(jnp.float32)
    lhs_qt = aqt_tensor.QTensor(qvalue=None, scale=[scale], scale_t=None, bias=[],
                                dequant_dtype=x.dtype)
  # The float right-hand side is only a placeholder for AQT's calibration; the
  # pre-quantized QTensor replaces it, and XLA drops the unused computation.
  placeholder = jnp.zeros(w.shape, x.dtype)
  y, _ = cfg.dg_core(x, placeholder, lhs_qt, w.qt.replace(dequant_dtype=x.dtype), _dims(x))
  if w.activations == "static" and w.act_shift is not None:
    colsum = (w.qt.qvalue.astype(jnp.float32).sum(0) * w.qt.scale[0][0]).astype(y.dtype)
    y = y - w.act_shift.astype(y.dtype) * colsum
  return y


@input_quantized_matmul.register
def _(w: QuantizedWeight, x: jax.Array, act: Any) -> jax.Array:
  if w.activations != "float":
    raise ValueError(f"a layer whose weight quantizes its own activations "
                     f"({w.activations}) cannot also have an input site quantizer; "
                     "quantize its weight with activations='float'")
  if isinstance(act, Uniform):
    return quantized_dot_general(x, act, None, w.qt, _dims(x), rhs_bits=w.bits,
                                 integer_dot=_integer_dot(w))
  if has_planes(act):  # log or twin-uniform codes: int8 planes x int weight
    return planes_dot_general(act.planes(x), None, w.qt, _dims(x)).astype(x.dtype)
  return weight_matmul(w, act(x))  # other quantizers: their values, weight-only dot


@register_storable
@flax.struct.dataclass
class FakeQuantWeight:
  """A float weight trained through AQT fake quantization (QAT).

  Attributes:
    w: the float weight (in, out), trainable.
    bits: weight bits of the forward pass.
    act_bits: activation bits of the forward pass (None: float activations).
  """

  w: jax.Array
  bits: int = flax.struct.field(pytree_node=False, default=8)
  act_bits: int | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)


@weight_matmul.register
def _fake_quant_matmul(w: FakeQuantWeight, x: jax.Array) -> jax.Array:
  cfg = aqt_dot_general(w.act_bits, w.bits)
  return cfg(x, w.w.astype(x.dtype), _dims(x))


@apply_mask.register
def _(w: QuantizedWeight, mask: jax.Array) -> Any:
  return w  # made from an already masked weight: its pruned values are 0


@apply_mask.register
def _(w: FakeQuantWeight, mask: jax.Array) -> Any:
  return w.replace(w=apply_mask(w.w, mask))


@trainable.register
def _(w: QuantizedWeight) -> Any:
  return jax.tree_util.tree_map(lambda _: False, w)


@trainable.register
def _(w: FakeQuantWeight) -> Any:
  return w.replace(w=True)


@value_count.register
def _(w: QuantizedWeight) -> int:
  return sum(int(a.size) for a in jax.tree_util.tree_leaves(w.replace()))
