"""Structured pruning: remove whole attention heads and MLP neurons.

The kept heads' q/k/v columns and out-projection rows, and the kept neurons'
fan-in columns and fan-out rows, are sliced out and the config records each
block's new head count and MLP width: the result is a smaller dense model,
smaller in memory and in FLOPs, not only masked.

Importance of a head or neuron ("score"):
  l1, l2   the norm of all its weights (q/k/v columns and out rows of a head;
           the fan-in column, its bias and fan-out row of a neuron);
  taylor   the first-order estimate of the loss change when it is removed,
           (sum of grad * w over its out-projection / fan-out weights)^2,
           summed over calibration batches (Molchanov et al. 2019).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import losses
from vitjax import model as model_lib
from vitjax.model import Model
from vitjax.models.arch import require_vit
from vitjax.models.inputs import preprocess

if TYPE_CHECKING:  # a type only: transforms do not import the dataset module
  from vitjax.data import Split

SCORES = ("l1", "l2", "taylor")
ATTN = "MultiHeadDotProductAttention_1"
MLP = "MlpBlock_3"


def _block(params: Any, i: int) -> Any:
  return params["Transformer"][f"encoderblock_{i}"]


def _float(path: str, w: Any) -> np.ndarray:
  if not isinstance(w, (jax.Array, np.ndarray)):
    raise ValueError(f"structured pruning needs float weights, but {path} holds a "
                     f"{type(w).__name__}; prune heads and neurons before other transforms")
  return np.asarray(w)


def keep_counts(keep: float | Sequence[int], sizes: Sequence[int], param: str,
                unit: str) -> list[int]:
  """Per-block counts to keep from a fraction or explicit counts.

  Raises:
    ValueError: a fraction outside (0, 1], a wrong number of counts, or a block
      left with nothing (pruning every head or neuron of a block).
  """
  if isinstance(keep, (int, float)) and not isinstance(keep, bool):
    if not 0 < keep <= 1:
      raise ValueError(f"{param}={keep} is outside (0, 1]")
    counts = [int(round(keep * n)) for n in sizes]
  else:
    counts = list(keep)
    if len(counts) != len(sizes):
      raise ValueError(f"{param} has {len(counts)} entries for {len(sizes)} blocks")
  for i, (c, n) in enumerate(zip(counts, sizes)):
    if not isinstance(c, (int, np.integer)) or c < 1:
      raise ValueError(f"{param} leaves block {i} with {c} of its {n} {unit}s; "
                       f"at least one must remain (raise {param})")
    if c > n:
      raise ValueError(f"{param} asks block {i} to keep {c} {unit}s, it has {n}")
  return counts


def _norm(x: np.ndarray, axis: Any, kind: str) -> np.ndarray:
  return np.abs(x).sum(axis) if kind == "l1" else np.sqrt((x.astype(np.float64) ** 2).sum(axis))


def norm_scores(model: Model, kind: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per block: head scores (heads,) and neuron scores (mlp width,)."""
  cfg = model.config
  heads, neurons = [], []
  for i in range(cfg.depth):
    blk = _block(model.params, i)
    prefix = f"Transformer/encoderblock_{i}"
    h, hd = cfg.heads(i), cfg.head_dim
    parts = []
    for name in ("query", "key", "value"):
      w = _float(f"{prefix}/{ATTN}/{name}/kernel", blk[ATTN][name]["kernel"])
      parts.append(w.reshape(w.shape[0], h, hd).transpose(1, 0, 2).reshape(h, -1))
    out = _float(f"{prefix}/{ATTN}/out/kernel", blk[ATTN]["out"]["kernel"])
    parts.append(out.reshape(h, -1))
    heads.append(_norm(np.concatenate(parts, axis=1), 1, kind))
    w1 = _float(f"{prefix}/{MLP}/Dense_0/kernel", blk[MLP]["Dense_0"]["kernel"])
    w2 = _float(f"{prefix}/{MLP}/Dense_1/kernel", blk[MLP]["Dense_1"]["kernel"])
    b1 = np.asarray(blk[MLP]["Dense_0"]["bias"])
    neurons.append(_norm(np.concatenate([w1.T, b1[:, None], w2], axis=1), 1, kind))
  return heads, neurons


