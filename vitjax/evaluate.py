"""Accuracy, size, latency and throughput of any `Model`, measured.

Timings compile first, warm up, then time repeated calls that end in
`block_until_ready`, round-robin over the models compared, and report the
median; numbers measured in one process side by side are comparable, numbers
from different runs less so.

Every function takes optional XLA compiler `options` (`jax.jit`'s
`compiler_options`, e.g. from `fastest_options`);
without them XLA's defaults apply. One executable is compiled per distinct
options, model structure and batch shape, and reused across calls.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import statistics
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import data as data_lib
from vitjax import model as model_lib
from vitjax import streaming, xla_cpu
from vitjax.model import Model
from vitjax.models.inputs import preprocess


Options = Mapping[str, str]


def _forward(model: Model, images: jax.Array) -> jax.Array:
  return model_lib.apply(model, preprocess(images, model.config)).argmax(-1)


@functools.lru_cache(maxsize=None)
def _predictor(options: tuple[tuple[str, str], ...]) -> Callable:
  return jax.jit(_forward, compiler_options=dict(options) or None)


def predictor(options: Options | None = None) -> Callable[[Model, jax.Array], jax.Array]:
  """The jitted inference path (normalize, forward, argmax), compiled with
  `options`: `predictor(options)(model, uint8_images)` -> predicted classes."""
  return _predictor(tuple(sorted((options or {}).items())))


# Images to score: a split in RAM, or an image folder decoded batch by batch.
Scored = data_lib.Split | streaming.ImageFolder


def _batches(split: Scored, batch_size: int):
  if isinstance(split, streaming.ImageFolder):
    return streaming.eval_batches(split, batch_size)
  return data_lib.eval_batches(split, batch_size)


def predictions(model: Model, split: Scored, batch_size: int = 256,
                options: Options | None = None) -> np.ndarray:
  """Predicted class of every image of `split` (in RAM, or an image folder
  streamed from disk), in order."""
  predict = predictor(options)
  out = []
  for images, _, n in _batches(split, batch_size):
    out.append(np.asarray(predict(model, images))[:n])
  return np.concatenate(out)


def accuracy(model: Model, split: Scored, batch_size: int = 256,
             options: Options | None = None) -> float:
  """Top-1 accuracy of `model` on `split` (in RAM or a streamed image
  folder), in [0, 1]."""
  return float((predictions(model, split, batch_size, options) == split.labels).mean())


def forward_fn(model: Model, batch: int, options: Options | None = None
               ) -> Callable[[], jax.Array]:
  """A zero-argument inference call on a fixed batch of random uint8 images.

  It is the whole inference path that `accuracy` compiles (normalize, forward,
  argmax), so a batch of 256 with the same options reuses that executable.
  """
  cfg = model.config
  images = jax.random.randint(jax.random.PRNGKey(0),
                              (batch, cfg.image_size, cfg.image_size, cfg.channels),
                              0, 256).astype(jnp.uint8)
  predict = predictor(options)
  return lambda: predict(model, images)


def precompile(models: Mapping[str, Model], batches: Sequence[int],
               options: Sequence[Options] = ({},), *, workers: int = 2) -> int:
  """Compiles every model's inference (`forward_fn`) at every batch size with
  every `options`, `workers` compiles at a time, and runs each once; returns
  how many (model, batch, options) jobs ran.

  XLA compiles on a single thread, so on a CPU host compiles in parallel
  threads keep the other cores busy; jit keeps each executable for the later
  calls of `accuracy`, `round_times` and `fastest_options`.

  Raises:
    ValueError: `workers` is not positive.
  """
  if workers < 1:
    raise ValueError(f"workers={workers} must be >= 1")
  jobs = [(m, b, o) for m in models.values() for b in batches for o in options]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for done in pool.map(lambda job: jax.block_until_ready(forward_fn(*job)()), jobs):
      del done
  return len(jobs)


def round_robin(fns: Mapping[str, Callable[[], object]], *, rounds: int, calls: int,
                warmup: int = 3) -> dict[str, list[float]]:
  """Seconds per call of each zero-argument function in every round: after
  `warmup` calls of each, every round times `calls` calls of each function in
  turn (each call waited for with `block_until_ready`), so slow drift of the
  machine (other load, frequency) hits all alike. Any callables: the peer
  benchmark times PyTorch modules with it too."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  samples: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t = time.perf_counter()
      for _ in range(calls):
        jax.block_until_ready(fn())
      samples[name].append((time.perf_counter() - t) / calls)
  return samples


