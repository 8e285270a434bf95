"""'Compress your own ViT', end to end: a timm DeiT-tiny checkpoint in, a
fine-tuned, quantized, StableHLO-exported Fashion-MNIST classifier out.

No pretrained weights can be downloaded here, so the starting checkpoint is a
randomly initialized timm `deit_tiny_distilled_patch16_224` (timm's init,
timm's tensor names, saved with safetensors: exactly what a timm checkpoint
file holds; built in plain torch by tests/timm_reference.py because timm
itself does not import next to torch 2.13 here). The figures therefore show
the pipeline and its costs, not what ImageNet pretraining would add.

The steps are the README's commands, run in this process through
`vitjax.cli.main`:
  vitjax import deit/ --out imported --num-classes 10 --image-size 64 --channels 1
  vitjax train --init imported --out finetuned           (TRANSFER_RECIPE: 1 epoch)
  vitjax quantize finetuned --method static-int8
  vitjax export finetuned-static-int8 --input-shape 28x28x1
then a fresh Python process that imports only jax runs the artifact on the
test images. Validation accuracy (5,000 held-out training images) is printed
for every model; the test split is scored once per model at the end.

  .venv/bin/python experiments/transfer_deit_tiny.py     # ~20 min on 2 cores

Writes experiments/results/transfer_deit_tiny.{json,md}; the models go to
checkpoints/transfer/.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import timm_reference  # noqa: E402
from vitjax import cli, evaluate, export, stablehlo, xla_cpu  # noqa: E402
from vitjax import data as data_lib  # noqa: E402
from vitjax import model as model_lib  # noqa: E402

ARCH = "deit_tiny_distilled_patch16_224"
FRESH = """
import sys, numpy as np, jax
from jax import export
call = export.deserialize(bytearray(open(sys.argv[1], 'rb').read())).call
data = np.load(sys.argv[2])
images, labels = data['images'], data['labels']
predictions = np.concatenate([np.asarray(call(images[i:i + 500])).argmax(-1)
                              for i in range(0, len(images), 500)])
assert not any(m.startswith('vitjax') for m in sys.modules)
print(float((predictions == labels).mean()))
"""


def run(argv: list[str]) -> float:
  start = time.perf_counter()
  print("$ vitjax " + " ".join(argv), flush=True)
  if cli.main(argv) != 0:
    raise SystemExit(f"vitjax {argv[0]} failed")
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="checkpoints/transfer")
  parser.add_argument("--steps", type=int, default=None,
                      help="fine-tuning steps (default: the transfer recipe's one epoch)")
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--results", default=str(HERE / "results" / "transfer_deit_tiny"))
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  times: dict[str, float] = {}

  start = time.perf_counter()
  source = timm_reference.timm_init(timm_reference.TimmViT(
      **timm_reference.ARCHS[ARCH])).eval()
  timm_reference.save(source, out / "deit", ARCH)
  times["write the timm checkpoint"] = time.perf_counter() - start
  source_bytes = (out / "deit" / "model.safetensors").stat().st_size

  imported, tuned = out / "imported", out / "finetuned"
  times["vitjax import"] = run(["import", str(out / "deit"), "--out", str(imported),
                                "--num-classes", "10", "--image-size", str(args.image_size),
                                "--channels", "1"])
  steps = ["--steps", str(args.steps)] if args.steps else []
  times["vitjax train --init"] = run(["train", "--init", str(imported), "--out", str(tuned),
                                      *steps])
  times["vitjax quantize"] = run(["quantize", str(tuned), "--method", "static-int8"])
  quantized = out / "finetuned-static-int8"
  artifact = out / "finetuned-static-int8-stablehlo"
  times["vitjax export"] = run(["export", str(quantized), "--input-shape", "28x28x1",
                                "--out", str(artifact)])

  dataset = data_lib.load("fashion_mnist")
  models = {"fp32 (fine-tuned)": export.load_model(tuned / "model"),
            "static-int8": export.load_model(quantized)}
  rows = {}
  for name, model in models.items():
    rows[name] = {
        "validation_top1": 100 * evaluate.accuracy(model, dataset.validation),
        "test_top1": 100 * evaluate.accuracy(model, dataset.test),
        "params": model_lib.param_count(model),
        "disk_bytes": export.disk_bytes(tuned / "model" if "fp32" in name else quantized)}
  np.savez(out / "test.npz", images=dataset.test.images, labels=dataset.test.labels)
  start = time.perf_counter()
  fresh = subprocess.run([sys.executable, "-c", FRESH, str(artifact / stablehlo.SERIALIZED),
                          str(out / "test.npz")], capture_output=True, text=True, check=True)
  times["fresh process: load artifact + 10k test images"] = time.perf_counter() - start
  artifact_top1 = 100 * float(fresh.stdout.strip().splitlines()[-1])
  mlir = (artifact / stablehlo.MLIR).read_text()
  result = {
      "source": {"architecture": ARCH, "init": "timm init_weights (random; no download)",
                 "safetensors_bytes": source_bytes,
                 "params": model_lib.param_count(export.load_model(imported))},
      "image_size": args.image_size, "train_images": len(dataset.train),
      "finetune": export.read_metadata(tuned / "model")["metadata"]["train"],
      "models": rows, "artifact": {
          "test_top1": artifact_top1, "bytes": export.disk_bytes(artifact),
          "integer_dot_generals": stablehlo.integer_dots(mlir),
          "input": json.loads((artifact / stablehlo.SIGNATURE).read_text())["input"]},
      "seconds": {k: round(v, 1) for k, v in times.items()},
      "machine": xla_cpu.cpu_description()}
  pathlib.Path(args.results).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(f"{args.results}.json").write_text(json.dumps(result, indent=1))
  lines = ["| model | validation top-1 | test top-1 | on disk |", "|---|---:|---:|---:|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {r['validation_top1']:.2f}% | {r['test_top1']:.2f}% | "
                 f"{r['disk_bytes']:,} B |")
  lines.append(f"| StableHLO artifact (static-int8, fresh process, only jax) | | "
               f"{artifact_top1:.2f}% | {result['artifact']['bytes']:,} B |")
  lines += ["", "| step | seconds |", "|---|---:|"]
  lines += [f"| {k} | {v:.1f} |" for k, v in times.items()]
  text = "\n".join(lines)
  pathlib.Path(f"{args.results}.md").write_text(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
