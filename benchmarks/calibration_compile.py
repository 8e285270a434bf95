"""How long site calibration (`site_calibration.record`) takes on the tiny
teacher's shape, and how much of it is XLA compiling (JAX's
backend-compile events; each call compiles its own program): every
quantization site of the model, 512 Fashion-MNIST calibration images
in batches of 64, without and with the squared-gradient weights that
PTQ4ViT's Hessian-guided fits need. Random weights (the time does not depend
on their values); the persistent compilation cache is off.

    .venv/bin/python benchmarks/calibration_compile.py [--images 512]

Figures: benchmarks/RESULTS.md ("Calibration compile time").
"""

from __future__ import annotations

import argparse
import collections
import os
import time

os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

import jax  # noqa: E402

from vitjax import data as data_lib  # noqa: E402
from vitjax import model as model_lib  # noqa: E402
from vitjax import recipes  # noqa: E402
from vitjax.transforms import site_calibration  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=512)
  args = parser.parse_args()
  dataset = data_lib.load("fashion_mnist")
  model = model_lib.init(recipes.model_config("tiny", dataset), 0)
  calibration = dataset.calibration.take(slice(0, args.images))
  addresses = list(model_lib.site_addresses(model))
  compiling: collections.Counter = collections.Counter()
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **_: compiling.update({event: seconds}))
  print(f"tiny teacher, {len(addresses)} sites, {args.images} images")
  for name, gradients in (("values", frozenset()), ("values + gradients",
                                                     frozenset(addresses))):
    compiling.clear()
    start = time.perf_counter()
    site_calibration.record(model, calibration, addresses, gradients=gradients,
                            progress=False)
    total = time.perf_counter() - start
    compile_s = compiling["/jax/core/compile/backend_compile_duration"]
    print(f"{name}: {total:.2f} s, of which XLA compiling {compile_s:.2f} s")


if __name__ == "__main__":
  main()