def round_times(models: dict[str, Model], batch: int, *, rounds: int = 5,
                calls: int = 5, options: Mapping[str, Options] | None = None,
                warmup: int = 3) -> dict[str, list[float]]:
  """`round_robin` of every model's batch-`batch` inference (`forward_fn`);
  `options[name]` compiles model `name` (default: XLA's)."""
  options = options or {}
  fns = {name: forward_fn(m, batch, options.get(name)) for name, m in models.items()}
  return round_robin(fns, rounds=rounds, calls=calls, warmup=warmup)


def ratio_spread(reference: list[float] | tuple[float, ...],
                 other: list[float] | tuple[float, ...]) -> tuple[float, float, float]:
  """(min, median, max) over rounds of the round's ratio reference / other."""
  ratios = sorted(a / b for a, b in zip(reference, other))
  return ratios[0], statistics.median(ratios), ratios[-1]


@dataclasses.dataclass(frozen=True)
class Report:
  """What one model measures.

  `bytes` is the parameter storage as a vitjax checkpoint holds it;
  `disk_bytes` the measured size of a saved checkpoint directory (or None).
  `latency_ms` and `throughput` are medians over the timing rounds; the
  `*_rounds` tuples hold every round's figure, in the order the rounds ran
  (all models of a comparison were timed in each round, so round i of two
  reports can be divided). `options` names the compiler options the timed
  executables were built with at each batch size (`vitjax.xla_cpu.CANDIDATES`
  names, or "given").
  """

  accuracy: float
  params: int
  bytes: int
  flops: int
  latency_ms: float
  throughput: float
  disk_bytes: int | None = None
  latency_rounds_ms: tuple[float, ...] = ()
  throughput_rounds: tuple[float, ...] = ()
  options: str = ""

  def to_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


ChooseOptions = Callable[[Model, int], Options]


def _options_name(options: Options) -> str:
  try:
    return xla_cpu.candidate_name(options)
  except ValueError:
    return "given"


def fastest_options(model: Model, batch: int, *, calls: int = 3) -> dict[str, str]:
  """Compiler options of the faster of `xla_cpu.CANDIDATES` for `model`'s
  inference at `batch` images on this machine: each candidate's forward is
  compiled and warmed up once, then the candidates are timed in alternation
  over `calls` rounds and the lower total wins. On a GPU or TPU backend, {}
  (the candidates are CPU options).

  Raises:
    ValueError: `batch` or `calls` is not positive.
  """
  if batch < 1 or calls < 1:
    raise ValueError(f"batch={batch} and calls={calls} must both be >= 1")
  if jax.default_backend() != "cpu":
    return {}
  totals = {name: sum(t) for name, t in round_times(
      {name: model for name in xla_cpu.CANDIDATES}, batch, rounds=calls, calls=1,
      options=xla_cpu.CANDIDATES, warmup=1).items()}
  return dict(xla_cpu.CANDIDATES[min(totals, key=totals.get)])


@dataclasses.dataclass(frozen=True)
class Speed:
  """Timing rounds of one model: seconds per batch-1 call (`latency_rounds`)
  and per batch-`batch` call (`batch_rounds`) in each round, and the compiler
  options of the two executables."""

  latency_rounds: tuple[float, ...]
  batch_rounds: tuple[float, ...]
  batch: int
  latency_options: dict[str, str]
  batch_options: dict[str, str]

  @property
  def options_name(self) -> str:
    return (f"{_options_name(self.latency_options)} (b=1), "
            f"{_options_name(self.batch_options)} (b={self.batch})")


