"""Recording what quantization sites see on calibration images.

One mechanism for every site: the model sows each site's input
(`model_lib.site_inputs`), and this module keeps, per site, a random sample
of its rows (the last axis is the channel axis) plus one row of per-channel
minima and one of maxima over all calibration images, so a min/max fit sees
the true extremes. For sites whose fit needs them, it also keeps each sampled
value's squared gradient of the loss (cross-entropy against the model's own
predictions), PTQ4ViT's estimate of the Hessian diagonal.

Calibration images must come from the training split: `check_training_split`
refuses a test (or mixed) split.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import losses
from vitjax import model as model_lib
from vitjax import progress as progress_lib
from vitjax.model import Model
from vitjax.models.inputs import preprocess


@dataclasses.dataclass(frozen=True)
class Samples:
  """Rows (N, C) seen at one site (the last two are the per-channel minima and
  maxima over all images) and, when recorded, their squared loss gradients
  (the extreme rows have weight 0)."""

  values: np.ndarray
  weights: np.ndarray | None = None


def check_training_split(calibration: Any) -> None:
  """Refuses calibration images that are not from the training split.

  Raises:
    TypeError: `calibration` is not a `data.Split` (images and an origin).
    ValueError: its origin is not "train", it is empty, or its float images
      hold NaN/inf.
  """
  if not (hasattr(calibration, "images") and hasattr(calibration, "origin")):
    raise TypeError(f"calibration must be a data.Split (from Dataset.calibration), got "
                    f"{type(calibration).__name__}")
  if calibration.origin != "train":
    raise ValueError(f"calibration images must come from the training split, but this "
                     f"split's origin is {calibration.origin!r}; use Dataset.calibration "
                     "(or wrap your own training images as Split(..., origin='train'))")
  if len(calibration) == 0:
    raise ValueError("the calibration set is empty; pass at least one image")
  images = np.asarray(calibration.images)
  if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
    raise ValueError("the calibration images hold NaN or inf values")


def _rows(x: jax.Array) -> jax.Array:
  return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


def record(model: Model, calibration: Any, addresses: list[str], *,
           gradients: frozenset[str] = frozenset(), batch_size: int = 64,
           max_rows: int = 8192, seed: int = 0, progress: bool = True
           ) -> dict[str, Any]:
  """Address -> `Samples` (or {"lhs", "rhs"} -> `Samples` for a matmul of two
  activations) over the calibration images.

  Args:
    gradients: addresses whose samples also carry squared loss gradients.
    max_rows: rows kept per site (spread evenly over the batches).

  Raises:
    ValueError: calibration not from the training split, an unknown address,
      or NaN/inf at a site (named).
  """
  check_training_split(calibration)
  known = set(model_lib.site_addresses(model))
  unknown = [a for a in addresses if a not in known]
  if unknown:
    raise ValueError(f"unknown quantization sites {unknown[:3]}; see "
                     "model.site_addresses(model)")
  images = calibration.images
  n_batches = math.ceil(len(images) / batch_size)
  per_batch = max(1, max_rows // n_batches)
  config = model.config
  wanted = list(addresses)
  grad_sites = [a for a in wanted if a in gradients]

  def summarize(values: Any, grads: Any, idx: Any) -> Any:
    def one(x, g, i):
      rows = _rows(x)
      return {"rows": rows[i], "lo": rows.min(0), "hi": rows.max(0),
              "g2": None if g is None else jnp.square(_rows(g)[i])}
    if isinstance(values, dict):
      return {side: one(values[side], None if grads is None else grads[side], idx[side])
              for side in ("lhs", "rhs")}
    return one(values, grads, idx)

  site_shapes: dict[int, dict[str, Any]] = {}

  def shapes_for(n: int) -> dict[str, Any]:
    """Each site input's shape and dtype for a batch of `n` images (traced
    once per batch length)."""
    if n not in site_shapes:
      site_shapes[n] = jax.eval_shape(
          lambda m, x: model_lib.site_inputs(m, preprocess(x, config)), model,
          jax.ShapeDtypeStruct((n,) + images.shape[1:], images.dtype))
    return site_shapes[n]

  @jax.jit
  def batch_stats(m: Model, x: jax.Array, idx: dict[str, Any]) -> dict[str, Any]:
    shapes = shapes_for(x.shape[0])
    x = preprocess(x, config)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   {a: shapes[a] for a in grad_sites})

    def loss(deltas):
      logits, values = model_lib.apply_with_sites(m, x, deltas)
      labels = jnp.argmax(jax.lax.stop_gradient(logits), -1)
      # Summed over the batch, so each value's gradient is its own image's,
      # whatever the batch size.
      return losses.cross_entropy(logits, labels) * logits.shape[0], values

    if grad_sites:
      grads, values = jax.grad(loss, has_aux=True)(zeros)
    else:
      grads, values = {}, model_lib.site_inputs(m, x)
    return {a: summarize(values[a], grads.get(a), idx[a]) for a in wanted}

  # The sampled rows are drawn here with NumPy, not inside `batch_stats`: a
  # draw without replacement in the graph is a sort per site, which made the
  # program several times slower to compile (benchmarks/calibration_compile.py).
  rng = np.random.default_rng(seed)

  def sample(n_rows: int) -> np.ndarray:
    return rng.choice(n_rows, min(per_batch, n_rows), replace=False).astype(np.int32)

  bar = progress_lib.bar(n_batches, "calibrate sites", enabled=progress)
  parts: list[dict[str, Any]] = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    shapes = shapes_for(len(batch))
    idx = jax.tree_util.tree_map(lambda s: sample(math.prod(s.shape[:-1])),
                                 {a: shapes[a] for a in wanted})
    parts.append(jax.device_get(batch_stats(model, batch, idx)))
    bar.update(1)
  bar.close()

  def merge(items: list[dict[str, Any]], where: str) -> Samples:
    rows = np.concatenate([p["rows"] for p in items])
    lo = np.min([p["lo"] for p in items], axis=0)
    hi = np.max([p["hi"] for p in items], axis=0)
    if not (np.isfinite(rows).all() and np.isfinite(lo).all() and np.isfinite(hi).all()):
      raise ValueError(f"the values at site {where} hold NaN or inf on the calibration "
                       "images; check the model's weights")
    values = np.concatenate([rows, lo[None], hi[None]])
    weights = None
    if items[0]["g2"] is not None:
      weights = np.concatenate([np.concatenate([p["g2"] for p in items]),
                                np.zeros((2, rows.shape[1]), rows.dtype)])
    return Samples(values, weights)

  out: dict[str, Any] = {}
  for a in wanted:
    if isinstance(parts[0][a], dict) and "rows" not in parts[0][a]:
      out[a] = {side: merge([p[a][side] for p in parts], f"{a} ({side})")
                for side in ("lhs", "rhs")}
    else:
      out[a] = merge([p[a] for p in parts], a)
  return out
