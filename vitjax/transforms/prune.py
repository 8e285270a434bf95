"""Unstructured pruning masks: magnitude (per layer or global), N:M, gradual.

Each transform turns the chosen float kernels into `Masked(w, mask)` leaves
whose pruned values are zero (checkpoints store only the kept ones);
training then keeps pruned weights at zero (`leaves.constrain`). As in
jaxpruner, the scorer (|w|) and the mask rule (top-k per layer, top-k over all
chosen layers, top-n of every m) are separate pieces.

  magnitude(sparsity)                 drop the smallest |w| of each layer;
  magnitude(sparsity, scope="global") one threshold across the chosen layers;
  n_m(n, m)                           keep the n largest |w| of every m
                                      consecutive inputs of each output (2:4);
  gradual(final, start, end)          a `post_update` hook for `train.fit` that
                                      raises the sparsity of the Masked leaves
                                      along Zhu & Gupta's cubic schedule.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import leaves
from vitjax import model as model_lib
from vitjax.leaves import Masked
from vitjax.model import Model
from vitjax.transforms.select import (ALL, LayerTransform, Patterns, get_kernel,
                                     layer_transform)

PyTree = Any


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
  """Returns `sparsity` if it lies in [0, 1), else raises ValueError naming it."""
  if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
    raise ValueError(f"{name}={sparsity!r} is outside [0, 1)")
  return float(sparsity)


def _values(path: str, w: Any) -> jax.Array:
  if isinstance(w, Masked):
    w = leaves.constrain(w).w
  if not isinstance(w, (jax.Array, np.ndarray)):
    raise ValueError(f"layer {path} holds a {type(w).__name__}; pruning masks need float "
                     "weights (prune before quantizing or factorizing)")
  return jnp.asarray(w)


@jax.jit
def topk_mask(scores: jax.Array, sparsity: float | jax.Array) -> jax.Array:
  """True for the `round((1 - sparsity) * size)` largest scores (ties: by order)."""
  flat = scores.reshape(-1)
  drop = jnp.round(sparsity * flat.size).astype(jnp.int32)
  order = jnp.argsort(flat, stable=True)
  rank = jnp.zeros(flat.size, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
  return (rank >= drop).reshape(scores.shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def n_m_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
  """True for the n largest of every m consecutive entries along axis 0."""
  k, out = scores.shape
  groups = scores.reshape(k // m, m, out)
  order = jnp.argsort(-groups, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1)
  return (rank < n).reshape(k, out)


def magnitude(sparsity: float, *, scope: str = "layer", layers: Patterns = ALL,
              exclude: Patterns = ()) -> LayerTransform:
  """Masks the smallest-|w| fraction `sparsity` of each layer (or of all chosen
  layers together with `scope="global"`).

  Raises:
    ValueError: sparsity outside [0, 1), unknown scope, non-float weights.
  """
  check_sparsity(sparsity)
  if scope not in ("layer", "global"):
    raise ValueError(f"scope={scope!r}; choose 'layer' or 'global'")

  def prepare(model: Model, chosen: list[str]) -> float | None:
    if scope == "layer":
      return None
    mags = np.concatenate([np.abs(np.asarray(_values(k, get_kernel(model.params, k))))
                           .reshape(-1) for k in chosen])
    mask = np.asarray(topk_mask(jnp.asarray(mags), sparsity))
    return float(mags[mask].min()) if mask.any() else float("inf")

  def prune(path: str, w: Any, threshold: float | None) -> Masked:
    values = _values(path, w)
    if threshold is None:
      mask = topk_mask(jnp.abs(values), sparsity)
    else:
      mask = jnp.asarray(np.abs(np.asarray(values)) >= threshold)
    return leaves.constrain(Masked(values, mask))

  return layer_transform(f"magnitude-{scope}-{sparsity:g}", prune, layers=layers,
                         exclude=exclude, prepare=prepare)


def n_m(n: int = 2, m: int = 4, *, layers: Patterns = ALL,
        exclude: Patterns = ()) -> LayerTransform:
  """N:M sparsity along the input dimension (2:4 by default).

  Raises:
    ValueError: n >= m or n < 1 (now); m not dividing a chosen layer's input
      dimension (when applied).
  """
  if not (isinstance(n, int) and isinstance(m, int)) or not 1 <= n < m:
    raise ValueError(f"N:M needs integers 1 <= N < M, got N={n}, M={m}")

  def prune(path: str, w: Any, context: Any) -> Masked:
    values = _values(path, w)
    if values.shape[0] % m:
      raise ValueError(f"M={m} does not divide layer {path}'s input dimension "
                       f"{values.shape[0]}; choose M among its divisors or exclude the layer")
    return leaves.constrain(Masked(values, n_m_mask(jnp.abs(values), n, m)))

  return layer_transform(f"{n}:{m}", prune, layers=layers, exclude=exclude)


def cubic_sparsity(step: jax.Array, final: float, start: int, end: int,
                   initial: float = 0.0) -> jax.Array:
  """Zhu & Gupta's schedule: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3."""
  frac = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)
  return final + (initial - final) * (1.0 - frac) ** 3


def gradual(final: float, start: int, end: int, *, every: int = 10,
            initial: float = 0.0, scope: str = "layer"
            ) -> Callable[[PyTree, jax.Array], PyTree]:
  """A `train.fit` post-update hook raising Masked leaves' sparsity over steps.

  Every `every` steps between `start` and `end` (and at `end`), each Masked
  leaf's mask is recomputed from the magnitudes of its current values to the
  cubic schedule's sparsity (per layer, or with one global threshold).
  Start from `magnitude(initial)` to create the Masked leaves.

  Raises:
    ValueError: sparsities outside [0, 1), end <= start, every < 1, bad scope.
  """
  check_sparsity(final, "final")
  check_sparsity(initial, "initial")
  if end <= start or start < 0 or every < 1:
    raise ValueError(f"need 0 <= start < end and every >= 1; got start={start}, "
                     f"end={end}, every={every}")
  if scope not in ("layer", "global"):
    raise ValueError(f"scope={scope!r}; choose 'layer' or 'global'")

  def remask(params: PyTree, s: jax.Array) -> PyTree:
    masked = [x for x in jax.tree_util.tree_leaves(params, is_leaf=leaves.is_compressed)
              if isinstance(x, Masked)]
    threshold = None
    if scope == "global":
      mags = jnp.concatenate([jnp.abs(x.w).reshape(-1) for x in masked])
      keep = topk_mask(mags, s)
      threshold = jnp.where(keep, mags, jnp.inf).min()
    def one(x: Any) -> Any:
      if not isinstance(x, Masked):
        return x
      mask = topk_mask(jnp.abs(x.w), s) if threshold is None else jnp.abs(x.w) >= threshold
      return leaves.constrain(Masked(x.w, mask))
    return jax.tree_util.tree_map(one, params, is_leaf=leaves.is_compressed)

  def hook(params: PyTree, step: jax.Array) -> PyTree:
    due = ((step - start) % every == 0) | (step == end)
    due = due & (step >= start) & (step <= end)
    s = cubic_sparsity(step, final, start, end, initial)
    return jax.lax.cond(due, lambda p: remask(p, s), lambda p: p, params)

  return hook


def sparsity_report(model: Model) -> dict[str, float]:
  """Layer path -> fraction of pruned weights, for every Masked layer."""
  return {path[: -len("/kernel")]: leaf.sparsity
          for path, leaf in model_lib.weight_leaves(model.params)
          if path.endswith("/kernel") and isinstance(leaf, Masked)}