def speeds(models: dict[str, Model], *, timing_batch: int = 256, rounds: int = 5,
           choose_options: ChooseOptions | None = None) -> dict[str, Speed]:
  """Batch-1 latency and batch-`timing_batch` time of every model, measured
  side by side in this process (`round_times`: 10 and 2 calls per round).

  `choose_options(model, batch)` (e.g. `fastest_options`) picks each model's
  compiler options per batch size; None: XLA's defaults. Every executable is
  compiled ahead in parallel (`precompile`): with a chooser on a CPU backend,
  one per candidate of `xla_cpu.CANDIDATES` (what `fastest_options` tries).
  """
  choose = choose_options or (lambda model, batch: {})
  tried = list(xla_cpu.CANDIDATES.values()) if (
      choose_options is not None and jax.default_backend() == "cpu") else [{}]
  precompile(models, (1, timing_batch), tried)
  lat_opts = {name: dict(choose(m, 1)) for name, m in models.items()}
  thr_opts = {name: dict(choose(m, timing_batch)) for name, m in models.items()}
  lat = round_times(models, 1, rounds=rounds, calls=10, options=lat_opts)
  thr = round_times(models, timing_batch, rounds=rounds, calls=2, options=thr_opts)
  return {name: Speed(tuple(lat[name]), tuple(thr[name]), timing_batch, lat_opts[name],
                      thr_opts[name]) for name in models}


def compare(models: dict[str, Model], split: Scored, *,
            disk_bytes: dict[str, int] | None = None, timing_batch: int = 256,
            rounds: int = 5, choose_options: ChooseOptions | None = None
            ) -> dict[str, Report]:
  """Accuracy on `split` and size of each model, with `speeds`; accuracy runs
  on the `timing_batch` executable."""
  timed = speeds(models, timing_batch=timing_batch, rounds=rounds,
                 choose_options=choose_options)
  disk_bytes = disk_bytes or {}
  reports = {}
  for name, m in models.items():
    t = timed[name]
    reports[name] = Report(
        accuracy=accuracy(m, split, timing_batch, t.batch_options),
        params=model_lib.param_count(m), bytes=model_lib.stored_bytes(m),
        flops=model_lib.flops_per_image(m),
        latency_ms=statistics.median(t.latency_rounds) * 1e3,
        throughput=timing_batch / statistics.median(t.batch_rounds),
        disk_bytes=disk_bytes.get(name),
        latency_rounds_ms=tuple(x * 1e3 for x in t.latency_rounds),
        throughput_rounds=tuple(timing_batch / x for x in t.batch_rounds),
        options=t.options_name)
  return reports


def report(model: Model, split: Scored, *, disk_bytes: int | None = None,
           timing_batch: int = 256, choose_options: ChooseOptions | None = None
           ) -> Report:
  """`compare` for one model."""
  return compare({"model": model}, split, timing_batch=timing_batch,
                 disk_bytes={"model": disk_bytes} if disk_bytes else None,
                 choose_options=choose_options)["model"]


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
  """A Markdown table of the reports with ratios to `reference`: sizes (on
  disk where known) against the reference's, and against raw fp32 bytes of the
  reference (4 B per value, the convention of INC and the papers)."""
  ref = reports[reference]
  size = lambda r: r.disk_bytes if r.disk_bytes is not None else r.bytes
  lines = ["| model | top-1 % | Δ top-1 pt | params | bytes | size ratio | vs raw fp32 "
           "| MFLOPs/img | latency b=1 ms | speedup b=1 | img/s b=256 | throughput ratio |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in reports.items():
    lines.append(
        f"| {name} | {r.accuracy * 100:.2f} | {(r.accuracy - ref.accuracy) * 100:+.2f} "
        f"| {r.params:,} | {size(r):,} | {size(r) / size(ref):.3f} "
        f"| {size(r) / (4 * ref.params):.3f} | {r.flops / 1e6:.1f} "
        f"| {r.latency_ms:.2f} | {ref.latency_ms / r.latency_ms:.2f}x "
        f"| {r.throughput:.0f} | {r.throughput / ref.throughput:.2f}x |")
  return "\n".join(lines)


def format_report(name: str, r: Report) -> str:
  disk = f"  on disk {r.disk_bytes:,} B" if r.disk_bytes is not None else ""
  return (f"{name}: top-1 {r.accuracy * 100:.2f}%  params {r.params:,}  "
          f"bytes {r.bytes:,}{disk}  MFLOPs/img {r.flops / 1e6:.1f}  "
          f"latency(b=1) {r.latency_ms:.2f} ms  throughput(b=256) {r.throughput:.0f} img/s")
