"""Where the time of one vitjax inference goes, per kind of XLA op.

    .venv/bin/python benchmarks/profile_ops.py [--variant static-int8] [--batch 1]
                                               [--options xla-default] [--calls 10]

Builds DeiT-Ti/16 at 224x224 (random weights; `peer.SHAPES["deit-tiny"]`),
quantizes it as `--variant` names (`quantization.variants`), compiles the
inference path with the `--options` candidate (`vitjax.xla_cpu.CANDIDATES`,
or `evaluate.KERNEL_CANDIDATE`: integer matmuls on vitjax's CPU int8 kernel),
traces `--calls` calls with `jax.profiler`, and sums the traced time of every
compiled op by kind: YNNPACK fusion or XLA's own op (dot, loop fusion), its
output dtype, and what it computes (a dot, attention = dot + softmax + dot,
LayerNorm, GELU, quantize). Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import numpy as np

import peer
import quantization
from vitjax import evaluate, xla_cpu


def op_kinds(hlo: str) -> dict[str, str]:
  """Instruction name -> kind, for every instruction of the entry computation."""
  comps: dict[str, list[str]] = {}
  cur = None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?(\S+) .*\{$", line)
    if head and "(" in line:
      cur = head.group(1)
      comps[cur] = []
    elif cur and line.strip() != "}":
      comps[cur].append(line)
  entry = next(k for k in comps if k.startswith("main"))
  kinds = {}
  for line in comps[entry]:
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[\S* (\w+)\(", line)
    if not m:
      continue
    name, dtype, op = m.groups()
    if op == "custom-call" and "vitjax_cpu_int8" in line:
      kinds[name] = f"vitjax int8 kernel {dtype}"
      continue
    if op != "fusion":
      kinds[name] = f"xla {op} {dtype}"
      continue
    callee = re.search(r"calls=%?([\w.\-]+)", line)
    ops = [o.group(1) for o in (re.search(r"= \S+ (\w+)\(", x)
                                for x in comps.get(callee.group(1) if callee else "", []))
           if o]
    what = ("attention" if ops.count("dot") >= 2 and "exponential" in ops else
            "dot" if "dot" in ops else "layernorm" if "rsqrt" in ops else
            "gelu" if "tanh" in ops else
            "quantize" if "round-nearest-even" in ops or dtype == "s8" else "elementwise")
    library = "ynnpack" if "ynn_fusion" in line else "xla"
    kinds[name] = f"{library} {what} {dtype}"
  return kinds


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="static-int8")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--options", default="xla-default",
                      choices=sorted(xla_cpu.CANDIDATES) + [evaluate.KERNEL_CANDIDATE])
  parser.add_argument("--calls", type=int, default=10)
  args = parser.parse_args()
  model = peer.random_model(peer.SHAPES["deit-tiny"])
  try:
    model = quantization.variants(model, [args.variant])[args.variant]
  except ValueError as e:
    parser.error(f"--variant: {e}")
  options = (evaluate.kernel_candidate() if args.options == evaluate.KERNEL_CANDIDATE
             else xla_cpu.CANDIDATES[args.options])
  model, options = evaluate.prepared(model, options)
  cfg = model.config
  images = np.random.default_rng(0).integers(
      0, 256, (args.batch, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.uint8)
  predict = evaluate.predictor(options)
  kinds = op_kinds(predict.lower(model, images).compile().as_text())
  for _ in range(3):
    jax.block_until_ready(predict(model, images))
  t = time.perf_counter()
  for _ in range(args.calls):
    jax.block_until_ready(predict(model, images))
  wall = (time.perf_counter() - t) / args.calls
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(args.calls):
        jax.block_until_ready(predict(model, images))
    trace = json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e["name"] in kinds:
      total[kinds[e["name"]]] += e["dur"] / 1e3 / args.calls
      count[kinds[e["name"]]] += 1
  print(f"{args.variant}, batch {args.batch}, {args.options}: {wall * 1e3:.1f} ms per call "
        f"untraced; traced ops per call:")
  for kind, ms in total.most_common():
    print(f"  {ms:8.2f} ms  {count[kind] // args.calls:4d} ops  {kind}")
  print(f"  {sum(total.values()):8.2f} ms  in all (the rest: runtime between ops)")


if __name__ == "__main__":
  main()
