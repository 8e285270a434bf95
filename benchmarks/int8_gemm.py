"""The int8 matrix multiply itself: XLA's kernels against PyTorch's, per layer.

    .venv/bin/python benchmarks/int8_gemm.py [--shapes deit-tiny] [--rounds 7]
                                             [--out FILE.json]

`benchmarks/peer.py` times whole models; this script isolates what decides
the int8 rows there, the matmul of one linear layer. For each linear layer
shape of a DeiT (q/k/v/out dim x dim, fc1 dim x 4dim, fc2 4dim x dim) at the
rows of one image (197 tokens) and of a 64-image batch, it times side by
side, in alternating rounds in this one process:

- `xla-f32`, `xla-f32-ynn-off`: a float32 matmul compiled with XLA's
  defaults (YNNPACK) and with YNNPACK fusions off (XLA's own dot);
- `xla-s8`: int8 x int8 -> int32, what vitjax's integer layers hand to XLA
  (AQT's dot_general), inputs already int8;
- `xla-s8-ynn-off`: the same with YNNPACK fusions off (XLA's own dot);
- `xla-u8s8`: unsigned x signed int8 -> int32, the operand form of VNNI's
  `vpdpbusd` and of fbgemm (activations with a zero point);
- `xla-s8-as-bf16`: the same integer product computed exactly on bfloat16
  operands with float32 accumulation (int8 values and their products are
  exact there while k * 127^2 < 2^24; checked against `xla-s8`);
- `vitjax-int8`: vitjax's own CPU int8 kernel (`vitjax.kernels.cpu_int8`,
  an XLA FFI custom call; weight packed once, as `use_cpu_int8_kernel`
  does) on its fastest code path here (`cpu_int8.isa()`), checked equal to
  `xla-s8`; left out where it cannot be built;
- `vitjax-int8-avx512-vnni`: the same kernel on its AVX-512 VNNI path, where
  a faster path (AMX) exists: the before and after of that path;
- `torch-f32`: `torch.nn.functional.linear`;
- `torch.ao-s8`: `torch.ao.nn.quantized.Linear` (fbgemm) on an input already
  quantized to quint8, its output requantized: the int8 kernel of torch.ao;
- `torch.ao-dynamic`: `torch.ao.nn.quantized.dynamic.Linear` on a float
  input (quantized per call), what `quantize_dynamic` models run.

Printed per shape: milliseconds per call (median over rounds, lowest-highest
round) and multiply-accumulates per second. torch is a benchmark/test extra:
`pip install torch==2.13.0` (CPU build). Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

import peer
from vitjax import evaluate, xla_cpu
from vitjax.kernels import cpu_int8

TOKENS = 197  # a 224x224 image in 16x16 patches, plus the class token
BATCHES = (1, 64)


def layer_shapes(dim: int, mlp_dim: int) -> dict[str, tuple[int, int]]:
  """(in, out) of each distinct linear layer shape of a DeiT block."""
  return {"attn (q/k/v/out)": (dim, dim), "fc1": (dim, mlp_dim), "fc2": (mlp_dim, dim)}


def jax_kernels(x: np.ndarray, w: np.ndarray) -> dict[str, Callable[[], object]]:
  """The XLA kernels on int8 codes `x` (rows, in) and `w` (in, out)."""
  xs, ws = jnp.asarray(x, jnp.int8), jnp.asarray(w, jnp.int8)
  xu = jnp.asarray(x.astype(np.int16) + 128, jnp.uint8)
  xf, wf = xs.astype(jnp.float32), ws.astype(jnp.float32)
  xb, wb = xs.astype(jnp.bfloat16), ws.astype(jnp.bfloat16)
  ynn_off = xla_cpu.options_for("ynn-off", jax.default_backend())
  f32 = jax.jit(lambda a, b: a @ b)
  f32_off = jax.jit(lambda a, b: a @ b, compiler_options=ynn_off)
  s8 = jax.jit(lambda a, b: lax.dot(a, b, preferred_element_type=jnp.int32))
  s8_off = jax.jit(lambda a, b: lax.dot(a, b, preferred_element_type=jnp.int32),
                   compiler_options=ynn_off)
  bf16 = jax.jit(lambda a, b: lax.dot(a, b, preferred_element_type=jnp.float32))
  exact = np.asarray(s8(xs, ws))
  if not np.array_equal(np.asarray(bf16(xb, wb)).astype(np.int64), exact):
    raise AssertionError("the bfloat16 product of int8 codes is not the int32 product")
  kernels = {"xla-f32": lambda: f32(xf, wf), "xla-f32-ynn-off": lambda: f32_off(xf, wf),
             "xla-s8": lambda: s8(xs, ws), "xla-s8-ynn-off": lambda: s8_off(xs, ws),
             "xla-u8s8": lambda: s8(xu, ws), "xla-s8-as-bf16": lambda: bf16(xb, wb)}
  try:
    cpu_int8.isa()
  except cpu_int8.KernelUnavailable:
    return kernels
  n_out = w.shape[1]
  ours = jax.jit(cpu_int8.matmul, static_argnums=2)
  fastest = cpu_int8.isa()
  paths = {"vitjax-int8": None}
  if fastest == "amx":
    paths["vitjax-int8-avx512-vnni"] = "avx512-vnni"
  for name, path in paths.items():
    packed = cpu_int8.pack(ws, path)
    if not np.array_equal(np.asarray(ours(xs, packed, n_out)), exact):
      raise AssertionError(f"vitjax's int8 kernel ({path or fastest}) does not give the "
                           "int32 product")
    kernels[name] = functools.partial(ours, xs, packed, n_out)
  return kernels


def torch_kernels(x: np.ndarray, w: np.ndarray) -> dict[str, Callable[[], object]]:
  """The PyTorch kernels on the same codes (float input = codes x 0.05)."""
  n_in, n_out = w.shape
  xf = torch.from_numpy(x.astype(np.float32) * 0.05)
  wf = torch.from_numpy(np.ascontiguousarray(w.T).astype(np.float32) * 0.01)
  bias = torch.zeros(n_out)
  static = torch.ao.nn.quantized.Linear(n_in, n_out)
  static.set_weight_bias(torch.quantize_per_tensor(wf, 0.01, 0, torch.qint8), bias)
  static.scale, static.zero_point = 1.0, 64
  xq = torch.quantize_per_tensor(xf, 0.05, 128, torch.quint8)
  dynamic = torch.ao.nn.quantized.dynamic.Linear(n_in, n_out)
  dynamic.set_weight_bias(torch.quantize_per_tensor(wf, 0.01, 0, torch.qint8), bias)

  def run(f):
    def call():
      with torch.inference_mode():
        return f()
    return call

  return {"torch-f32": run(lambda: torch.nn.functional.linear(xf, wf, bias)),
          "torch.ao-s8": run(lambda: static(xq)),
          "torch.ao-dynamic": run(lambda: dynamic(xf))}


def measure(dim: int, mlp_dim: int, rounds: int) -> dict:
  rng = np.random.default_rng(0)
  result = {}
  for batch in BATCHES:
    rows = TOKENS * batch
    for layer, (n_in, n_out) in layer_shapes(dim, mlp_dim).items():
      x = rng.integers(-127, 128, (rows, n_in)).astype(np.int8)
      w = rng.integers(-127, 128, (n_in, n_out)).astype(np.int8)
      kernels = {**jax_kernels(x, w), **torch_kernels(x, w)}
      times = evaluate.round_robin(kernels, rounds=rounds, calls=20 if batch == 1 else 2,
                                   warmup=1)
      macs = rows * n_in * n_out
      result[f"b={batch} {layer}"] = {
          name: {"ms": statistics.median(t) * 1e3, "ms_min": min(t) * 1e3,
                 "ms_max": max(t) * 1e3, "gmacs": macs / statistics.median(t) / 1e9}
          for name, t in times.items()}
      print(f"{batch=} {layer}: rows {rows}, {n_in} -> {n_out}", flush=True)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="deit-tiny",
                      help="comma-separated, from ['deit-s', 'deit-tiny']")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--out", default=None, help="also write the figures as JSON")
  args = parser.parse_args()
  shapes = args.shapes.split(",")
  unknown = sorted(set(shapes) - {"deit-tiny", "deit-s"})
  if unknown:
    parser.error(f"--shapes: unknown {unknown}; choose from ['deit-s', 'deit-tiny']")
  if args.rounds < 1:
    parser.error(f"--rounds must be >= 1, got {args.rounds}")
  env = peer.environment()
  print("environment: " + json.dumps(env))
  results = {}
  for shape in shapes:
    cfg = peer.SHAPES[shape]
    results[shape] = measure(cfg.dim, cfg.mlp_dim, args.rounds)
    names = list(next(iter(results[shape].values())))
    print(f"\n### {shape}: ms per call, median of {args.rounds} rounds (lowest-highest), "
          "and GMAC/s\n")
    print("| layer, rows | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for key, row in results[shape].items():
      print(f"| {key} | " + " | ".join(
          f"{r['ms']:.3g} ({r['ms_min']:.3g}-{r['ms_max']:.3g}); {r['gmacs']:.0f}"
          for r in row.values()) + " |")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({"environment": env, "shapes": results},
                                                 indent=1))


if __name__ == "__main__":
  main()
