"""vitjax against PyTorch on this CPU: the same ViT, timed side by side.

    .venv/bin/python benchmarks/peer.py [--shapes deit-tiny,tiny] [--rounds 5]
                                        [--batch 64] [--out FILE.json]

For each shape (`deit-tiny`: DeiT-Ti/16 at 224x224, `deit-s`: DeiT-S/16 at
224x224, `tiny`: the Fashion-MNIST preset), one random model is built in
vitjax and copied into PyTorch (`torch_vit.TorchViT`, timm's block with
`scaled_dot_product_attention`; the script checks that both give the same
logits). Then every variant is timed in alternating rounds in this one
process: each round runs every variant in turn, so drift of the machine hits
all alike. Timed is the whole inference path: uint8 images in, normalize,
forward, argmax.

Variants: PyTorch fp32 (the reference), torch.ao dynamic int8
(`quantize_dynamic` of every Linear), torchao's int8 dynamic-activation
config when torchao is installed; vitjax fp32 compiled with XLA's defaults and
with `evaluate.fastest_options` (the XLA CPU option the survey and CLI use),
and vitjax's int8/int4 variants (`quantization.variants`: weight-only int8
and int4, dynamic int8, static int8, W8A8 at every matmul and at every site),
each run with its fastest option, vitjax's CPU int8 kernel
(`vitjax.kernels.cpu_int8`) among them where it applies. Each variant with
integer matmuls is also timed as "<name> (XLA dots)", the fastest option
without that kernel: the before and after of the kernel, side by side. Where
the kernel has an AMX path, dynamic and static int8 are also timed as
"<name> (AVX-512 VNNI kernel)": the kernel on its previous, VNNI path.

Printed: batch-1 latency and batch-`--batch` time per batch, the median over
rounds and its ratio to PyTorch fp32 with the lowest and highest ratio of a
single round, the two goals of issue 20 (vitjax fp32 / torch fp32 <= 1.0;
best vitjax int8 / torch.ao int8 <= 0.9), and the environment (CPU, thread
counts, versions, XLA_FLAGS). torch is a benchmark/test extra:
`pip install torch==2.13.0` (the CPU build). Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Callable

import jax
import numpy as np
import torch

import quantization
import torch_vit
from vitjax import evaluate, xla_cpu
from vitjax import model as model_lib
from vitjax.kernels import cpu_int8
from vitjax.models.config import ViTConfig, preset
from vitjax.models.inputs import preprocess

SHAPES: dict[str, ViTConfig] = {
    "deit-tiny": ViTConfig(image_size=224, patch_size=16, channels=3, num_classes=1000,
                           dim=192, depth=12, num_heads=3, mlp_dim=768),
    "deit-s": ViTConfig(image_size=224, patch_size=16, channels=3, num_classes=1000,
                        dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "tiny": preset("tiny"),
}
INT8 = ("weight-int8", "dynamic-int8", "static-int8", "w8a8-matmuls", "w8a8-all-sites")
XLA_DOTS = "(XLA dots)"
VNNI_KERNEL = "(AVX-512 VNNI kernel)"


def random_model(cfg: ViTConfig) -> model_lib.Model:
  """A random vitjax model with non-zero class token and head (init leaves
  them zero, which would make every logit equal)."""
  model = model_lib.init(cfg, 0)
  rng = np.random.default_rng(1)
  params = dict(model.params)
  params["cls"] = rng.normal(0, 0.02, np.shape(params["cls"])).astype(np.float32)
  params["head"] = {"kernel": rng.normal(0, 0.02, np.shape(params["head"]["kernel"]))
                    .astype(np.float32), "bias": params["head"]["bias"]}
  return model_lib.Model(cfg, params)


def torch_variants(model: model_lib.Model) -> dict[str, torch.nn.Module]:
  fp32 = torch_vit.TorchViT(model).eval()
  out = {"torch-fp32": fp32,
         # quantize_dynamic returns a quantized copy; fp32 stays as it is
         "torch.ao-int8": torch.ao.quantization.quantize_dynamic(
             fp32, {torch.nn.Linear}, dtype=torch.qint8)}
  try:
    import torchao.quantization as tq
  except ImportError:
    return out
  m = torch_vit.TorchViT(model).eval()
  tq.quantize_(m, tq.Int8DynamicActivationInt8WeightConfig())
  out["torchao-int8"] = m
  return out


def torch_call(module: torch.nn.Module, images: np.ndarray) -> Callable[[], object]:
  x = torch.from_numpy(images)

  def run():
    with torch.inference_mode():
      return module(x)
  return run


def check_parity(model: model_lib.Model, module: torch.nn.Module) -> float:
  """max |logit difference| between vitjax and the torch copy on 4 images."""
  cfg = model.config
  images = np.random.default_rng(2).integers(
      0, 256, (4, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.uint8)
  ours = np.asarray(model_lib.apply(model, preprocess(images, cfg)))
  with torch.inference_mode():
    theirs = module.logits(torch.from_numpy(images)).numpy()
  return float(np.abs(ours - theirs).max())


def measure(shape: str, batch: int, rounds: int, progress: bool = True) -> dict:
  cfg = SHAPES[shape]
  model = random_model(cfg)
  torch_models = torch_variants(model)
  parity = check_parity(model, torch_models["torch-fp32"])
  variants = quantization.variants(model)
  jax_models = {"vitjax-fp32 (xla-default)": model, "vitjax-fp32": variants.pop("fp32")}
  amx = cpu_int8.fast_here() and cpu_int8.isa() == "amx"
  for name, m in variants.items():
    jax_models[name] = m
    if model_lib.cpu_int8_layers(m):
      jax_models[f"{name} {XLA_DOTS}"] = m
      if amx and name in ("dynamic-int8", "static-int8"):
        jax_models[f"{name} {VNNI_KERNEL}"] = m
  on_vnni = {**xla_cpu.CANDIDATES["xla-default"], evaluate.CPU_INT8_KERNEL: "avx512-vnni"}
  result = {"config": cfg.to_dict(), "parity_max_abs_logit_diff": parity, "batches": {}}
  for b, calls in ((1, 10), (batch, 1)):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (b, cfg.image_size, cfg.image_size, cfg.channels)
                          ).astype(np.uint8)
    options = {name: ({} if name.endswith("(xla-default)") else on_vnni
                      if name.endswith(VNNI_KERNEL) else
                      evaluate.fastest_options(m, b, int8_kernel=not name.endswith(XLA_DOTS)))
               for name, m in jax_models.items()}
    fns = {name: torch_call(m, images) for name, m in torch_models.items()}
    fns.update({name: evaluate.forward_fn(m, b, options[name])
                for name, m in jax_models.items()})
    if progress:
      print(f"{shape}: timing {len(fns)} variants at batch {b}, {rounds} rounds",
            file=sys.stderr, flush=True)
    times = evaluate.round_robin(fns, rounds=rounds, calls=calls, warmup=2)
    ref = times["torch-fp32"]
    rows = {}
    for name, t in times.items():
      lo, med, hi = evaluate.ratio_spread(t, ref)
      rows[name] = {"ms": statistics.median(t) * 1e3, "ratio": med, "ratio_min": lo,
                    "ratio_max": hi, "rounds_ms": [x * 1e3 for x in t],
                    "options": evaluate.options_name(options[name])
                    if name in options else "torch"}
    result["batches"][b] = rows
  return result


def goals(result: dict) -> list[str]:
  """The issue's two goals, as ratios of medians, one line per batch size."""
  lines = []
  for b, rows in result["batches"].items():
    fp = rows["vitjax-fp32"]["ms"] / rows["torch-fp32"]["ms"]
    best = min(INT8, key=lambda n: rows[n]["ms"])
    q = rows[best]["ms"] / rows["torch.ao-int8"]["ms"]
    xla = [n for n in rows if n.endswith(XLA_DOTS)]
    before = min(xla, key=lambda n: rows[n]["ms"]) if xla else None
    lines.append(f"batch {b}: vitjax fp32 / torch fp32 = {fp:.2f} (goal <= 1.0, "
                 f"{'met' if fp <= 1.0 else 'MISSED'}); best vitjax int8 ({best}, "
                 f"{rows[best]['options']}) / torch.ao int8 = {q:.2f} (goal <= 0.9, "
                 f"{'met' if q <= 0.9 else 'MISSED'})" + (
                     f"; without vitjax's int8 kernel: {before} "
                     f"{rows[before]['ms'] / rows['torch.ao-int8']['ms']:.2f}" if before else ""))
  return lines


