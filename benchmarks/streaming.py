"""Streaming loader throughput against the in-memory path, on the same images.

Writes the first --images Fashion-MNIST training images as PNGs into an image
folder (root/<class>/), then times, in alternating rounds in one process:
  in-memory  `data.train_batches` over the decoded arrays (numpy indexing);
  stream     `streaming.Stream` over the folder (grain, PIL decoding), at
             each --threads value;
and, for scale, one jitted training step of the tiny ViT teacher on a batch.
Prints images/s (median, min-max over rounds) and the ratio to in-memory, and
checks that a stream resumed from its grain state yields the same batches.

  .venv/bin/python benchmarks/streaming.py [--images 10000] [--rounds 3] [--out F]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from vitjax import data as data_lib
from vitjax import recipes, streaming, train, xla_cpu
from vitjax import model as model_lib


def write_folder(split: data_lib.Split, root: pathlib.Path) -> None:
  for i, (img, label) in enumerate(zip(split.images, split.labels)):
    d = root / f"{int(label):02d}"
    d.mkdir(exist_ok=True)
    Image.fromarray(img[..., 0]).save(d / f"{i:06d}.png")


def images_per_second(batches, steps: int, batch: int) -> float:
  t = time.perf_counter()
  for _ in range(steps):
    next(batches)
  return steps * batch / (time.perf_counter() - t)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=10000)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  split = data_lib.load("fashion_mnist").train.take(slice(0, args.images))
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    t = time.perf_counter()
    write_folder(split, root)
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    folder = streaming.scan_folder(root)
    scan_s = time.perf_counter() - t
    memory = data_lib.Split(*[np.stack([folder[i][k] for i in range(len(folder))])
                              for k in ("image", "label")])
    rates: dict[str, list[float]] = {"in-memory": []}
    rates.update({f"stream, {n} threads": [] for n in args.threads})
    for _ in range(args.rounds):
      rates["in-memory"].append(images_per_second(
          data_lib.train_batches(memory, args.batch, 0), args.steps, args.batch))
      for n in args.threads:
        it = streaming.Stream(folder, num_threads=n).iterator(args.batch, 0,
                                                              steps=args.steps + 1)
        next(it)  # thread start-up
        rates[f"stream, {n} threads"].append(images_per_second(it, args.steps, args.batch))

    # resumed == uninterrupted
    stream = streaming.Stream(folder, num_threads=2)
    straight = [b[2] for b in stream.iterator(args.batch, 0, steps=20)]
    it = stream.iterator(args.batch, 0, steps=20)
    for _ in range(7):
      next(it)
    resumed = [b[2] for b in stream.iterator(args.batch, 0, steps=20, state=it.get_state())]
    identical = all(np.array_equal(a, b) for a, b in zip(straight[7:], resumed)) and \
        len(resumed) == 13

    # a training step of the tiny teacher, for scale
    config = recipes.model_config("tiny", data_lib.load("fashion_mnist"))
    seconds = []
    for steps in (5, 5 + args.steps):  # the difference leaves compilation out
      cfg = train.TrainConfig(steps=steps, batch_size=args.batch, warmup_steps=1)
      t = time.perf_counter()
      train.fit(model_lib.init(config, 0), memory, cfg, progress=False)
      seconds.append(time.perf_counter() - t)
    train_rate = args.steps * args.batch / (seconds[1] - seconds[0])

  ref = statistics.median(rates["in-memory"])
  rows = {name: {"median": statistics.median(r), "min": min(r), "max": max(r),
                 "ratio": statistics.median(r) / ref} for name, r in rates.items()}
  result = {"date": time.strftime("%Y-%m-%d"), "machine": xla_cpu.cpu_description(),
            "images": args.images, "batch": args.batch, "steps": args.steps,
            "rounds": args.rounds, "write_png_s": round(write_s, 1),
            "scan_s": round(scan_s, 2), "loaders": rows,
            "tiny_teacher_training_img_per_s": round(train_rate),
            "resumed_batches_identical": identical}
  for name, r in rows.items():
    print(f"{name:>20}: {r['median']:9.0f} img/s ({r['min']:.0f}-{r['max']:.0f}), "
          f"{r['ratio']:.3f}x in-memory")
  print(f"scan of {args.images} files: {scan_s:.2f} s; tiny teacher training (full "
        f"tokens, no patch dropout): {train_rate:.0f} img/s; resumed stream identical: "
        f"{identical}")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
