"""Low-rank factorization by truncated SVD: w (in, out) -> LowRank(u, v).

Give exactly one of
  rank=r              the same rank for every chosen layer (1..min(in, out));
  energy=e            per layer, the smallest rank keeping a fraction e of the
                      squared singular values (0 < e <= 1);
  param_budget=b      a fraction b of the chosen layers' parameters to keep in
                      all, spent greedily on the singular values with the most
                      energy per parameter across layers (0 < b < 1).
With `calibration` images the factorization is data-aware: it minimizes the
error of the layer's output on those inputs, ||X (w - u v)||, by whitening with
a square root R of X^T X (R = diag(sqrt(lam)) Q^T from its eigendecomposition,
eigenvalues floored at 1e-6 of the largest) before the SVD, as SVD-LLM does
with a Cholesky factor (which fails on a singular Gram).

The factors are balanced, u = U sqrt(S), v = sqrt(S) V^T, which keeps both in
a similar range for a later quantization. A layer whose factors would not be
smaller than w (r (in + out) >= in * out) is an error with `rank`, and stays
dense, with a printed line, with `energy` or `param_budget`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import model as model_lib
from vitjax.leaves import LowRank
from vitjax.model import Model
from vitjax.models.inputs import preprocess
from vitjax.transforms.select import (ALL, HEADS, LayerTransform, Patterns, get_kernel,
                                     layer_transform)


@dataclasses.dataclass(frozen=True)
class Factored:
  """SVD of one layer's (possibly whitened) weight."""

  u: np.ndarray        # (in, k) left singular vectors, already un-whitened
  s: np.ndarray        # (k,) singular values
  vt: np.ndarray       # (k, out)

  def factors(self, r: int) -> LowRank:
    root = np.sqrt(self.s[:r])
    return LowRank(jnp.asarray(self.u[:, :r] * root, jnp.float32),
                   jnp.asarray(root[:, None] * self.vt[:r], jnp.float32))


def _dense(path: str, w: Any) -> np.ndarray:
  if not isinstance(w, (jax.Array, np.ndarray)):
    raise ValueError(f"layer {path} holds a {type(w).__name__}; low-rank factorization "
                     "needs a float weight (factorize before quantizing or pruning)")
  return np.asarray(w, np.float64)


def factor(w: np.ndarray, gram: np.ndarray | None = None) -> Factored:
  """SVD of `w`, or of `R w` with R^T R = `gram` (data-aware), un-whitened."""
  if gram is None:
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return Factored(u, s, vt)
  # R = diag(sqrt(lam)) Q^T from gram = Q diag(lam) Q^T. Eigenvalues are floored
  # at 1e-6 of the largest: a Gram matrix of fewer samples than inputs is
  # singular, and float32 rounding can leave it slightly indefinite.
  lam, q = np.linalg.eigh((gram + gram.T) / 2)
  root = np.sqrt(np.maximum(lam, 1e-6 * max(float(lam[-1]), 0.0) + 1e-12))
  u, s, vt = np.linalg.svd(root[:, None] * q.T @ w, full_matrices=False)
  return Factored(q @ (u / root[:, None]), s, vt)


def rank_for_energy(s: np.ndarray, energy: float) -> int:
  """Smallest r with sum(s[:r]^2) >= energy * sum(s^2)."""
  e = np.cumsum(s ** 2) / max(float(np.sum(s ** 2)), 1e-30)
  return int(min(len(s), np.searchsorted(e, energy - 1e-12) + 1))


def budget_ranks(factored: dict[str, Factored], shapes: dict[str, tuple[int, int]],
                 budget: float) -> dict[str, int]:
  """Ranks that keep `budget` of the dense parameters, greedy by energy per parameter."""
  total = sum(m * n for m, n in shapes.values())
  allowance = budget * total
  candidates = []
  for layer, f in factored.items():
    m, n = shapes[layer]
    for i, sv in enumerate(f.s):
      candidates.append((sv ** 2 / (m + n), layer, i))
  candidates.sort(key=lambda c: -c[0])
  ranks = {layer: 0 for layer in factored}
  spent = 0.0
  for _, layer, i in candidates:
    m, n = shapes[layer]
    if i == ranks[layer] and spent + m + n <= allowance:
      ranks[layer] += 1
      spent += m + n
  return ranks


