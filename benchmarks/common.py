"""Shared driver of the speed benchmarks: load or build a model, time every
variant round-robin in one process, print ratios to the first variant."""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
from typing import Callable

import jax

from vitjax import evaluate, export, recipes
from vitjax import model as model_lib
from vitjax.models.config import PRESETS, preset

Variants = Callable[[model_lib.Model], dict[str, model_lib.Model]]


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
  lat = evaluate.side_by_side(models, 1, rounds=args.rounds, calls=20)
  thr = evaluate.side_by_side(models, args.batch, rounds=args.rounds, calls=2)
  device = f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {platform.machine()}"
  cfg = model.config
  print(f"device: {device}; model: dim {cfg.dim}, depth {cfg.depth}, patch {cfg.patch_size}, "
        f"image {cfg.image_size}")
  print(f"| variant | bytes | params | MFLOPs/img | latency b=1 ms | speedup "
        f"| img/s b={args.batch} | throughput ratio |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  rows = {}
  for name, m in models.items():
    rows[name] = {"bytes": model_lib.stored_bytes(m), "params": model_lib.param_count(m),
                  "mflops": model_lib.flops_per_image(m) / 1e6,
                  "latency_ms": lat[name] * 1e3, "speedup": lat[ref] / lat[name],
                  "throughput": args.batch / thr[name],
                  "throughput_ratio": thr[ref] / thr[name]}
    r = rows[name]
    print(f"| {name} | {r['bytes']:,} | {r['params']:,} | {r['mflops']:.1f} "
          f"| {r['latency_ms']:.3f} | {r['speedup']:.2f}x | {r['throughput']:.0f} "
          f"| {r['throughput_ratio']:.2f}x |")
  for name, r in rows.items():
    if name == ref:
      continue
    note = evaluate.slowdown_note(name, ref, 1 / r["speedup"], r["throughput_ratio"])
    if note:
      print(note)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({"device": device, "rows": rows}, indent=1))
  return rows
