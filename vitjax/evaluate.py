"""Accuracy, size, latency and throughput of any `Model`, measured.

Timings compile first, warm up, then time repeated calls that end in
`block_until_ready`, round-robin over the models compared, and report the
median; numbers measured in one process side by side are comparable, numbers
from different runs less so.

Every function takes optional `options`: XLA compiler options (`jax.jit`'s
`compiler_options`, e.g. from `fastest_options`), plus vitjax's own
`CPU_INT8_KERNEL` entry, which runs the model's integer matmuls on vitjax's
CPU int8 kernel (`model.use_cpu_int8_kernel`, applied once per call of these
functions, not per batch); without options XLA's defaults apply. One
executable is compiled per distinct options, model structure and batch
shape, and reused across calls.
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
from vitjax.kernels import cpu_int8
from vitjax.model import Model
from vitjax.models.inputs import preprocess


Options = Mapping[str, str]

# The options entry that puts a model's integer matmuls on vitjax's CPU int8
# kernel (vitjax.kernels.cpu_int8); its value is "on" (the kernel's fastest
# code path here) or a code path by name (`cpu_int8.ISAS`).
CPU_INT8_KERNEL = "vitjax_cpu_int8_kernel"
# `fastest_options`' candidate with that kernel: XLA's defaults plus the kernel
# (with YNNPACK fusions off the kernel's models were slower: 17.4 against
# 15.5 ms at batch 1 and 626 against 552 ms at batch 64, DeiT-tiny static int8).
KERNEL_CANDIDATE = "xla-default+cpu-int8"


def prepared(model: Model, options: Options | None) -> tuple[Model, dict[str, str]]:
  """(`model`, XLA compiler options) for `options`: with `CPU_INT8_KERNEL`
  "on", the model on vitjax's CPU int8 kernel (`model.use_cpu_int8_kernel`);
  with a code path's name (`cpu_int8.ISAS`), on that path.

  Raises:
    ValueError: `CPU_INT8_KERNEL` is neither "on" nor a code path of this
      CPU, or the model has no integer matmul for the kernel.
    KernelUnavailable: the kernel cannot run here.
  """
  xla = dict(options or {})
  kernel = xla.pop(CPU_INT8_KERNEL, None)
  if kernel is None:
    return model, xla
  if kernel != "on" and kernel not in cpu_int8.ISAS:
    raise ValueError(f"options[{CPU_INT8_KERNEL!r}]={kernel!r}; allowed are 'on' (the "
                     f"kernel's fastest code path) or one of {list(cpu_int8.ISAS)} (leave the "
                     "entry out for XLA's own dots)")
  return model_lib.use_cpu_int8_kernel(model, None if kernel == "on" else kernel), xla


def _forward(model: Model, images: jax.Array) -> jax.Array:
  return model_lib.apply(model, preprocess(images, model.config)).argmax(-1)


@functools.lru_cache(maxsize=None)
def _predictor(options: tuple[tuple[str, str], ...]) -> Callable:
  return jax.jit(_forward, compiler_options=dict(options) or None)


def predictor(options: Options | None = None) -> Callable[[Model, jax.Array], jax.Array]:
  """The jitted inference path (normalize, forward, argmax), compiled with XLA
  compiler `options`: `predictor(options)(model, uint8_images)` -> predicted
  classes.

  Raises:
    ValueError: `options` hold `CPU_INT8_KERNEL` (a model choice: pass the
      model through `prepared` first).
  """
  if CPU_INT8_KERNEL in (options or {}):
    raise ValueError(f"predictor takes XLA compiler options; {CPU_INT8_KERNEL!r} chooses "
                     "the model's matmul kernel: use evaluate.prepared(model, options) and "
                     "pass the options it returns")
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
  model, xla = prepared(model, options)
  predict = predictor(xla)
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
  model, xla = prepared(model, options)
  predict = predictor(xla)
  return lambda: predict(model, images)


def precompile(models: Mapping[str, Model], batches: Sequence[int],
               options: Sequence[Options] | Callable[[Model], Sequence[Options]] = ({},), *,
               workers: int = 2) -> int:
  """Compiles every model's inference (`forward_fn`) at every batch size with
  every `options` (or every `options(model)`, per model), `workers` compiles
  at a time, and runs each once; returns how many (model, batch, options)
  jobs ran.

  XLA compiles on a single thread, so on a CPU host compiles in parallel
  threads keep the other cores busy; jit keeps each executable for the later
  calls of `accuracy`, `round_times` and `fastest_options`.

  Raises:
    ValueError: `workers` is not positive.
  """
  if workers < 1:
    raise ValueError(f"workers={workers} must be >= 1")
  per_model = options if callable(options) else (lambda _: options)
  jobs = [(m, b, o) for m in models.values() for b in batches for o in per_model(m)]
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


def options_name(options: Options) -> str:
  """The candidate name of `options` (`KERNEL_CANDIDATE`, that candidate on a
  named code path of the kernel as "xla-default+cpu-int8[avx512-vnni]", or
  one of `xla_cpu.CANDIDATES`), else "given"."""
  path = dict(options).get(CPU_INT8_KERNEL)
  if path is not None and {**options, CPU_INT8_KERNEL: "on"} == kernel_candidate():
    return KERNEL_CANDIDATE if path == "on" else f"{KERNEL_CANDIDATE}[{path}]"
  try:
    return xla_cpu.candidate_name(options)
  except ValueError:
    return "given"


def kernel_candidate() -> dict[str, str]:
  """The options of `KERNEL_CANDIDATE`: XLA's defaults, integer matmuls on
  vitjax's CPU int8 kernel."""
  return {**xla_cpu.CANDIDATES["xla-default"], CPU_INT8_KERNEL: "on"}