def environment() -> dict:
  try:
    kernel = cpu_int8.isa()
  except cpu_int8.KernelUnavailable as e:
    kernel = f"unavailable: {e}"
  return {"cpu": xla_cpu.cpu_description(), "jax": jax.__version__,
          "vitjax_cpu_int8_kernel": kernel,
          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
          "jax_devices": len(jax.devices()), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          "date": time.strftime("%Y-%m-%d %H:%M")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="deit-tiny,tiny",
                      help=f"comma-separated, from {sorted(SHAPES)}")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--out", default=None, help="also write the figures as JSON")
  args = parser.parse_args()
  shapes = args.shapes.split(",")
  unknown = sorted(set(shapes) - set(SHAPES))
  if unknown:
    parser.error(f"--shapes: unknown {unknown}; choose from {sorted(SHAPES)}")
  env = environment()
  print("environment: " + json.dumps(env))
  results = {}
  for shape in shapes:
    r = results[shape] = measure(shape, args.batch, args.rounds)
    cfg = SHAPES[shape]
    print(f"\n### {shape}: {cfg.image_size}x{cfg.image_size}, patch {cfg.patch_size}, "
          f"dim {cfg.dim}, depth {cfg.depth}, {cfg.num_heads} heads "
          f"(vitjax vs torch logits: max |diff| {r['parity_max_abs_logit_diff']:.1e})\n")
    b1, bn = r["batches"][1], r["batches"][args.batch]
    print(f"| variant | option b=1 / b={args.batch} | b=1 ms | time / torch fp32 (min-max) "
          f"| b={args.batch} ms | time / torch fp32 (min-max) | img/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in b1:
      x, y = b1[name], bn[name]
      print(f"| {name} | {x['options']} / {y['options']} | {x['ms']:.1f} "
            f"| {x['ratio']:.2f} ({x['ratio_min']:.2f}-{x['ratio_max']:.2f}) "
            f"| {y['ms']:.0f} | {y['ratio']:.2f} ({y['ratio_min']:.2f}-{y['ratio_max']:.2f}) "
            f"| {args.batch / y['ms'] * 1e3:.0f} |")
    print()
    for line in goals(r):
      print(line)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({"environment": env, "shapes": results},
                                                 indent=1))


if __name__ == "__main__":
  main()
