"""Training steps per second of the survey's teachers under each XLA CPU
option (`TrainConfig.xla_cpu`): XLA's default YNNPACK fusions, or off.

Each (teacher, option) trains its recipe's first steps on Fashion-MNIST in
this process, with the CPU split into host devices as `vitjax train` does;
the rate is the median step time after step 20 (`common.step_ms`). Rounds
alternate the options' order.

usage: python benchmarks/train_options.py [--steps N] [--rounds R] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics

from vitjax import entry

# Split the CPU into host devices as `vitjax train` does (before JAX starts).
os.environ.setdefault("XLA_FLAGS", entry.cpu_device_flag(os.cpu_count()))

import common  # noqa: E402
import jax  # noqa: E402

from vitjax import data as data_lib  # noqa: E402
from vitjax import recipes, xla_cpu  # noqa: E402

TEACHERS = {"vit teacher": "tiny", "cnn teacher": "tiny-cnn"}


def steps_per_second(preset: str, dataset: data_lib.Dataset, steps: int, option: str) -> float:
  images = recipes.teacher_images(preset, dataset)
  cfg = dataclasses.replace(recipes.teacher_train_config(preset, len(images), steps=steps),
                            log_every=1, xla_cpu=option)
  return 1e3 / common.step_ms(recipes.model_config(preset, dataset), images, cfg)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  dataset = data_lib.load("fashion_mnist")
  print(f"{xla_cpu.cpu_description()}, {len(jax.devices())} device(s)")
  rates: dict[str, dict[str, list[float]]] = {t: {o: [] for o in xla_cpu.CANDIDATES}
                                              for t in TEACHERS}
  for r in range(args.rounds):
    options = list(xla_cpu.CANDIDATES)[::1 if r % 2 == 0 else -1]
    for teacher, preset in TEACHERS.items():
      for option in options:
        rate = steps_per_second(preset, dataset, args.steps, option)
        rates[teacher][option].append(rate)
        print(f"round {r + 1}: {teacher}, {option}: {rate:.2f} steps/s", flush=True)
  for teacher, by_option in rates.items():
    med = {o: statistics.median(v) for o, v in by_option.items()}
    print(f"{teacher}: " + ", ".join(f"{o} {m:.2f} steps/s" for o, m in med.items())
          + f"; ynn-off / default {med['ynn-off'] / med['xla-default']:.2f}x")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(rates, indent=1) + "\n")


if __name__ == "__main__":
  main()
