"""The polymorphic `linear`: every linear layer of the ViT calls it.

A weight leaf of the parameter tree is either a plain array or a compressed
leaf type (quantized, low-rank, masked; see `vitjax.leaves_*` modules). Each
leaf type registers how it multiplies with `weight_matmul.register`, so the
model code
never branches on how a layer was compressed, and a new compression method is a
new leaf type plus a transform.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.storable import register_storable, storable_types  # noqa: F401 (re-exported)


@functools.singledispatch
def weight_matmul(w: Any, x: jax.Array) -> jax.Array:
  """Returns `x @ w`; dispatches on the type of the weight `w`.

  Leaf types register their implementation with `weight_matmul.register`.
  This default handles plain arrays.

  Raises:
    TypeError: `w` is neither an array nor a registered leaf type.
  """
  if not isinstance(w, (jax.Array, np.ndarray)):
    raise TypeError(
        f"linear got a weight of type {type(w).__name__}; expected an array or "
        f"one of the registered leaf types {registered_leaf_types()}")
  w = w.astype(x.dtype) if w.dtype != x.dtype else w
  return jnp.matmul(x, w)


def matmul(x: jax.Array, w: Any) -> jax.Array:
  """Returns `x @ w` contracting the last axis of `x` with the first of `w`,
  for a weight `w` of any registered leaf type."""
  return weight_matmul(w, x)


def logical_shape(leaf: Any) -> tuple[int, ...]:
  """Dense shape a leaf stands for (compressed leaves define `.shape`)."""
  return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


@functools.singledispatch
def input_quantized_matmul(w: Any, x: jax.Array, act: Callable[[jax.Array], jax.Array]
                           ) -> jax.Array:
  """Returns `act(x) @ w`, where `act` is the activation quantizer of the
  layer's input site; dispatches on the type of `w`.

  This default multiplies the quantized values as floats; a quantized weight
  registers an integer matmul instead.
  """
  return matmul(act(x), w)


@functools.singledispatch
def input_operand(w: Any) -> str | None:
  """The field of compressed leaf `w` whose matmul takes the layer's input (and
  so the input site's quantized values), or None when `w` itself does; leaf
  types that wrap other leaves register theirs (a mask's values, a low-rank
  pair's first factor)."""
  return None


def input_leaf(w: Any) -> tuple[tuple[str, ...], Any]:
  """(field path, leaf) of the innermost leaf of `w` that multiplies the
  layer's input, following `input_operand`."""
  path: list[str] = []
  while (field := input_operand(w)) is not None:
    path.append(field)
    w = getattr(w, field)
  return tuple(path), w


def linear(x: jax.Array, w: Any, b: jax.Array | None = None,
           act: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """Returns `x @ w + b` for any weight leaf `w` (see `matmul`), with `x`
  quantized by `act` first when a quantizer is given."""
  y = matmul(x, w) if act is None else input_quantized_matmul(w, x, act)
  return y if b is None else y + b.astype(y.dtype)


@functools.singledispatch
def trainable(leaf: Any) -> Any:
  """Returns a tree shaped like `leaf`'s arrays: True where training may update.

  Float arrays are trainable; integer arrays and boolean masks are not. Leaf
  types register their own rule (e.g. a quantized weight's values and scales
  are frozen; a masked weight's values train but its mask does not).
  """
  return bool(jnp.issubdtype(leaf.dtype, jnp.floating))


@functools.singledispatch
def constrain(leaf: Any) -> Any:
  """Returns `leaf` with its structural constraints re-applied after an update.

  Arrays have none; e.g. a masked weight registers `w * mask`, so training
  keeps pruned weights at zero.
  """
  return leaf


@functools.singledispatch
def apply_mask(w: Any, mask: jax.Array) -> Any:
  """`w` with its entries outside the boolean `mask` set to zero; dispatches
  on the leaf type (this default handles plain arrays).

  Raises:
    TypeError: a leaf type that did not register how it is masked.
  """
  if not isinstance(w, (jax.Array, np.ndarray)):
    raise TypeError(f"a {type(w).__name__} weight cannot be masked; registered: arrays "
                    f"and {sorted(t.__name__ for t in apply_mask.registry if t is not object)}")
  return jnp.where(mask, w, 0).astype(w.dtype)


@functools.singledispatch
def map_weights(leaf: Any, fn: Callable[[Any], Any]) -> Any:
  """Applies `fn` to the dense weight(s) inside `leaf` and rebuilds it.

  A plain array or a quantized leaf is itself the weight; composite leaves
  (low-rank factors, masked values) register how `fn` reaches their parts, so
  quantizing a low-rank layer quantizes both factors.
  """
  return fn(leaf)


@functools.singledispatch
def value_count(leaf: Any) -> int:
  """How many values the leaf really holds: kept (unmasked) values, factor
  entries, int values plus scales; an array's size."""
  return int(np.prod(np.shape(leaf)))


def constrain_tree(params: Any) -> Any:
  """Applies `constrain` to every weight leaf of `params`."""
  return jax.tree_util.tree_map(constrain, params, is_leaf=is_compressed)


def is_compressed(x: Any) -> bool:
  """True for instances of registered compressed leaf types."""
  return type(x) in weight_matmul.registry and type(x) is not object


def registered_leaf_types() -> list[str]:
  """Names of the compressed leaf types `linear` accepts besides arrays."""
  return sorted(t.__name__ for t in weight_matmul.registry if t is not object)


def trainable_mask(params: Any) -> Any:
  """`params`-shaped tree of bools (see `trainable`), compressed leaves included."""
  return jax.tree_util.tree_map(trainable, params, is_leaf=is_compressed)
