"""The survey's speed columns again, on the survey's saved checkpoints.

    .venv/bin/python benchmarks/survey_speed.py [--survey-dir checkpoints/survey]
                                                [--rounds 9] [--out FILE.json]

Loads the teacher and every method's checkpoint that `vitjax survey` wrote,
and measures them exactly as the survey does (`evaluate.speeds`: each model
run with `evaluate.fastest_options`, batch-1 latency and batch-256
throughput timed round-robin in this one process, 9 rounds), without the
accuracy pass. Run it several times in a row to see how stable the survey's
ratios are on a machine: each run prints every ratio to the teacher as the
median over rounds with the lowest and highest single-round ratio, and the
best combination's throughput ratio. Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

from vitjax import evaluate, export, recipes, xla_cpu
from vitjax.survey import METHODS


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--survey-dir", default="checkpoints/survey")
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--out", default=None, help="also write the figures as JSON")
  args = parser.parse_args()
  root = pathlib.Path(args.survey_dir)
  names = ["teacher"] + [m.name for m in METHODS]
  missing = [n for n in names if not (root / n / recipes.MODEL_DIR).is_dir()]
  if missing:
    parser.error(f"--survey-dir {root}: no checkpoint for {missing}; run `vitjax survey "
                 f"--out {root}` first")
  models = {n: export.load_model(root / n / recipes.MODEL_DIR) for n in names}
  timed = evaluate.speeds(models, timing_batch=256, rounds=args.rounds,
                          choose_options=evaluate.fastest_options)
  ref = timed["teacher"]
  families = {m.name: m.family for m in METHODS}
  print(f"{xla_cpu.cpu_description()}; {args.rounds} rounds")
  print("| method | option | speedup b=1 (min-max) | throughput ratio b=256 (min-max) |")
  print("|---|---|---:|---:|")
  rows = {}
  for name, t in timed.items():
    lat = evaluate.ratio_spread(ref.latency_rounds, t.latency_rounds)
    thr = evaluate.ratio_spread(ref.batch_rounds, t.batch_rounds)
    rows[name] = {"speedup": lat, "throughput_ratio": thr, "options": t.options_name,
                  "latency_ms": statistics.median(t.latency_rounds) * 1e3}
    print(f"| {name} | {t.options_name} | {lat[1]:.2f}x ({lat[0]:.2f}-{lat[2]:.2f}) "
          f"| {thr[1]:.2f}x ({thr[0]:.2f}-{thr[2]:.2f}) |")
  combos = [n for n in rows if families.get(n) == "combination"]
  best = max(combos, key=lambda n: rows[n]["throughput_ratio"][1])
  lo, med, hi = rows[best]["throughput_ratio"]
  print(f"best combination by throughput: {best} {med:.2f}x ({lo:.2f}-{hi:.2f})")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(
        {"cpu": xla_cpu.cpu_description(), "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