def candidates(model: Model, *, int8_kernel: bool = True) -> dict[str, dict[str, str]]:
  """What `fastest_options` compares for `model` on this backend, by name.

  On the CPU, `xla_cpu.CANDIDATES`; but a model with integer matmuls, where
  vitjax's CPU int8 kernel has its fast path (`cpu_int8.fast_here`) and
  `int8_kernel` is True, compares XLA's defaults with `KERNEL_CANDIDATE`:
  YNNPACK off takes XLA's int8 dots off YNNPACK too, which made DeiT-tiny
  static int8 2.2x slower at batch 1 and 2.7x at batch 64 on the 2-core EPYC,
  so that candidate only costs compiles there. On a GPU or TPU backend, XLA's
  defaults alone.
  """
  if jax.default_backend() != "cpu":
    return {"xla-default": {}}
  if int8_kernel and model_lib.cpu_int8_layers(model) and cpu_int8.fast_here():
    return {"xla-default": dict(xla_cpu.CANDIDATES["xla-default"]),
            KERNEL_CANDIDATE: kernel_candidate()}
  return {name: dict(o) for name, o in xla_cpu.CANDIDATES.items()}


def fastest_options(model: Model, batch: int, *, calls: int = 3,
                    int8_kernel: bool = True) -> dict[str, str]:
  """Options of the fastest of `candidates(model, int8_kernel=...)` for
  `model`'s inference at `batch` images on this machine: each candidate's
  forward is compiled and warmed up once, then the candidates are timed in
  alternation over `calls` rounds and the lower total wins. On a GPU or TPU
  backend, {} (the candidates are CPU options).

  Raises:
    ValueError: `batch` or `calls` is not positive.
  """
  if batch < 1 or calls < 1:
    raise ValueError(f"batch={batch} and calls={calls} must both be >= 1")
  if jax.default_backend() != "cpu":
    return {}
  named = candidates(model, int8_kernel=int8_kernel)
  totals = {name: sum(t) for name, t in round_times(
      {name: model for name in named}, batch, rounds=calls, calls=1,
      options=named, warmup=1).items()}
  return dict(named[min(totals, key=totals.get)])


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
    return (f"{options_name(self.latency_options)} (b=1), "
            f"{options_name(self.batch_options)} (b={self.batch})")


def speeds(models: dict[str, Model], *, timing_batch: int = 256, rounds: int = 5,
           choose_options: ChooseOptions | None = None) -> dict[str, Speed]:
  """Batch-1 latency and batch-`timing_batch` time of every model, measured
  side by side in this process (`round_times`: 10 and 2 calls per round).

  `choose_options(model, batch)` (e.g. `fastest_options`) picks each model's
  options per batch size; None: XLA's defaults. Every executable is compiled
  ahead in parallel (`precompile`): with a chooser, one per entry of
  `candidates(model)` (what `fastest_options` tries).
  """
  choose = choose_options or (lambda model, batch: {})
  tried = (lambda m: list(candidates(m).values())) if choose_options is not None else [{}]
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
