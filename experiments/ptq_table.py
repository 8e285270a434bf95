"""Whole-ViT post-training quantization: every recipe at W8A8 ... W3A3 on the
survey's teacher and student, the best mix chosen on validation, test once.

For each model and bit width, every recipe of `vitjax.transforms.ptq`
quantizes all matmul inputs (linear layers, q.kT, probs.v) and weights,
calibrated on 256 images of the calibration split (training images). Each
is scored on the 5,000 validation images; the "best mix" of a row is the
validation winner among all recipes and their +gptq combinations. Then every
entry is scored once on the test split, and two fully quantized W8A8 rows
(LayerNorm inputs quantized too) are added.

The survey trains its teacher and student without the validation images, so
the recipes are ranked on images neither model saw.

  .venv/bin/python experiments/ptq_table.py            # ~20 min on 2 EPYC cores
  .venv/bin/python experiments/ptq_table.py --quick    # plumbing, 2 recipes, W8A8

Needs `checkpoints/survey/{teacher,student}` (`bash run.sh main` writes them).
Writes experiments/results/ptq_table.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

from vitjax import data as data_lib
from vitjax import evaluate, export
from vitjax.transforms import ptq

HERE = pathlib.Path(__file__).parent
BITS = ((8, 8), (6, 6), (4, 4), (3, 3))
RECIPES = ("minmax", "fqvit", "ptq4vit", "repqvit", "gptq")
MIXES = ("fqvit+gptq", "ptq4vit+gptq", "repqvit+gptq")
CALIBRATION = 256


def run(model, recipe: str, w: int, a: int, calibration: data_lib.Split,
        dataset: data_lib.Dataset, layernorm_inputs: bool = False) -> dict:
  start = time.perf_counter()
  q = ptq.quantize_model(model, recipe, calibration, w_bits=w, a_bits=a,
                         layernorm_inputs=layernorm_inputs, progress=False)
  seconds = time.perf_counter() - start
  val = evaluate.accuracy(q, dataset.validation)
  print(f"  W{w}A{a} {recipe:14s}{' +LN' if layernorm_inputs else ''} validation "
        f"{val * 100:.2f}% ({seconds:.0f} s)", flush=True)
  return {"recipe": recipe, "w": w, "a": a, "layernorm_inputs": layernorm_inputs,
          "validation": val, "seconds": round(seconds, 1), "model": q}


def table(name: str, model, dataset: data_lib.Dataset, calibration: data_lib.Split,
          bits, recipes, mixes) -> dict:
  fp_val = evaluate.accuracy(model, dataset.validation)
  fp_test = evaluate.accuracy(model, dataset.test)
  print(f"{name}: fp32 validation {fp_val * 100:.2f}%, test {fp_test * 100:.2f}%")
  rows = []
  for w, a in bits:
    runs = [run(model, r, w, a, calibration, dataset) for r in recipes + mixes]
    best = max(runs, key=lambda r: r["validation"])
    rows += [{**r, "best": r is best} for r in runs]
  rows += [run(model, r, 8, 8, calibration, dataset, layernorm_inputs=True)
           for r in recipes[:2]]
  for r in rows:
    r["test"] = evaluate.accuracy(r.pop("model"), dataset.test)
  return {"fp32_validation": fp_val, "fp32_test": fp_test, "rows": rows}


def markdown(results: dict) -> str:
  lines = []
  for name, res in results.items():
    fp = res["fp32_test"] * 100
    lines += [f"### {name} (fp32 test top-1 {fp:.2f}%)", "",
              "| bits | " + " | ".join(RECIPES) + " | best mix (validation-chosen) |",
              "|---|" + "---:|" * (len(RECIPES) + 1)]
    by_bits: dict[tuple, list] = {}
    for r in res["rows"]:
      if not r["layernorm_inputs"]:
        by_bits.setdefault((r["w"], r["a"]), []).append(r)
    for (w, a), rows in by_bits.items():
      cell = lambda r: f"{r['test'] * 100:.2f} ({(r['test'] * 100 - fp):+.2f})"  # noqa: E731
      named = {r["recipe"]: r for r in rows}
      best = next(r for r in rows if r["best"])
      lines.append(f"| W{w}A{a} | " + " | ".join(cell(named[k]) if k in named else "-"
                                                 for k in RECIPES)
                   + f" | {best['recipe']}: {cell(best)} |")
    for r in res["rows"]:
      if r["layernorm_inputs"]:
        lines.append(f"\nW8A8 {r['recipe']} with every LayerNorm input quantized too: "
                     f"{r['test'] * 100:.2f}% ({r['test'] * 100 - fp:+.2f} pt)")
    lines.append("")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="2 recipes at W8A8 only")
  parser.add_argument("--survey", default="checkpoints/survey")
  args = parser.parse_args()
  dataset = data_lib.load("fashion_mnist")
  calibration = dataset.calibration.take(slice(0, CALIBRATION))
  assert calibration.origin == "train"
  bits, recipes, mixes = (((8, 8),), RECIPES[:2], ()) if args.quick else (BITS, RECIPES,
                                                                            MIXES)
  results = {}
  for name in ("teacher", "student"):
    model = export.load_model(pathlib.Path(args.survey) / name / "model")
    results[name] = table(name, model, dataset, calibration, bits, recipes, mixes)
  if args.quick:
    print(markdown(results))
    return
  out = HERE / "results"
  out.mkdir(exist_ok=True)
  (out / "ptq_table.json").write_text(json.dumps(results, indent=1))
  (out / "ptq_table.md").write_text(markdown(results))
  print(markdown(results))


if __name__ == "__main__":
  main()
