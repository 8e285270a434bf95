"""Does a longer-trained CNN teacher teach better? The unsmoothed CNN teacher
at its recipe's 6 epochs and at 12, and the tiny DeiT student distilled from
each with the survey's objective; validation only, seed 0.

experiments/distill_objective.py left a stronger teacher as the untried lever:
neither the student's loss nor the CNN + ViT ensemble beat the survey's
recipe. Small CNNs reach 93-94% on Fashion-MNIST with long schedules; the
survey's CNN teacher trains 6 epochs (90.36% on validation), since XLA's CPU
convolutions make each epoch costly and the main job has a time budget.

1. Trains the CNN teacher (`recipes.CNN_TEACHER_RECIPES`, no label smoothing)
   on the 55,000 training images for each of `EPOCHS`; validation held out.
2. Distills the student recipe from each with `distill_objective.OBJECTIVES
   ["hard+soft-T4"]` (the survey's objective), seed 0, and scores it on
   validation, beside the no-teacher student.

It shares its runs with distill_objective.py (the default --out): the
6-epoch teacher and its student, and the no-teacher student, are reused from
there when present and trained otherwise.

  .venv/bin/python experiments/distill_teacher_length.py   # ~20 min on 2 AVX2 EPYC cores after distill_objective.py

Results: experiments/results/distill_teacher_length.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import distill_objective as base  # noqa: E402  (sets XLA_FLAGS before JAX starts)

from vitjax import data as data_lib  # noqa: E402
from vitjax import evaluate, recipes, xla_cpu  # noqa: E402

EPOCHS = (6.0, 12.0)
OBJECTIVE = "hard+soft-T4"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="checkpoints/distill_objective")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  dataset = data_lib.load("fashion_mnist")
  images = dataset.train
  results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu": xla_cpu.cpu_description(),
                   "objective": OBJECTIVE, "teachers": {}, "validation": {}}
  recipe_epochs = recipes.teacher_recipe("tiny-cnn")["epochs"]
  tcfg = recipes.student_train_config("tiny-student", len(images))
  s_config = recipes.student_config("tiny-student", recipes.model_config("tiny-cnn", dataset))
  for epochs in EPOCHS:
    tag = "" if epochs == recipe_epochs else f"-{epochs:g}ep"
    teacher, results["teachers"][f"{epochs:g}"] = base.trained_teacher(
        out / f"cnn{tag}", "tiny-cnn", dataset, images, epochs=epochs)
    print("CNN teacher", epochs, "epochs", results["teachers"][f"{epochs:g}"], flush=True)
    m = base.student(s_config, teacher, OBJECTIVE, images, tcfg,
                     out / "students" / f"{OBJECTIVE}{tag}", 0)
    results["validation"][f"{epochs:g}"] = 100 * evaluate.accuracy(m, dataset.validation)
    print("student from it, validation", results["validation"][f"{epochs:g}"], flush=True)
  m = base.student(s_config, None, None, images, tcfg, out / "students" / "none", 0)
  results["no_teacher"] = 100 * evaluate.accuracy(m, dataset.validation)
  path = base.HERE / "results" / "distill_teacher_length.json"
  path.write_text(json.dumps(results, indent=1))
  path.with_suffix(".md").write_text(markdown(results))
  print(markdown(results))


def markdown(r: dict) -> str:
  lines = [f"CNN teacher length and distillation, {r['date']}, {r['cpu']}, validation, seed 0",
           "", f"| CNN teacher epochs | steps | training s | teacher % | student ({r['objective']}) "
           "% | gain over no teacher (pt) |", "|---:|---:|---:|---:|---:|---:|"]
  for epochs, t in r["teachers"].items():
    took = t["train_seconds"] if t["train_seconds"] is not None else "reused"
    s = r["validation"][epochs]
    lines.append(f"| {epochs} | {t['train_steps']} | {took} | {t['validation']:.2f} | {s:.2f} | "
                 f"{s - r['no_teacher']:+.2f} |")
  lines += ["", f"No-teacher student: {r['no_teacher']:.2f}%."]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
