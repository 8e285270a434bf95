"""Does the CNN teacher's label smoothing cost its student? The tiny DeiT
student soft-distilled from the CNN teacher trained with and without label
smoothing, against the same student trained on labels alone.

Müller, Kornblith and Hinton (2019, "When does label smoothing help?") found
that a teacher trained with label smoothing distills worse: smoothing pulls
each class's logits to equal distances and erases the similarities between
wrong classes that soft targets carry. The survey's CNN teacher was trained
with label smoothing 0.1 until 2026-12-02.

1. Trains the CNN teacher (`recipes.CNN_TEACHER_RECIPES`) on the 55,000
   training images at each label smoothing of `SMOOTHINGS`, validation held
   out; reports validation top-1 and training time.
2. On validation, seed 0: the student preset with the student recipe and no
   teacher, and soft-distilled (DeiT hard + soft KL at T=4, the survey's
   "hard+soft" targets) from each teacher. The best distilled candidate is
   chosen.
3. Tests once: the chosen candidate and "no teacher", 3 seeds each (seed 0 is
   step 2's model), on the test split. Same architecture, steps, batch order.

  .venv/bin/python experiments/distill_teacher_smoothing.py   # ~85 min on 2 AVX2 EPYC cores

Every run is resumable and reused; results go to
experiments/results/distill_teacher_smoothing.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

from vitjax import entry

os.environ["XLA_FLAGS"] = entry.with_cpu_devices(os.environ.get("XLA_FLAGS", ""), os.cpu_count())

from vitjax import data as data_lib  # noqa: E402
from vitjax import distill, evaluate, recipes, survey, train, xla_cpu  # noqa: E402
from vitjax import model as model_lib  # noqa: E402
from vitjax.models.config import ViTConfig  # noqa: E402

HERE = pathlib.Path(__file__).parent
SMOOTHINGS = (0.1, 0.0)
SEEDS = (0, 1, 2)
TARGETS = "hard+soft"


def student(config: ViTConfig, teacher: model_lib.Model | None, images: data_lib.Split,
            tcfg: train.TrainConfig, workdir: pathlib.Path, seed: int) -> model_lib.Model:
  """The student of `config` trained on `images` from `teacher`'s cached
  logits, or on the labels alone when `teacher` is None (resumed or reused
  from `workdir`)."""
  init = model_lib.init(config, seed)
  if teacher is None:
    return train.fit(init, images, tcfg, workdir=workdir / "train", progress=True)
  cache = distill.cached_teacher(teacher, images, tcfg, workdir / "cache.npz", progress=True)
  return distill.fit_student(teacher, init, images, tcfg, survey.TARGETS[TARGETS], cache=cache,
                             workdir=workdir / "train", progress=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="checkpoints/distill_teacher_smoothing")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  dataset = data_lib.load("fashion_mnist")
  images = dataset.train
  results: dict = {"date": time.strftime("%Y-%m-%d"), "cpu": xla_cpu.cpu_description(),
                   "teachers": {}}

  teachers = {}
  for ls in SMOOTHINGS:
    config = recipes.model_config("tiny-cnn", dataset)
    cfg = recipes.teacher_train_config("tiny-cnn", len(images), label_smoothing=ls)
    run_dir = out / f"cnn-ls{ls}"
    reused = (run_dir / recipes.MODEL_DIR).exists()
    t = time.perf_counter()
    teachers[ls] = m = recipes.train_teacher(run_dir, config, images, cfg)
    results["teachers"][str(ls)] = {
        "validation": 100 * evaluate.accuracy(m, dataset.validation),
        "train_seconds": None if reused else round(time.perf_counter() - t, 1),
        "train_steps": cfg.steps}
    print("CNN teacher, label smoothing", ls, results["teachers"][str(ls)], flush=True)

  tcfg = recipes.student_train_config("tiny-student", len(images))
  config = recipes.student_config("tiny-student", teachers[SMOOTHINGS[0]].config)
  candidates = {"none": None, **{f"soft-{ls}": teachers[ls] for ls in SMOOTHINGS}}
  results["validation"] = {}
  for name, teacher in candidates.items():
    m = student(config, teacher, images, tcfg, out / "students" / name, 0)
    results["validation"][name] = 100 * evaluate.accuracy(m, dataset.validation)
    print("student", name, "validation", results["validation"][name], flush=True)
  chosen = max((n for n in candidates if n != "none"), key=results["validation"].get)
  results["chosen"] = chosen

  results["test"] = {}
  for name in (chosen, "none"):
    accs = []
    for seed in SEEDS:
      cfg = recipes.student_train_config("tiny-student", len(images), seed=seed)
      workdir = out / "students" / name if seed == 0 else out / "test" / f"{name}-{seed}"
      m = student(config, candidates[name], images, cfg, workdir, seed)
      accs.append(100 * evaluate.accuracy(m, dataset.test))
      print("student", name, "seed", seed, "test", accs[-1], flush=True)
    results["test"][name] = {"seeds": list(SEEDS), "accuracy": accs, "mean": statistics.mean(accs),
                             "stdev": statistics.stdev(accs)}
  results["gain"] = results["test"][chosen]["mean"] - results["test"]["none"]["mean"]
  path = HERE / "results" / "distill_teacher_smoothing.json"
  path.write_text(json.dumps(results, indent=1))
  path.with_suffix(".md").write_text(markdown(results))
  print(markdown(results))


def markdown(r: dict) -> str:
  lines = [f"CNN teacher label smoothing and distillation, {r['date']}", "",
           "| CNN teacher (55,000 training images) | validation % | training s |",
           "|---|---:|---:|"]
  for ls, t in r["teachers"].items():
    took = t["train_seconds"] if t["train_seconds"] is not None else "reused"
    lines.append(f"| label smoothing {ls} | {t['validation']:.2f} | {took} |")
  lines += ["", "| student (seed 0, training split) | validation % |", "|---|---:|"]
  for name, v in r["validation"].items():
    label = "no teacher" if name == "none" else f"{TARGETS} from the CNN teacher, " \
        f"label smoothing {name.split('-')[1]}"
    lines.append(f"| {label}{' (chosen)' if name == r['chosen'] else ''} | {v:.2f} |")
  lines += ["", "| student (test once) | test % per seed 0/1/2 | mean ± sd |", "|---|---|---:|"]
  for name, v in r["test"].items():
    lines.append(f"| {name} | {' / '.join(f'{a:.2f}' for a in v['accuracy'])} | "
                 f"{v['mean']:.2f} ± {v['stdev']:.2f} |")
  lines += ["", f"Gain of distillation on test: {r['gain']:+.2f} pt (3-seed means)."]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
