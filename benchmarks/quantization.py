"""Latency and throughput of fp32 vs every quantized variant, side by side.

    .venv/bin/python benchmarks/quantization.py [--checkpoint checkpoints/teacher]
                                               [--preset tiny] [--out FILE.json]

Uses the trained checkpoint if given (accuracy is not measured here; speed does
not depend on the weights' values), else a random model of the preset. All
variants are timed round-robin in one process (`evaluate.side_by_side`), and
the ratios to fp32 are printed; a variant slower than fp32 is said to be.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform

import jax
import numpy as np

from vitjax import evaluate, export, recipes
from vitjax import model as model_lib
from vitjax.models.config import PRESETS, preset
from vitjax.transforms import quantize


def variants(model: model_lib.Model) -> dict[str, model_lib.Model]:
  cfg = model.config
  calib = np.random.default_rng(0).integers(
      0, 256, (256, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.uint8)
  return {
      "fp32": model,
      "weight-int8": quantize.weight_only(8)(model),
      "weight-int4": quantize.weight_only(4)(model),
      "dynamic-int8": quantize.dynamic_int8()(model),
      "static-int8": quantize.static_int8(calib, progress=False)(model),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default=None)
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
  lat = evaluate.side_by_side(models, 1, rounds=args.rounds, calls=20)
  thr = evaluate.side_by_side(models, args.batch, rounds=args.rounds, calls=2)
  device = f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {platform.machine()}"
  print(f"device: {device}; model: {model.config.dim}-dim, depth {model.config.depth}, "
        f"patch {model.config.patch_size}")
  print(f"| variant | bytes | latency b=1 ms | speedup | img/s b={args.batch} | ratio |")
  print("|---|---:|---:|---:|---:|---:|")
  rows = {}
  for name, m in models.items():
    rows[name] = {"bytes": model_lib.stored_bytes(m), "latency_ms": lat[name] * 1e3,
                  "latency_speedup": lat["fp32"] / lat[name],
                  "throughput": args.batch / thr[name],
                  "throughput_ratio": thr["fp32"] / thr[name]}
    r = rows[name]
    print(f"| {name} | {r['bytes']:,} | {r['latency_ms']:.3f} | {r['latency_speedup']:.2f}x "
          f"| {r['throughput']:.0f} | {r['throughput_ratio']:.2f}x |")
  for name, r in rows.items():
    if name != "fp32" and (r["latency_speedup"] < 0.95 or r["throughput_ratio"] < 0.95):
      print(f"note: {name} is SLOWER than fp32 on this {jax.default_backend()} backend "
            f"(latency x{1 / r['latency_speedup']:.2f}, throughput x{r['throughput_ratio']:.2f});"
            " its gain here is size only.")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({"device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
