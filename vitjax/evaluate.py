"""Accuracy, size, latency and throughput of any `Model`, measured.

Timings compile first, warm up, then time repeated calls that end in
`block_until_ready`, round-robin over the models compared, and report the
median; numbers measured in one process side by side are comparable, numbers
from different runs less so.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import data as data_lib
from vitjax import model as model_lib
from vitjax.model import Model
from vitjax.models.inputs import preprocess


@jax.jit
def _predict(model: Model, images: jax.Array) -> jax.Array:
  return model_lib.apply(model, preprocess(images, model.config)).argmax(-1)


def predictions(model: Model, split: data_lib.Split, batch_size: int = 256) -> np.ndarray:
  """Predicted class of every image of `split`, in order."""
  out = []
  for images, _, n in data_lib.eval_batches(split, batch_size):
    out.append(np.asarray(_predict(model, images))[:n])
  return np.concatenate(out)


def accuracy(model: Model, split: data_lib.Split, batch_size: int = 256) -> float:
  """Top-1 accuracy of `model` on `split`, in [0, 1]."""
  return float((predictions(model, split, batch_size) == split.labels).mean())


def forward_fn(model: Model, batch: int) -> Callable[[], jax.Array]:
  """A zero-argument inference call on a fixed batch of random uint8 images.

  It is the whole inference path that `accuracy` compiles (normalize, forward,
  argmax), so a batch of 256 reuses that executable.
  """
  cfg = model.config
  images = jax.random.randint(jax.random.PRNGKey(0),
                              (batch, cfg.image_size, cfg.image_size, cfg.channels),
                              0, 256).astype(jnp.uint8)
  return lambda: _predict(model, images)


def round_times(models: dict[str, Model], batch: int, *, rounds: int = 5,
                calls: int = 5) -> dict[str, list[float]]:
  """Seconds per batch-`batch` forward of each model in every round, timed
  round-robin: every round times `calls` calls of each model in turn (after a
  warm-up), so slow drift of the machine (other load, frequency) hits all
  models alike."""
  fns = {name: forward_fn(m, batch) for name, m in models.items()}
  for fn in fns.values():
    for _ in range(3):
      jax.block_until_ready(fn())
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      for _ in range(calls):
        jax.block_until_ready(fn())
      samples[name].append((time.perf_counter() - t) / calls)
  return samples


def side_by_side(models: dict[str, Model], batch: int, *, rounds: int = 5,
                 calls: int = 5) -> dict[str, float]:
  """Median over rounds of `round_times`: seconds per batch-`batch` forward."""
  times = round_times(models, batch, rounds=rounds, calls=calls)
  return {name: statistics.median(v) for name, v in times.items()}


@dataclasses.dataclass(frozen=True)
class Report:
  """What one model measures.

  `bytes` is the parameter storage as a vitjax checkpoint holds it;
  `disk_bytes` the measured size of a saved checkpoint directory (or None).
  """

  accuracy: float
  params: int
  bytes: int
  flops: int
  latency_ms: float
  throughput: float
  disk_bytes: int | None = None

  def to_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def compare(models: dict[str, Model], split: data_lib.Split, *,
            disk_bytes: dict[str, int] | None = None, timing_batch: int = 256,
            rounds: int = 5) -> dict[str, Report]:
  """Accuracy on `split` and size of each model; latency (batch 1) and
  throughput (batch `timing_batch`) measured side by side in this process."""
  lat = side_by_side(models, 1, rounds=rounds, calls=10)
  thr = side_by_side(models, timing_batch, rounds=rounds, calls=2)
  disk_bytes = disk_bytes or {}
  return {name: Report(accuracy=accuracy(m, split), params=model_lib.param_count(m),
                       bytes=model_lib.stored_bytes(m), flops=model_lib.flops_per_image(m),
                       latency_ms=lat[name] * 1e3, throughput=timing_batch / thr[name],
                       disk_bytes=disk_bytes.get(name))
          for name, m in models.items()}


def report(model: Model, split: data_lib.Split, *, disk_bytes: int | None = None,
           timing_batch: int = 256) -> Report:
  """`compare` for one model."""
  return compare({"model": model}, split, timing_batch=timing_batch,
                 disk_bytes={"model": disk_bytes} if disk_bytes else None)["model"]


def slowdown_note(name: str, reference: str, latency_ratio: float,
                  throughput_ratio: float) -> str | None:
  """A plain sentence when `name` is slower than `reference` on this backend
  (batch-1 latency over 1.05x the reference's, or throughput under 1/1.05x),
  else None. Ratios are `name`'s figure over the reference's."""
  if latency_ratio <= 1.05 and throughput_ratio >= 1 / 1.05:
    return None
  return (f"note: {name} is SLOWER than {reference} on this {jax.default_backend()} "
          f"backend (batch-1 latency x{latency_ratio:.2f}, throughput "
          f"x{throughput_ratio:.2f}); what it saves here is size, not time.")


def speed_notes(reports: dict[str, Report], reference: str) -> list[str]:
  """`slowdown_note` of every model slower than `reference`."""
  ref = reports[reference]
  notes = [slowdown_note(name, reference, r.latency_ms / ref.latency_ms,
                         r.throughput / ref.throughput)
           for name, r in reports.items() if name != reference]
  return [note for note in notes if note]


def format_table(reports: dict[str, Report], reference: str) -> str:
  """A Markdown table of the reports with ratios to `reference`."""
  ref = reports[reference]
  size = lambda r: r.disk_bytes if r.disk_bytes is not None else r.bytes
  lines = ["| model | top-1 % | Δ top-1 pt | params | bytes | size ratio | MFLOPs/img "
           "| latency b=1 ms | speedup b=1 | img/s b=256 | throughput ratio |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in reports.items():
    lines.append(
        f"| {name} | {r.accuracy * 100:.2f} | {(r.accuracy - ref.accuracy) * 100:+.2f} "
        f"| {r.params:,} | {size(r):,} | {size(r) / size(ref):.3f} | {r.flops / 1e6:.1f} "
        f"| {r.latency_ms:.2f} | {ref.latency_ms / r.latency_ms:.2f}x "
        f"| {r.throughput:.0f} | {r.throughput / ref.throughput:.2f}x |")
  return "\n".join(lines)


def format_report(name: str, r: Report) -> str:
  disk = f"  on disk {r.disk_bytes:,} B" if r.disk_bytes is not None else ""
  return (f"{name}: top-1 {r.accuracy * 100:.2f}%  params {r.params:,}  "
          f"bytes {r.bytes:,}{disk}  MFLOPs/img {r.flops / 1e6:.1f}  "
          f"latency(b=1) {r.latency_ms:.2f} ms  throughput(b=256) {r.throughput:.0f} img/s")
