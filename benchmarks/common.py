"""Shared driver of the speed benchmarks: load or build a model, time every
variant round-robin in one process, print ratios to the first variant."""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time
from typing import Callable

import jax
import numpy as np

from vitjax import data as data_lib
from vitjax import evaluate, export, recipes, train
from vitjax import model as model_lib
from vitjax.models.config import PRESETS, preset

Variants = Callable[[model_lib.Model], dict[str, model_lib.Model]]


def step_ms(config, split: data_lib.Split, cfg: train.TrainConfig) -> float:
  """Median ms per step of `train.fit` over steps 20..cfg.steps (compile and
  warm-up excluded); `cfg.log_every` must be 1."""
  if cfg.log_every != 1:
    raise ValueError(f"step_ms times every step: log_every must be 1, got {cfg.log_every}")
  marks: dict[int, float] = {}
  train.fit(model_lib.init(config, 0), split, cfg, progress=False,
            on_step=lambda s, _: marks.setdefault(s, time.perf_counter()))
  steps = sorted(marks)
  return float(np.median(np.diff([marks[s] for s in steps if s >= 20]))) * 1e3


def _spread(ref: list[float], other: list[float]) -> tuple[float, float]:
  lo, _, hi = evaluate.ratio_spread(ref, other)
  return lo, hi


def main(variants: Variants, description: str) -> dict:
  """Parses --checkpoint/--preset/--batch/--rounds/--out, measures, prints, returns rows."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--checkpoint", default=None,
                      help="a trained run or model directory (default: a random model; "
                           "speed does not depend on the weights' values)")
  parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--out", default=None, help="also write the figures as JSON")
  args = parser.parse_args()
  if args.checkpoint:
    model = export.load_model(recipes.model_dir_of(args.checkpoint))
  else:
    model = model_lib.init(preset(args.preset, num_classes=10), 0)
  models = variants(model)
  ref = next(iter(models))
  lat_rounds = evaluate.round_times(models, 1, rounds=args.rounds, calls=20)
  thr_rounds = evaluate.round_times(models, args.batch, rounds=args.rounds, calls=2)
  lat = {k: statistics.median(v) for k, v in lat_rounds.items()}
  thr = {k: statistics.median(v) for k, v in thr_rounds.items()}
  device = f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {platform.machine()}"
  cfg = model.config
  print(f"device: {device}; model: dim {cfg.dim}, depth {cfg.depth}, patch {cfg.patch_size}, "
        f"image {cfg.image_size}")
  print(f"| variant | bytes | params | MFLOPs/img | latency b=1 ms | speedup (min-max) "
        f"| img/s b={args.batch} | throughput ratio (min-max) |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  rows = {}
  for name, m in models.items():
    rows[name] = {"bytes": model_lib.stored_bytes(m), "params": model_lib.param_count(m),
                  "mflops": model_lib.flops_per_image(m) / 1e6,
                  "latency_ms": lat[name] * 1e3, "speedup": lat[ref] / lat[name],
                  "throughput": args.batch / thr[name],
                  "throughput_ratio": thr[ref] / thr[name],
                  "speedup_spread": _spread(lat_rounds[ref], lat_rounds[name]),
                  "throughput_ratio_spread": _spread(thr_rounds[ref], thr_rounds[name])}
    r = rows[name]
    (s_lo, s_hi), (t_lo, t_hi) = r["speedup_spread"], r["throughput_ratio_spread"]
    print(f"| {name} | {r['bytes']:,} | {r['params']:,} | {r['mflops']:.1f} "
          f"| {r['latency_ms']:.3f} | {r['speedup']:.2f}x ({s_lo:.2f}-{s_hi:.2f}) "
          f"| {r['throughput']:.0f} | {r['throughput_ratio']:.2f}x ({t_lo:.2f}-{t_hi:.2f}) |")
  for name, r in rows.items():
    if name == ref:
      continue
    note = evaluate.slowdown_note(name, ref, 1 / r["speedup"], r["throughput_ratio"])
    if note:
      print(note)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({"device": device, "rows": rows}, indent=1))
  return rows
