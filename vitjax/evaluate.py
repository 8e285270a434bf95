"""Accuracy, size, latency and throughput of any `Model`, measured.

Timings compile first, warm up, then time repeated calls that end in
`block_until_ready`, and report the median; numbers measured in one process
side by side are comparable, numbers from different runs less so.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import data as data_lib
from vitjax import model as model_lib
from vitjax.model import Model


@jax.jit
def _predict(model: Model, images: jax.Array) -> jax.Array:
  return model_lib.apply(model, data_lib.preprocess(images, model.config)).argmax(-1)


def predictions(model: Model, split: data_lib.Split, batch_size: int = 500) -> np.ndarray:
  """Predicted class of every image of `split`, in order."""
  out = []
  for images, _, n in data_lib.eval_batches(split, batch_size):
    out.append(np.asarray(_predict(model, images))[:n])
  return np.concatenate(out)


def accuracy(model: Model, split: data_lib.Split, batch_size: int = 500) -> float:
  """Top-1 accuracy of `model` on `split`, in [0, 1]."""
  return float((predictions(model, split, batch_size) == split.labels).mean())


def time_call(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20,
              min_time: float = 0.0) -> float:
  """Median seconds of `fn()` (which must return jax arrays), after warm-up.

  Repeats at least `repeats` times, and more until `min_time` seconds passed.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  start = time.perf_counter()
  while len(times) < repeats or time.perf_counter() - start < min_time:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def forward_fn(model: Model, batch: int) -> Callable[[], jax.Array]:
  """A compiled zero-argument forward pass over a fixed random batch."""
  cfg = model.config
  images = jax.random.normal(jax.random.PRNGKey(0),
                             (batch, cfg.image_size, cfg.image_size, cfg.channels))
  compiled = jax.jit(model_lib.apply).lower(model, images).compile()
  return lambda: compiled(model, images)


def latency(model: Model, batch: int = 1, repeats: int = 50) -> float:
  """Median seconds of one batch-`batch` forward pass (default: batch 1)."""
  return time_call(forward_fn(model, batch), repeats=repeats, min_time=0.5)


def throughput(model: Model, batch: int = 256, repeats: int = 10) -> float:
  """Images per second of batch-`batch` forward passes (default: batch 256)."""
  return batch / time_call(forward_fn(model, batch), repeats=repeats, min_time=1.0)


@dataclasses.dataclass(frozen=True)
class Report:
  """What one model measures; `bytes` are in-memory as stored (see `stored_bytes`)."""

  accuracy: float
  params: int
  bytes: int
  flops: int
  latency_ms: float
  throughput: float

  def to_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def report(model: Model, split: data_lib.Split, *, timing_batch: int = 256) -> Report:
  """Accuracy on `split`, size, FLOPs, batch-1 latency and throughput."""
  return Report(
      accuracy=accuracy(model, split),
      params=model_lib.param_count(model),
      bytes=model_lib.stored_bytes(model),
      flops=model_lib.flops_per_image(model),
      latency_ms=latency(model) * 1e3,
      throughput=throughput(model, timing_batch))


def format_report(name: str, r: Report) -> str:
  return (f"{name}: top-1 {r.accuracy * 100:.2f}%  params {r.params:,}  "
          f"bytes {r.bytes:,}  MFLOPs/img {r.flops / 1e6:.1f}  "
          f"latency(b=1) {r.latency_ms:.2f} ms  throughput(b=256) {r.throughput:.0f} img/s")