def _grams(model: Model, images: np.ndarray, layers: list[str],
           batch_size: int = 128) -> dict[str, np.ndarray]:
  @jax.jit
  def batch_grams(m: Model, x: jax.Array) -> dict[str, jax.Array]:
    inputs = model_lib.linear_inputs(m, preprocess(x, m.config))
    out = {}
    for k in layers:
      a = inputs[k].reshape(-1, inputs[k].shape[-1]).astype(jnp.float32)
      out[k] = jnp.matmul(a.T, a, precision=jax.lax.Precision.HIGHEST)
    return out
  total = {k: 0.0 for k in layers}
  for start in range(0, len(images), batch_size):
    for k, g in jax.device_get(batch_grams(model, images[start:start + batch_size])).items():
      total[k] = total[k] + np.asarray(g, np.float64)
  return total


def svd(*, rank: int | None = None, energy: float | None = None,
        param_budget: float | None = None, calibration: np.ndarray | None = None,
        layers: Patterns = ALL, exclude: Patterns = ("embedding", HEADS),
        ) -> LayerTransform:
  """Truncated-SVD factorization of the chosen layers (see module docstring).

  By default the patch embedding and the heads (small, and sensitive) stay dense.

  Raises:
    ValueError: not exactly one of rank/energy/param_budget; a value out of
      range (rank 1..min(in, out) of every chosen layer, energy in (0, 1],
      param_budget in (0, 1)); a `rank` whose factors would not be smaller
      than a chosen layer (with energy or param_budget such a layer stays
      dense, and a line says so); a chosen layer that is not a float weight.
  """
  given = [k for k, v in (("rank", rank), ("energy", energy),
                          ("param_budget", param_budget)) if v is not None]
  if len(given) != 1:
    raise ValueError(f"give exactly one of rank, energy, param_budget (got {given or 'none'})")
  if rank is not None and (not isinstance(rank, int) or rank < 1):
    raise ValueError(f"rank={rank!r} must be a positive int")
  if energy is not None and not 0 < energy <= 1:
    raise ValueError(f"energy={energy} is outside (0, 1]")
  if param_budget is not None and not 0 < param_budget < 1:
    raise ValueError(f"param_budget={param_budget} is outside (0, 1)")
  if calibration is not None and len(calibration) == 0:
    raise ValueError("the calibration set is empty; pass at least one image or None")

  def prepare(model: Model, chosen: list[str]) -> dict[str, tuple[Factored, int]]:
    weights = {k: _dense(k, get_kernel(model.params, k)) for k in chosen}
    grams = _grams(model, calibration, chosen) if calibration is not None else {}
    factored = {k: factor(w, grams.get(k)) for k, w in weights.items()}
    shapes = {k: w.shape for k, w in weights.items()}
    if rank is not None:
      for k, (m, n) in shapes.items():
        if rank > min(m, n):
          raise ValueError(f"rank={rank} is above layer {k}'s maximum min{(m, n)}={min(m, n)}")
      ranks = {k: rank for k in chosen}
    elif energy is not None:
      ranks = {k: rank_for_energy(f.s, energy) for k, f in factored.items()}
    else:
      ranks = budget_ranks(factored, shapes, param_budget)
    return {k: (factored[k], max(ranks[k], 1)) for k in chosen}

  def apply(path: str, w: Any, plan: dict[str, tuple[Factored, int]]) -> Any:
    f, r = plan[path]
    m, n = np.shape(w)
    if r * (m + n) >= m * n:
      if rank is not None:
        raise ValueError(
            f"rank={rank} does not shrink layer {path} ({m}x{n}): its factors would hold "
            f"{r * (m + n)} values against {m * n} dense; use rank < {m * n // (m + n) + 1} "
            "or exclude the layer")
      print(f"lowrank: layer {path} stays dense: the rank {r} that {given[0]}="
            f"{energy if energy is not None else param_budget} asks for would hold "
            f"{r * (m + n)} values against {m * n} dense")
      return w
    return f.factors(r)

  name = f"lowrank-{given[0]}"
  return layer_transform(name, apply, layers=layers, exclude=exclude, prepare=prepare)