def taylor_scores(model: Model, calibration: Split, batch_size: int = 128
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """First-order Taylor importance of heads and neurons over calibration batches."""
  cfg = model.config
  norm_scores(model, "l2")  # validates that every weight involved is a float array

  @jax.jit
  def contributions(m: Model, images: jax.Array, labels: jax.Array):
    def loss(params):
      logits = model_lib.apply(Model(cfg, params), preprocess(images, cfg))
      return losses.cross_entropy(logits, labels)
    grads = jax.grad(loss)(m.params)
    heads, neurons = [], []
    for i in range(cfg.depth):
      g, w = _block(grads, i), _block(m.params, i)
      gw = g[ATTN]["out"]["kernel"] * w[ATTN]["out"]["kernel"]
      heads.append(gw.reshape(cfg.heads(i), -1).sum(1))
      neurons.append((g[MLP]["Dense_1"]["kernel"] * w[MLP]["Dense_1"]["kernel"]).sum(1))
    return heads, neurons

  if len(calibration) == 0:
    raise ValueError("the calibration set is empty; taylor scores need labeled images")
  heads = [np.zeros(cfg.heads(i)) for i in range(cfg.depth)]
  neurons = [np.zeros(cfg.mlp_width(i)) for i in range(cfg.depth)]
  for start in range(0, len(calibration), batch_size):
    part = calibration.take(slice(start, start + batch_size))
    h, n = jax.device_get(contributions(model, part.images, part.labels))
    for i in range(cfg.depth):
      heads[i] += np.asarray(h[i], np.float64) ** 2
      neurons[i] += np.asarray(n[i], np.float64) ** 2
  return heads, neurons


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the k highest scores, in their original order."""
  return np.sort(np.argsort(-scores, kind="stable")[:k])


def slice_model(model: Model, head_keep: list[np.ndarray],
                neuron_keep: list[np.ndarray]) -> Model:
  """The smaller model keeping, per block, the given head and neuron indices.

  Raises:
    ValueError: the model has activation quantizers at its sites (their
      per-channel statistics would not fit the sliced widths: prune first,
      then quantize).
  """
  if model.sites:
    raise ValueError(f"structured pruning changes layer widths, and the model has "
                     f"activation quantizers at {len(model.sites)} sites: prune first, "
                     "then quantize its sites")
  cfg = model.config
  params = jax.tree_util.tree_map(lambda a: a, model.params)  # fresh dicts
  hd = cfg.head_dim
  for i in range(cfg.depth):
    blk = _block(params, i)
    cols = head_columns(head_keep[i], hd)
    keep = neuron_keep[i]
    attn, mlp = blk[ATTN], blk[MLP]
    host = lambda a: np.asarray(a)
    for name in ("query", "key", "value"):
      attn[name] = {"kernel": jnp.asarray(host(attn[name]["kernel"])[:, cols]),
                    "bias": jnp.asarray(host(attn[name]["bias"])[cols])}
    attn["out"] = {"kernel": jnp.asarray(host(attn["out"]["kernel"])[cols, :]),
                   "bias": attn["out"]["bias"]}
    mlp["Dense_0"] = {"kernel": jnp.asarray(host(mlp["Dense_0"]["kernel"])[:, keep]),
                      "bias": jnp.asarray(host(mlp["Dense_0"]["bias"])[keep])}
    mlp["Dense_1"] = {"kernel": jnp.asarray(host(mlp["Dense_1"]["kernel"])[keep, :]),
                      "bias": mlp["Dense_1"]["bias"]}
  config = cfg.replace(block_heads=tuple(len(h) for h in head_keep),
                       block_mlp_dims=tuple(len(n) for n in neuron_keep))
  pruned = Model(config, params)
  model_lib.check_params(config, params)
  return pruned


def heads_and_neurons(*, head_keep: float | Sequence[int] = 1.0,
                      mlp_keep: float | Sequence[int] = 1.0, score: str = "l2",
                      calibration: Split | None = None,
                      batch_size: int = 128):
  """`Model -> Model` keeping the most important heads and MLP neurons per block.

  Args:
    head_keep: fraction of each block's heads to keep (rounded, at least one
      required), or per-block counts.
    mlp_keep: the same for MLP neurons.
    score: "l1", "l2" or "taylor" (needs `calibration` with labels).

  Raises:
    ValueError: unknown score, taylor without calibration, or keep values that
      would empty a block (when applied).
  """
  if score not in SCORES:
    raise ValueError(f"score={score!r}; choose one of {SCORES}")
  if score == "taylor" and calibration is None:
    raise ValueError("score='taylor' needs a labeled calibration split")

  def transform(model: Model) -> Model:
    return slice_model(model, *kept_units(model, head_keep, mlp_keep, score, calibration,
                                          batch_size))

  return transform


def kept_units(model: Model, head_keep: float | Sequence[int], mlp_keep: float | Sequence[int],
               score: str = "l2", calibration: Split | None = None, batch_size: int = 128
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Per block, the indices of the heads and of the MLP neurons that
  `heads_and_neurons` keeps (the highest scores, in their original order).

  Raises:
    ValueError: a CNN, or keep values that would empty a block.
  """
  cfg = require_vit(model.config, "structured pruning of heads and neurons")
  h_counts = keep_counts(head_keep, [cfg.heads(i) for i in range(cfg.depth)], "head_keep",
                         "head")
  n_counts = keep_counts(mlp_keep, [cfg.mlp_width(i) for i in range(cfg.depth)], "mlp_keep",
                         "neuron")
  if score == "taylor":
    h_scores, n_scores = taylor_scores(model, calibration, batch_size)
  else:
    h_scores, n_scores = norm_scores(model, score)
  return ([top_indices(s, k) for s, k in zip(h_scores, h_counts)],
          [top_indices(s, k) for s, k in zip(n_scores, n_counts)])


def head_columns(heads: np.ndarray, head_dim: int) -> np.ndarray:
  """The q/k/v output columns (and out-projection rows) of the given heads."""
  return np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in heads])

