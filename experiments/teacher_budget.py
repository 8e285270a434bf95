"""How much training the survey's ViT teacher needs: the tiny teacher recipe
against two cheaper schedules, two seeds each, chosen on validation.

The main job must fit 25 minutes on 2 cores and the teacher's training is
about 40% of it (2026-11-30: 522-658 s of 1483-1639 s). Each candidate trains
as the survey's teacher does (the 55,000 training images, validation held
out; initial weights and data order from the seed) and is scored on the 5,000
validation images. The rule, fixed before the runs: the cheapest candidate
whose mean validation top-1 over the seeds is at most `TOLERANCE` pt below
the recipe's mean is chosen. No test figure comes from this script: the
survey reports the chosen teacher's test top-1.

  .venv/bin/python experiments/teacher_budget.py            # ~50 min on 2 cores
  .venv/bin/python experiments/teacher_budget.py --quick    # plumbing, ~2 min

Runs are resumable (a finished run is reused, see `recipes.train_teacher`,
with the training time recorded in its `budget.json`; a run copied in without
one, such as the survey's seed-0 teacher, counts for accuracy but not time);
the table goes to experiments/results/teacher_budget.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

from vitjax import entry

# The same XLA CPU device split as the `vitjax` command (before JAX starts), so
# each run trains exactly as the survey's teacher does.
os.environ["XLA_FLAGS"] = entry.with_cpu_devices(os.environ.get("XLA_FLAGS", ""), os.cpu_count())

from vitjax import data as data_lib  # noqa: E402
from vitjax import evaluate, recipes  # noqa: E402

HERE = pathlib.Path(__file__).parent

RECIPE = "keep 6 of 16 tokens, 21 epochs (the recipe)"
# name -> overrides of the tiny teacher recipe (vitjax.recipes.TEACHER_RECIPES):
# the recipe, fewer epochs, and fewer kept tokens per step (cheaper steps).
CANDIDATES: dict[str, dict] = {
    RECIPE: dict(epochs=21.0),
    "keep 6 of 16 tokens, 16 epochs": dict(epochs=16.0),
    "keep 4 of 16 tokens, 21 epochs": dict(epochs=21.0, patch_dropout=0.75),
}
SEEDS = (0, 1)
TOLERANCE = 0.2


def train_and_score(overrides: dict, seed: int, images: data_lib.Split,
                    dataset: data_lib.Dataset, run_dir: pathlib.Path,
                    steps: int | None) -> dict:
  """Trains (or reuses) one run; returns its validation top-1 and training
  seconds (None for a finished run without a recorded time)."""
  overrides = dict(overrides)
  cfg = recipes.teacher_train_config("tiny", len(images), epochs=overrides.pop("epochs"),
                                     steps=steps, seed=seed, **overrides)
  timing = run_dir / "budget.json"
  trained_before = (run_dir / recipes.MODEL_DIR).exists()
  start = time.perf_counter()
  model = recipes.train_teacher(run_dir, recipes.model_config("tiny", dataset), images, cfg,
                                seed=seed)
  if not trained_before:
    timing.write_text(json.dumps({"seconds": round(time.perf_counter() - start, 1)}))
  seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else None
  top1 = evaluate.accuracy(model, dataset.validation)
  return {"seed": seed, "top1": top1, "steps": cfg.steps, "seconds": seconds,
          "settings": cfg.to_dict()}


def choose(rows: dict[str, dict]) -> str:
  """The cheapest candidate (fewest mean seconds) whose mean validation top-1
  is within `TOLERANCE` pt of the recipe's."""
  floor = rows[RECIPE]["mean_top1"] - TOLERANCE / 100
  within = [name for name, r in rows.items() if r["mean_top1"] >= floor]
  return min(within, key=lambda name: rows[name]["mean_seconds"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="20 steps per run")
  parser.add_argument("--out", default="checkpoints/experiments/teacher_budget")
  args = parser.parse_args()
  out = pathlib.Path(args.out + ("-quick" if args.quick else ""))
  steps = 20 if args.quick else None
  dataset = data_lib.load("fashion_mnist")
  images = recipes.teacher_images("tiny", dataset, hold_out_validation=True)
  assert len(images) == len(dataset.train)  # the validation images stay unseen
  rows: dict[str, dict] = {}
  for i, (name, overrides) in enumerate(CANDIDATES.items()):
    runs = []
    for seed in SEEDS:
      run = train_and_score(overrides, seed, images, dataset,
                            out / f"candidate-{i}-seed-{seed}", steps)
      print(f"{name}, seed {seed}: validation top-1 {run['top1'] * 100:.2f}% "
            f"({run['steps']} steps, {run['seconds']} s)", flush=True)
      runs.append(run)
    rows[name] = {"runs": runs, "mean_top1": statistics.mean(r["top1"] for r in runs),
                  "mean_seconds": statistics.mean(r["seconds"] for r in runs
                                                  if r["seconds"] is not None)}
  chosen = choose(rows)
  print(f"chosen on validation: {chosen}")
  results = {"candidates": rows, "chosen": chosen, "tolerance_pt": TOLERANCE,
             "seeds": list(SEEDS)}
  target = HERE / "results" / ("teacher_budget-quick" if args.quick else "teacher_budget")
  target.parent.mkdir(exist_ok=True)
  target.with_suffix(".json").write_text(json.dumps(results, indent=1))
  lines = ["| candidate (trained on 55,000 images) | steps | validation top-1 % per seed "
           "| mean | mean training time |", "|---|---:|---:|---:|---:|"]
  for name, r in rows.items():
    per_seed = " / ".join(f"{x['top1'] * 100:.2f}" for x in r["runs"])
    lines.append(f"| {name}{' **(chosen)**' if name == chosen else ''} "
                 f"| {r['runs'][0]['steps']} | {per_seed} | {r['mean_top1'] * 100:.2f} "
                 f"| {r['mean_seconds']:.0f} s |")
  lines += ["", f"Rule: the cheapest candidate within {TOLERANCE} pt of the recipe's mean "
            "validation top-1."]
  target.with_suffix(".md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"wrote {target.with_suffix('.json')} and {target.with_suffix('.md')}")


if __name__ == "__main__":
  main()
