"""Where the time of one training step of the survey's ViT teacher or student
goes, per kind of XLA op, and what one device instead of the CPU split into
host devices gives.

    .venv/bin/python benchmarks/profile_train.py [--model teacher|student]
                                                 [--devices N] [--steps 30]

Trains the recipe's first 20 + `--steps` steps on Fashion-MNIST (as `vitjax
train` does, with the CPU split into `--devices` host devices, default one
per core), traces the last `--steps` with `jax.profiler`, and sums the traced
time of the compiled ops by kind: the op's name without its number (e.g.
`ynn_fusion`, `all-reduce`, `dot`, `multiply_add_fusion`), over all devices.
Prints ms per step untraced, and the traced ms per step of each kind.
Figures: benchmarks/RESULTS.md ("Main-job time").
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from vitjax import entry


def _devices_flag() -> str:
  """`--devices N` from argv, read before JAX starts (it fixes the device count)."""
  for i, arg in enumerate(sys.argv):
    if arg == "--devices" and i + 1 < len(sys.argv):
      return sys.argv[i + 1]
    if arg.startswith("--devices="):
      return arg.split("=", 1)[1]
  return str(os.cpu_count())


os.environ.setdefault("XLA_FLAGS", entry.cpu_device_flag(int(_devices_flag())))

import jax  # noqa: E402

from vitjax import data as data_lib  # noqa: E402
from vitjax import model as model_lib  # noqa: E402
from vitjax import recipes, train, xla_cpu  # noqa: E402

WARMUP = 20


def setup(which: str, dataset: data_lib.Dataset, steps: int):
  """(config, training images, TrainConfig) of the survey's teacher or student."""
  teacher = recipes.model_config("tiny", dataset)
  if which == "teacher":
    images = recipes.teacher_images("tiny", dataset)
    cfg = recipes.teacher_train_config("tiny", len(images), steps=steps)
    return teacher, images, cfg
  config = recipes.student_config("tiny-student", teacher)
  images = recipes.student_images("tiny-student", dataset)
  return config, images, recipes.student_train_config("tiny-student", len(images), steps=steps)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="teacher", choices=["teacher", "student"])
  parser.add_argument("--devices", type=int, default=os.cpu_count())
  parser.add_argument("--steps", type=int, default=30)
  args = parser.parse_args()
  dataset = data_lib.load("fashion_mnist")
  config, images, cfg = setup(args.model, dataset, WARMUP + 2 * args.steps)
  cfg = dataclasses.replace(cfg, log_every=1)
  trace_dir = tempfile.mkdtemp()
  marks: dict[int, float] = {}
  traced = (WARMUP + args.steps, WARMUP + 2 * args.steps)

  def on_step(step: int, _: dict) -> None:
    marks[step] = time.perf_counter()
    if step == traced[0]:
      jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    elif step == traced[1]:
      jax.profiler.stop_trace()

  train.fit(model_lib.init(config, 0), images, cfg, on_step=on_step, progress=False)
  untraced = (marks[traced[0]] - marks[WARMUP]) / args.steps * 1e3
  trace = json.load(gzip.open(glob.glob(f"{trace_dir}/**/*.trace.json.gz",
                                        recursive=True)[0]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kinds: collections.Counter = collections.Counter()
  for e in events:
    name = e.get("name", "")
    # Compiled ops only: not Python frames ($...), nor the runtime's own spans.
    if e.get("ph") != "X" or name.startswith("$") or any(
        w in name for w in ("Execute", "Wait", "Pjit", "np.", "shard_args", "Handle")):
      continue
    kinds[re.sub(r"[.\d]+$", "", name)] += e["dur"] / 1e3 / args.steps
  print(f"{args.model}, {xla_cpu.cpu_description()}, {len(jax.devices())} device(s): "
        f"{untraced:.1f} ms per step untraced ({1e3 / untraced:.2f} steps/s); traced op "
        "time per step, summed over devices:")
  for kind, ms in kinds.most_common(15):
    print(f"  {ms:8.2f} ms  {kind}")
  print(f"  {sum(kinds.values()):8.2f} ms  in all")


if __name__ == "__main__":
  main()
