"""Does a longer or more strongly augmented schedule make distillation pay more?

`experiments/distill_cnn_teacher.py` chose the teacher and the targets at
the student recipe's own schedule (9 epochs, no augmentation); this script
takes its choice from experiments/results/distill_cnn_teacher.json.
Distillation often wants more: DeiT trains for 300-1000 epochs with heavy
augmentation, and "function matching" (Beyer et al. 2022) shows the
teacher's targets on augmented views of each image.
This script varies the schedule, on the validation split only, for both the
distilled student and the same student trained on labels alone (same steps,
batches and augmentation), so the gain of each schedule is measured on the
images no run trained on:

  base      the recipe's 9 epochs, no augmentation (the runs of
            distill_cnn_teacher.py, reused)
  aug       9 epochs, random crops (2 px padding) and horizontal flips; the
            teacher's logits are cached for 3 augmented views of every image,
            epoch e trains on view e mod 3
  long      18 epochs, no augmentation
  long-aug  18 epochs with aug's augmentation

Seed 0, trained on the 55,000 training images, scored on the 5,000
validation images. The test split is not read.

  .venv/bin/python experiments/distill_schedule.py       # ~40 min on 2 EPYC cores (AVX-512)
  .venv/bin/python experiments/distill_schedule.py --quick

Needs the two teachers and the base runs of
`experiments/distill_cnn_teacher.py` (checkpoints/distill_cnn_teacher/full),
both teachers trained on the training split only. Every run is resumable and
reused; results go to
experiments/results/distill_schedule.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

from vitjax import entry

os.environ["XLA_FLAGS"] = entry.with_cpu_devices(os.environ.get("XLA_FLAGS", ""), os.cpu_count())

from distill_cnn_teacher import CANDIDATES, load_dataset, student  # noqa: E402

from vitjax import evaluate, export, recipes  # noqa: E402

HERE = pathlib.Path(__file__).parent
# schedule -> TrainConfig overrides of the student recipe
SCHEDULES: dict[str, dict] = {
    "base": {},
    "aug": dict(crop_pad=2, flip=True, augment_views=3),
    "long": dict(epochs=18.0),
    "long-aug": dict(epochs=18.0, crop_pad=2, flip=True, augment_views=3),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="plumbing check: tiny budgets")
  parser.add_argument("--runs", default="checkpoints/distill_cnn_teacher")
  parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES),
                      choices=list(SCHEDULES))
  args = parser.parse_args()
  root = pathlib.Path(args.runs) / ("quick" if args.quick else "full")
  dataset = load_dataset(args.quick)
  teachers = {}
  for name in ("cnn", "vit"):
    model_dir = root / f"{name}-teacher" / recipes.MODEL_DIR
    if not model_dir.is_dir():
      raise SystemExit(f"{model_dir} is missing: run experiments/distill_cnn_teacher.py"
                       f"{' --quick' if args.quick else ''} first")
    teachers[name] = export.load_model(model_dir)
  images = dataset.train
  recipe = json.loads((HERE / "results" / "distill_cnn_teacher.json").read_text())["chosen"]
  results: dict = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "recipe": recipe,
                   "schedules": SCHEDULES, "validation": {}}
  for schedule in args.schedules:
    overrides = dict(SCHEDULES[schedule])
    if args.quick:
      overrides["epochs"] = 0.2 * overrides.get("epochs", 9.0) / 9.0
    tcfg = recipes.student_train_config("tiny-student", len(images), **overrides)
    row = {"steps": tcfg.steps}
    for name in (recipe, "no-teacher"):
      names, weights = CANDIDATES[name]
      # The base schedule is distill_cnn_teacher.py's own run (same config).
      workdir = root / "val" / name if schedule == "base" else (
          root / "schedule" / schedule / name)
      t = time.perf_counter()
      m = student(teachers, names, weights, images, tcfg, workdir, 0, True)
      row[name] = {"accuracy": 100 * evaluate.accuracy(m, dataset.validation),
                   "seconds": round(time.perf_counter() - t, 1)}
      print(schedule, name, row[name], flush=True)
    row["gain"] = row[recipe]["accuracy"] - row["no-teacher"]["accuracy"]
    results["validation"][schedule] = row
  text = markdown(results)
  if not args.quick:
    out = HERE / "results" / "distill_schedule.json"
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(text)
  print(text)


def markdown(r: dict) -> str:
  lines = [f"Distillation schedules, validation split, seed 0, {r['date']}" +
           (" (QUICK: not meaningful)" if r["quick"] else ""), "",
           f"| schedule | steps | {r['recipe']} % | no teacher % | gain (pt) |",
           "|---|---:|---:|---:|---:|"]
  for name, row in r["validation"].items():
    lines.append(f"| {name} | {row['steps']} | {row[r['recipe']]['accuracy']:.2f} | "
                 f"{row['no-teacher']['accuracy']:.2f} | {row['gain']:+.2f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
