"""Training-step cost of patch dropout, side by side.

    .venv/bin/python benchmarks/patch_dropout.py [--preset tiny] [--batch-size 128]
                                                 [--steps 60] [--rounds 3]

Times the jitted training step of `vitjax.train.fit` (tiny preset on synthetic
images) with every patch token and with patch dropout 0.5 and 0.625 (8 and 6 of
16 tokens kept), round-robin in one process, and prints each as ms per step
and as a ratio to the full-token step. The ratio stays above (1 - dropout):
the patch embedding, the head and the optimizer update do not shrink.
"""

from __future__ import annotations

import argparse
import os
import statistics

from vitjax import entry

# Split the CPU into host devices as `vitjax train` does (before JAX starts).
os.environ.setdefault("XLA_FLAGS", entry.cpu_device_flag(os.cpu_count()))

import common  # noqa: E402
import numpy as np  # noqa: E402

from vitjax import data as data_lib  # noqa: E402
from vitjax import train  # noqa: E402
from vitjax.models.config import preset  # noqa: E402

DROPOUTS = (0.0, 0.5, 0.625)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  config = preset(args.preset)
  rng = np.random.default_rng(0)
  n = args.batch_size * 4
  split = data_lib.Split(
      rng.integers(0, 256, (n, config.image_size, config.image_size, config.channels),
                   dtype=np.uint8),
      rng.integers(0, config.num_classes, n).astype(np.int32))
  times: dict[float, list[float]] = {p: [] for p in DROPOUTS}
  for _ in range(args.rounds):
    for p in DROPOUTS:
      cfg = train.TrainConfig(steps=args.steps, batch_size=args.batch_size,
                              warmup_steps=0, patch_dropout=p, log_every=1)
      times[p].append(common.step_ms(config, split, cfg))
  full = statistics.median(times[0.0])
  print(f"{args.preset}, batch {args.batch_size}, {config.num_patches} patch tokens, "
        f"median of {args.rounds} rounds")
  for p in DROPOUTS:
    kept = max(1, round((1 - p) * config.num_patches))
    ms = statistics.median(times[p])
    print(f"  patch_dropout {p:<5}  {kept:>3} tokens  {ms:7.1f} ms/step  {ms / full:.2f}x")


if __name__ == "__main__":
  main()
