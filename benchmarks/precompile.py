"""How long the survey's measure stage spends compiling, with 1 and with 2
compile threads (`vitjax.evaluate.precompile`).

Loads every model of a survey directory, then compiles each one's inference
at batch 1 and 256 with both XLA CPU candidates (what `fastest_options`
tries), once with one worker and once, in a fresh process, with two. Each
run is a fresh process with the persistent compilation cache off, so neither
reuses the other's executables; the order alternates over the rounds.

usage: python benchmarks/precompile.py [SURVEY_DIR] [--rounds N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

WORKER = """
import json, pathlib, sys, time
from vitjax import evaluate, export, recipes, xla_cpu
root, workers = pathlib.Path(sys.argv[1]), int(sys.argv[2])
models = {p.name: export.load_model(p / recipes.MODEL_DIR)
          for p in sorted(root.iterdir()) if (p / recipes.MODEL_DIR).is_dir()}
t = time.perf_counter()
jobs = evaluate.precompile(models, (1, 256), list(xla_cpu.CANDIDATES.values()),
                           workers=workers)
print(json.dumps({"seconds": time.perf_counter() - t, "jobs": jobs, "models": len(models)}))
"""


def run(root: pathlib.Path, workers: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  done = subprocess.run([sys.executable, "-c", WORKER, str(root), str(workers)], env=env,
                        capture_output=True, text=True, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("survey_dir", nargs="?", default="checkpoints/survey")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  root = pathlib.Path(args.survey_dir)
  times: dict[int, list[float]] = {1: [], 2: []}
  info = {}
  started = time.perf_counter()
  for r in range(args.rounds):
    for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
      info = run(root, workers)
      times[workers].append(info["seconds"])
      print(f"round {r + 1}: {workers} worker(s): {info['seconds']:.1f} s "
            f"({info['jobs']} compiles of {info['models']} models)", flush=True)
  one, two = statistics.median(times[1]), statistics.median(times[2])
  print(f"median: 1 worker {one:.1f} s, 2 workers {two:.1f} s: {one / two:.2f}x "
        f"(rounds {[round(a / b, 2) for a, b in zip(times[1], times[2])]}); "
        f"{time.perf_counter() - started:.0f} s in all")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(
        {"seconds": times, "models": info["models"], "jobs": info["jobs"],
         "speedup": one / two}, indent=1) + "\n")


if __name__ == "__main__":
  main()
