"""`vitjax` command line: train, eval, quantize."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Callable, Sequence

from vitjax import data as data_lib
from vitjax import evaluate, export, recipes
from vitjax.transforms import calibrate, quantize
from vitjax.models.config import PRESETS

Command = Callable[[argparse.Namespace], int]


def _add_data_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "npz"],
                 help="fashion_mnist (local files, never downloaded) or npz "
                      "(a --data-dir holding train.npz and test.npz)")
  p.add_argument("--data-dir", default=None,
                 help=f"where the dataset lies (default: ${data_lib.ENV_DIR}, the "
                      "user cache, then /usr/share/datasets/fashion-mnist)")


def _load_data(args: argparse.Namespace) -> data_lib.Dataset:
  return data_lib.load(args.dataset, args.data_dir)


def cmd_train(args: argparse.Namespace) -> int:
  dataset = _load_data(args)
  config = recipes.model_config(args.preset, dataset)
  cfg = recipes.teacher_train_config(
      args.preset, len(dataset.train), epochs=args.epochs, steps=args.steps,
      batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed, fsdp=args.fsdp)
  run_dir = pathlib.Path(args.out)
  model_dir = run_dir / recipes.MODEL_DIR
  if (model_dir / export.META_FILE).exists():
    print(f"reusing the finished run in {run_dir} (delete it to train again)")
  else:
    print(f"training {args.preset} ViT ({config.depth} blocks, dim {config.dim}, patch "
          f"{config.patch_size}) for {cfg.steps} steps of {cfg.batch_size} images; "
          f"run directory {run_dir}")
  start = time.perf_counter()
  model = recipes.train_teacher(run_dir, config, dataset, cfg, seed=args.seed)
  print(f"took {time.perf_counter() - start:.0f} s")
  r = evaluate.report(model, dataset.test, disk_bytes=export.disk_bytes(model_dir))
  print(evaluate.format_report("teacher [test]", r))
  return 0


def cmd_eval(args: argparse.Namespace) -> int:
  model_dir = recipes.model_dir_of(args.checkpoint)
  model = export.load_model(model_dir)
  dataset = _load_data(args)
  data_lib.check_compatible(dataset.image_shape, dataset.num_classes, model.config)
  split = getattr(dataset, args.split)
  r = evaluate.report(model, split, disk_bytes=export.disk_bytes(model_dir))
  print(evaluate.format_report(f"{model_dir} [{args.split}]", r))
  if args.json:
    print(json.dumps(r.to_dict()))
  return 0


QUANT_METHODS = ("weight-int8", "weight-int4", "dynamic-int8", "static-int8")


def quantizer(method: str, dataset: data_lib.Dataset, *, calib: int, calibrator: str,
              exclude: Sequence[str]) -> Callable:
  """The quantization transform a CLI method name stands for."""
  if method == "weight-int8":
    return quantize.weight_only(8, exclude=exclude)
  if method == "weight-int4":
    return quantize.weight_only(4, exclude=exclude)
  if method == "dynamic-int8":
    return quantize.dynamic_int8(exclude=exclude)
  if method == "static-int8":
    if not 1 <= calib <= len(dataset.calibration):
      raise ValueError(f"--calib {calib} is outside 1..{len(dataset.calibration)} "
                       "(the calibration split's size)")
    return quantize.static_int8(dataset.calibration.images[:calib], calibrator=calibrator,
                                exclude=exclude)
  raise ValueError(f"--method {method!r}; choose one of {QUANT_METHODS}")


def _compare_and_print(models: dict, dataset: data_lib.Dataset, disk: dict[str, int],
                       reference: str) -> dict[str, evaluate.Report]:
  reports = evaluate.compare(models, dataset.test, disk_bytes=disk)
  print(evaluate.format_table(reports, reference))
  for note in evaluate.speed_notes(reports, reference):
    print(note)
  return reports


def cmd_quantize(args: argparse.Namespace) -> int:
  model_dir = recipes.model_dir_of(args.checkpoint)
  model = export.load_model(model_dir)
  dataset = _load_data(args)
  data_lib.check_compatible(dataset.image_shape, dataset.num_classes, model.config)
  transform = quantizer(args.method, dataset, calib=args.calib,
                        calibrator=args.calibrator, exclude=args.exclude)
  quantized = transform(model)
  out = pathlib.Path(args.out or f"{model_dir.parent}-{args.method}")
  disk = export.save_model(quantized, out, overwrite=args.overwrite,
                           metadata={"transform": args.method, "source": str(model_dir)})
  print(f"wrote {out}")
  _compare_and_print({"fp32": model, args.method: quantized}, dataset,
                     {"fp32": export.disk_bytes(model_dir), args.method: disk}, "fp32")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="vitjax", description="Make Vision Transformers smaller and faster.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="train a ViT (the teacher) and report it")
  p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
  p.add_argument("--epochs", type=float, default=None, help="default: the preset's recipe")
  p.add_argument("--steps", type=int, default=None, help="overrides --epochs")
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--lr", type=float, default=None, help="peak learning rate")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--fsdp", action="store_true", help="shard params over devices")
  p.add_argument("--out", default="checkpoints/teacher",
                 help="run directory: model/ and resumable train/ state")
  _add_data_args(p)
  p.set_defaults(func=cmd_train)

  p = sub.add_parser("eval", help="measure a saved model")
  p.add_argument("checkpoint", help="a run directory or its model/ directory")
  p.add_argument("--split", default="test", choices=["test", "validation"])
  p.add_argument("--json", action="store_true", help="also print the figures as JSON")
  _add_data_args(p)
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser("quantize", help="quantize a saved model with AQT and compare it")
  p.add_argument("checkpoint", help="a run directory or its model/ directory")
  p.add_argument("--method", required=True, choices=QUANT_METHODS)
  p.add_argument("--calib", type=int, default=1024,
                 help="calibration images for static-int8 (from the training split)")
  p.add_argument("--calibrator", default="percentile", choices=calibrate.CALIBRATORS)
  p.add_argument("--exclude", nargs="*", default=(),
                 help="regex patterns of layers to keep in float, e.g. embedding head")
  p.add_argument("--out", default=None, help="default: <run dir>-<method>")
  p.add_argument("--overwrite", action="store_true")
  _add_data_args(p)
  p.set_defaults(func=cmd_quantize)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, FileExistsError, data_lib.DatasetError,
          export.CheckpointError) as e:
    print(f"vitjax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
