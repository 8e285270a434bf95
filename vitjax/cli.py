"""`vitjax` command line: import, train, eval, quantize, prune, lowrank, distill,
export, survey."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shutil
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np

from vitjax import data as data_lib
from vitjax import (distill, evaluate, export, plots, recipes, sharding, stablehlo,
                    streaming, survey, train)
from vitjax import model as model_lib
from vitjax.models import adapt, convert
from vitjax.models.arch import ARCHS
from vitjax.models.config import GELUS, PRESETS
from vitjax.quantizers import uniform
from vitjax.transforms import lowrank, prune, ptq, quantize, structured
from vitjax.tune import policy as policy_lib
from vitjax.tune import search, space, tuner

Command = Callable[[argparse.Namespace], int]


def _number(kind: type, lo: float | None = None, hi: float | None = None, *,
            lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
  """An argparse type: a `kind` number within [lo, hi] (open ends where said)."""
  left, right = "(" if lo_open else "[", ")" if hi_open else "]"
  allowed = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"

  def parse(text: str) -> float:
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a{'n int' if kind is int else ' number'}")
    if value != value or (lo is not None and (value < lo or (lo_open and value == lo))) or \
        (hi is not None and (value > hi or (hi_open and value == hi))):
      raise argparse.ArgumentTypeError(f"{text} is outside {allowed}")
    return value
  return parse


POSITIVE_INT = _number(int, 1)
COUNT = _number(int, 0)
POSITIVE = _number(float, 0, lo_open=True)
WEIGHT = _number(float, 0)
FRACTION_OPEN_TOP = _number(float, 0, 1, hi_open=True)      # [0, 1)
FRACTION_KEPT = _number(float, 0, 1, lo_open=True)          # (0, 1]
FRACTION_OPEN = _number(float, 0, 1, lo_open=True, hi_open=True)  # (0, 1)
BITS = _number(int, 2, 8)

# Arguments that say where a run goes or how processes meet, not what it computes.
NOT_RUN_SETTINGS = ("func", "out", "overwrite", "coordinator", "num_processes", "process_id")
RUN_ENTRIES = {recipes.MODEL_DIR, recipes.TRAIN_DIR, "baseline", "teacher_cache.npz",
               "curves.png", export.META_FILE, export.ARRAYS_DIR}


def _add_data_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "npz"],
                 help="fashion_mnist (local files, never downloaded) or npz "
                      "(a --data-dir holding train.npz and test.npz)")
  p.add_argument("--data-dir", default=None,
                 help=f"where the dataset lies (default: ${data_lib.ENV_DIR}, the "
                      "user cache, then /usr/share/datasets/fashion-mnist)")
  p.add_argument("--num-classes", type=POSITIVE_INT, default=None,
                 help="class count (default: the largest training label + 1, refused "
                      "when some class below it has no example)")


def _add_folder_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--image-folder", default=None, metavar="DIR",
                 help="stream the training images from DIR/train/<class>/*.png|jpg|jpeg "
                      "and score on DIR/test/<class>/..., decoding batch by batch "
                      "(vitjax.streaming, grain) instead of loading --dataset into RAM; "
                      "a trained model is normalized by DIR/train's pixel statistics "
                      "(a student by its teacher's); a rerun resumes with the exact "
                      "batches")
  p.add_argument("--image-size", type=POSITIVE_INT, default=None,
                 help="with --image-folder: resize every image to this square side "
                      "(default: the images' own size, which must be one square size)")
  p.add_argument("--skip-unreadable", action="store_true",
                 help="with --image-folder: leave out (and list) files that are not "
                      "readable images instead of refusing the folder")
  p.add_argument("--read-threads", type=POSITIVE_INT, default=None,
                 help="with --image-folder: grain threads decoding the training images "
                      f"(default {streaming.READ_THREADS})")


def _add_compress_args(p: argparse.ArgumentParser, exclude: Sequence[str],
                       default_out: str) -> None:
  p.add_argument("--exclude", nargs="*", default=exclude,
                 help="regex patterns of layers left as they are")
  p.add_argument("--finetune-steps", type=COUNT, default=400)
  p.add_argument("--lr", type=POSITIVE, default=3e-4, help="fine-tuning learning rate")
  p.add_argument("--out", default=None, help=f"run directory (default {default_out})")
  p.add_argument("--overwrite", action="store_true",
                 help="delete an earlier run in --out (its model and resumable state) first")
  _add_data_args(p)


def _load_data(args: argparse.Namespace) -> data_lib.Dataset:
  return data_lib.load(args.dataset, args.data_dir, num_classes=args.num_classes)


def start_run(out: pathlib.Path, overwrite: bool, model_dir: pathlib.Path, *,
              delete: bool = True) -> None:
  """Checks a run directory before any work: with `overwrite`, an earlier run
  there is deleted (its model and its resumable state alike; only checked
  when not `delete`), so nothing stale is resumed; without it, a finished
  model there is an error.

  Raises:
    FileExistsError: `model_dir` holds a finished model and not `overwrite`.
    CheckpointError: `out` cannot be written, or holds files that are not a
      vitjax run's (never deleted).
  """
  export.check_output_path(model_dir, overwrite=True)
  if not overwrite:
    if model_dir.exists():
      raise FileExistsError(f"{model_dir} holds a finished model; pass --overwrite to "
                            "start over, or another --out")
    return
  remove_run(out, RUN_ENTRIES, "a vitjax run", delete=delete)


def _add_process_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group(
      "multi-process run (one command per process, all with the same arguments; "
      "TPU pods and managed GPU clusters detect what is left out)")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="address of process 0, where the processes meet")
  g.add_argument("--num-processes", type=POSITIVE_INT, default=None)
  g.add_argument("--process-id", type=COUNT, default=None,
                 help="this process's index, 0..num-processes-1 (process 0 writes the "
                      "model and prints the report)")


def join_processes(args: argparse.Namespace) -> None:
  """Joins the multi-process run that `--coordinator`, `--num-processes` and
  `--process-id` name (`sharding.initialize_distributed`); nothing when none
  of the three is given.

  Raises:
    ValueError: `--process-id` is not below `--num-processes`, or `--process-id`
      comes without `--num-processes` (the id alone names no run).
  """
  given = (args.coordinator, args.num_processes, args.process_id)
  if all(v is None for v in given):
    return
  if args.process_id is not None and args.num_processes is None:
    raise ValueError(f"--process-id {args.process_id} needs --num-processes (and, on CPU "
                     "hosts, --coordinator)")
  if args.process_id is not None and args.process_id >= args.num_processes:
    raise ValueError(f"--process-id {args.process_id} is outside 0..{args.num_processes - 1} "
                     f"(--num-processes {args.num_processes})")
  sharding.initialize_distributed(*given)


def start_shared_run(out: pathlib.Path, overwrite: bool, model_dir: pathlib.Path) -> None:
  """`start_run` for every process of a run: each makes the checks (read-only,
  on the one shared directory, so a refusal stops every process alike rather
  than leaving some waiting at a barrier); then process 0 alone deletes under
  `overwrite`, and a barrier holds the others until it has, so no process
  looks for resumable state before it is settled."""
  start_run(out, overwrite, model_dir, delete=False)
  sharding.barrier(f"start_run-checked:{out}")
  if overwrite and sharding.is_writer():
    start_run(out, overwrite, model_dir)
  sharding.barrier(f"start_run-done:{out}")


def remove_run(out: pathlib.Path, entries: set[str], what: str, *,
               delete: bool = True) -> None:
  """Deletes the run directory `out` (for --overwrite), if it exists; only
  checks that it may when not `delete`.

  Raises:
    CheckpointError: `out` holds files other than `entries` (never deleted).
  """
  if out.is_dir():
    foreign = sorted(p.name for p in out.iterdir() if p.name not in entries)
    if foreign:
      raise export.CheckpointError(
          f"--overwrite would delete {out}, which holds {foreign[:5]} besides {what}; "
          "choose another --out")
    if delete:
      shutil.rmtree(out)


@dataclasses.dataclass(frozen=True)
class TrainData:
  """What `vitjax train` and `vitjax distill` train on and score: in RAM
  (`--dataset`) or streamed from an image folder (`--image-folder`)."""

  train: data_lib.Split | streaming.Stream
  test: evaluate.Scored
  num_classes: int
  image_shape: tuple[int, int, int]
  pixel_mean: tuple[float, ...]  # () when not computed
  pixel_std: tuple[float, ...]


FOLDER_ONLY = ("image_size", "skip_unreadable", "read_threads")


def _folder_data(args: argparse.Namespace, statistics: bool = True) -> TrainData:
  """`--image-folder DIR`: DIR/train and DIR/test indexed (nothing decoded
  yet), the same classes in both, and (with `statistics`; a student takes its
  teacher's instead) the pixel statistics of DIR/train.

  Raises:
    ValueError: in-RAM data flags beside it.
    DatasetError: a missing split, an empty class, an unreadable image
      (without --skip-unreadable), mixed sizes (without --image-size), or
      classes that differ between DIR/train and DIR/test.
  """
  clash = [flag for flag, used in (("--dataset", args.dataset != "fashion_mnist"),
                                   ("--data-dir", args.data_dir is not None),
                                   ("--num-classes", args.num_classes is not None),
                                   ("--hold-out-validation", args.hold_out_validation))
           if used]
  if clash:
    raise ValueError(f"--image-folder streams DIR/train and scores DIR/test; {clash[0]} "
                     "picks in-RAM data instead (give one or the other)")
  root = pathlib.Path(args.image_folder)
  unreadable = "skip" if args.skip_unreadable else "error"
  train_src = streaming.scan_folder(root / "train", image_size=args.image_size,
                                    on_unreadable=unreadable)
  test_src = streaming.scan_folder(root / "test", image_size=train_src.image_size,
                                   channels=train_src.channels, on_unreadable=unreadable)
  if test_src.classes != train_src.classes:
    raise data_lib.DatasetError(
        f"{root / 'test'} has classes {list(test_src.classes)[:8]}, {root / 'train'} "
        f"{list(train_src.classes)[:8]}; both need the same class directories")
  for src in (train_src, test_src):
    if src.skipped:
      print(f"skipped {len(src.skipped)} unreadable files of {src.root} "
            f"(e.g. {src.skipped[0]})")
  print(f"indexed {len(train_src)} training and {len(test_src)} test images of "
        f"{len(train_src.classes)} classes in {root}")
  mean = std = ()
  if statistics:
    print("computing the training images' pixel statistics")
    mean, std = streaming.folder_statistics(train_src)
  threads = args.read_threads or streaming.READ_THREADS
  return TrainData(streaming.Stream(train_src, num_threads=threads), test_src,
                   len(train_src.classes), train_src.image_shape, mean, std)


def _ram_data(args: argparse.Namespace, recipe: dict) -> TrainData:
  for name in FOLDER_ONLY:
    if getattr(args, name):
      raise ValueError(f"--{name.replace('_', '-')} applies to --image-folder data only")
  dataset = _load_data(args)
  images = recipes.recipe_images(recipe, dataset,
                                 hold_out_validation=args.hold_out_validation)
  return TrainData(images, dataset.test, dataset.num_classes, dataset.image_shape,
                   dataset.pixel_mean, dataset.pixel_std)


def cmd_train(args: argparse.Namespace) -> int:
  join_processes(args)
  init = export.load_model(recipes.model_dir_of(args.init)) if args.init else None
  if init is not None:
    recipe = recipes.TRANSFER_RECIPE
  else:
    name = recipes.cnn_preset(args.preset) if args.arch == "cnn" else args.preset
    recipe = recipes.teacher_recipe(name)
  data = _folder_data(args) if args.image_folder else _ram_data(args, recipe)
  if init is not None:
    config = init.config
    if config.num_classes != data.num_classes:
      raise ValueError(f"--init {args.init} has {config.num_classes} classes, the data "
                       f"{data.num_classes}; give it a new head first (vitjax import "
                       f"... --num-classes {data.num_classes})")
  else:
    config = recipes.fitted_config(name, data.num_classes, data.image_shape[-1],
                                   data.pixel_mean, data.pixel_std)
  _check_shape(data.image_shape, data.num_classes, config)
  images = data.train
  cfg = recipes.train_config(
      recipe, len(images), epochs=args.epochs, steps=args.steps,
      batch_size=args.batch_size, learning_rate=args.lr, patch_dropout=args.patch_dropout,
      seed=args.seed, fsdp=args.fsdp)
  run_dir = pathlib.Path(args.out)
  model_dir = run_dir / recipes.MODEL_DIR
  if args.overwrite or not model_dir.exists():
    start_shared_run(run_dir, args.overwrite, model_dir)
  if (model_dir / export.META_FILE).exists():
    print(f"reusing the finished run in {run_dir} if it was trained with these settings "
          "and data (--overwrite trains again)")
  else:
    if init:
      what = f"{args.init} ({adapt.describe(config)})"
    elif args.arch == "cnn":
      what = (f"{recipes.cnn_preset(args.preset)} CNN (stage widths {list(config.widths)}, "
              f"blocks {list(config.blocks)})")
    else:
      what = (f"{args.preset} ViT ({config.depth} blocks, dim {config.dim}, patch "
              f"{config.patch_size})")
    print(f"training {what} on {len(images)} images for {cfg.steps} steps of "
          f"{cfg.batch_size}; run directory {run_dir}")
  start = time.perf_counter()
  model = recipes.train_teacher(run_dir, config, images, cfg, seed=args.seed, init=init)
  print(f"took {time.perf_counter() - start:.0f} s")
  if sharding.is_writer():
    r = evaluate.report(model, data.test, disk_bytes=export.disk_bytes(model_dir),
                        choose_options=evaluate.fastest_options)
    print(evaluate.format_report("teacher [test]", r))
  return 0


def cmd_eval(args: argparse.Namespace) -> int:
  model_dir = recipes.model_dir_of(args.checkpoint)
  model = export.load_model(model_dir)
  dataset = _load_data(args)
  _check_data(dataset, model.config)
  split = getattr(dataset, args.split)
  r = evaluate.report(model, split, disk_bytes=export.disk_bytes(model_dir),
                      choose_options=evaluate.fastest_options)
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
    return quantize.static_int8(dataset.calibration.take(slice(0, calib)),
                                calibrator=calibrator,
                                exclude=exclude)
  raise ValueError(f"--method {method!r}; choose one of {QUANT_METHODS}")


def _compare_and_print(models: dict, test: evaluate.Scored, disk: dict[str, int],
                       reference: str) -> dict[str, evaluate.Report]:
  reports = evaluate.compare(models, test, disk_bytes=disk,
                             choose_options=evaluate.fastest_options)
  print(evaluate.format_table(reports, reference))
  for note in evaluate.speed_notes(reports, reference):
    print(note)
  return reports


def _check_data(dataset: data_lib.Dataset, config) -> None:
  """`check_compatible`, and a printed line for each thing done to the images."""
  _check_shape(dataset.image_shape, dataset.num_classes, config)


def _check_shape(image_shape: tuple[int, int, int], num_classes: int, config) -> None:
  data_lib.check_compatible(image_shape, num_classes, config)
  h, _, c = image_shape
  if h != config.image_size:
    print(f"note: the {h}x{h} images are resized (bilinear) to the model's "
          f"{config.image_size}x{config.image_size}")
  if c != config.channels:
    print(f"note: the {c}-channel images are repeated to the model's {config.channels} "
          "channels")


def _load_source(args: argparse.Namespace):
  model_dir = recipes.model_dir_of(args.checkpoint)
  model = export.load_model(model_dir)
  dataset = _load_data(args)
  _check_data(dataset, model.config)
  return model_dir, model, dataset


def _quantize_name(args: argparse.Namespace) -> str:
  if args.method:
    return args.method
  if args.policy:
    return pathlib.Path(args.policy).stem
  return f"{args.recipe}-w{args.w_bits or 8}a{args.a_bits or 8}"


def _quantize_transform(args: argparse.Namespace, dataset: data_lib.Dataset) -> Callable:
  """The transform of --method, --recipe or --policy."""
  if args.method:
    if args.w_bits or args.a_bits or args.layernorm_inputs:
      raise ValueError("--w-bits, --a-bits and --layernorm-inputs go with --recipe, not "
                       f"--method {args.method}")
    return quantizer(args.method, dataset, calib=args.calib, calibrator=args.calibrator,
                     exclude=args.exclude)
  if args.policy and (args.w_bits or args.a_bits or args.layernorm_inputs):
    raise ValueError("--w-bits, --a-bits and --layernorm-inputs go with --recipe; a "
                     "--policy file sets its own bits")
  if args.exclude:
    raise ValueError("--exclude applies to --method; with --recipe or --policy, keep "
                     "sites float with a rule {'kind': 'float'} in a policy file")
  if args.policy:
    policy = ptq.load_policy(args.policy)
  else:
    policy = ptq.recipe_policy(args.recipe, w_bits=args.w_bits or 8,
                               a_bits=args.a_bits or 8,
                               layernorm_inputs=args.layernorm_inputs)
  if not 1 <= args.calib <= len(dataset.calibration):
    raise ValueError(f"--calib {args.calib} is outside 1..{len(dataset.calibration)} "
                     "(the calibration split's size)")
  return ptq.ptq(policy, dataset.calibration.take(slice(0, args.calib)))


def cmd_quantize(args: argparse.Namespace) -> int:
  model_dir, model, dataset = _load_source(args)
  name = _quantize_name(args)
  out = pathlib.Path(args.out or f"{model_dir.parent}-{name}")
  export.check_output_path(out, args.overwrite)
  quantized = _quantize_transform(args, dataset)(model)
  disk = export.save_model(quantized, out, overwrite=args.overwrite,
                           metadata={"transform": name, "source": str(model_dir),
                                     "settings": vars_json(args)})
  print(f"wrote {out}")
  _compare_and_print({"fp32": model, name: quantized}, dataset.test,
                     {"fp32": export.disk_bytes(model_dir), name: disk}, "fp32")
  return 0


def _finetune(model, dataset: data_lib.Dataset, args: argparse.Namespace, out: pathlib.Path,
              post_update=None, desc: str = "fine-tune"):
  """`--finetune-steps` of fine-tuning that keeps the model's constraints
  (masks, factors); a resume must match every setting in `args`."""
  if args.finetune_steps == 0:
    return model
  return recipes.finetune(model, dataset.train, args.finetune_steps, out / recipes.TRAIN_DIR,
                          learning_rate=args.lr, post_update=post_update, name=desc,
                          run_info=vars_json(args))


def _save_and_compare(source_dir: pathlib.Path, source, result, name: str,
                      out: pathlib.Path, dataset: data_lib.Dataset, overwrite: bool,
                      metadata: dict) -> None:
  model_dir = out / recipes.MODEL_DIR
  disk = export.save_model(result, model_dir, overwrite=overwrite, metadata=metadata)
  print(f"wrote {model_dir}")
  _compare_and_print({"source": source, name: result}, dataset.test,
                     {"source": export.disk_bytes(source_dir), name: disk}, "source")


def cmd_prune(args: argparse.Namespace) -> int:
  model_dir, model, dataset = _load_source(args)
  out = pathlib.Path(args.out or f"{model_dir.parent}-prune-{args.method}")
  start_run(out, args.overwrite, out / recipes.MODEL_DIR)
  hook = None
  if args.method == "structured":
    transform = structured.heads_and_neurons(
        head_keep=args.head_keep, mlp_keep=args.mlp_keep, score=args.score,
        calibration=dataset.calibration if args.score == "taylor" else None)
  elif args.method == "nm":
    transform = prune.n_m(args.n, args.m, exclude=args.exclude)
  elif args.gradual:
    if args.finetune_steps < 2:
      raise ValueError("--gradual needs --finetune-steps >= 2 to raise the sparsity over")
    transform = prune.magnitude(0.0, exclude=args.exclude)
    end = max(1, int(args.finetune_steps * 0.75))
    hook = prune.gradual(args.sparsity, 0, end, every=max(1, end // 20),
                         scope="global" if args.method == "global" else "layer")
  else:
    transform = prune.magnitude(args.sparsity, exclude=args.exclude,
                                scope="global" if args.method == "global" else "layer")
  pruned = _finetune(transform(model), dataset, args, out, post_update=hook,
                     desc=f"prune-{args.method}")
  for layer, sparsity in prune.sparsity_report(pruned).items():
    print(f"  {layer}: {sparsity * 100:.1f}% pruned")
  _save_and_compare(model_dir, model, pruned, f"prune-{args.method}", out, dataset,
                    args.overwrite, {"transform": vars_json(args), "source": str(model_dir)})
  return 0


def cmd_lowrank(args: argparse.Namespace) -> int:
  model_dir, model, dataset = _load_source(args)
  out = pathlib.Path(args.out or f"{model_dir.parent}-lowrank")
  start_run(out, args.overwrite, out / recipes.MODEL_DIR)
  transform = lowrank.svd(
      rank=args.rank, energy=args.energy, param_budget=args.budget,
      calibration=dataset.calibration.images if args.data_aware else None,
      exclude=args.exclude)
  factored = _finetune(transform(model), dataset, args, out, desc="lowrank")
  _save_and_compare(model_dir, model, factored, "lowrank", out, dataset, args.overwrite,
                    {"transform": vars_json(args), "source": str(model_dir)})
  return 0


def cmd_distill(args: argparse.Namespace) -> int:
  join_processes(args)
  out = pathlib.Path(args.out)
  start_shared_run(out, args.overwrite, out / recipes.MODEL_DIR)
  teacher_dirs = [recipes.model_dir_of(t) for t in args.teacher]
  members = tuple(export.load_model(d) for d in teacher_dirs)
  teacher = members[0] if len(members) == 1 else members
  teacher_dir = teacher_dirs[0]
  if args.image_folder:
    if args.offline:
      raise ValueError(f"--offline {args.offline} caches the teacher's logits of images "
                       "held in RAM; a --image-folder stream is distilled from the online "
                       "teacher (drop --offline)")
    data = _folder_data(args, statistics=False)
  else:
    data = _ram_data(args, recipes.student_recipe(args.student_preset))
  for m in members:
    _check_shape(data.image_shape, data.num_classes, m.config)
  student_cfg = recipes.student_config(args.student_preset, members[0].config)
  cfg = distill.DistillConfig(
      ce=args.ce, soft=args.soft, hard=args.hard, feature=args.feature,
      attention=args.attention, temperature=args.T)
  images = data.train
  tcfg = recipes.student_train_config(args.student_preset, len(images),
                                      epochs=args.epochs, steps=args.steps,
                                      batch_size=args.batch_size, learning_rate=args.lr,
                                      patch_dropout=args.patch_dropout, seed=args.seed)
  cache = None
  if args.offline:
    cache = distill.cached_teacher(teacher, images, tcfg, out / "teacher_cache.npz",
                                   k=args.offline)
  history: dict[str, list] = {}
  def record(run: str):
    def on_step(step: int, metrics: dict[str, float]) -> None:
      for k in ("loss", "accuracy", "agreement"):
        if k in metrics:
          history.setdefault(f"{run}/{k}", []).append((step, metrics[k]))
    return on_step
  student = distill.fit_student(teacher, model_lib.init(student_cfg, args.seed),
                                images, tcfg, cfg, cache=cache,
                                workdir=out / recipes.TRAIN_DIR, on_step=record("distilled"))
  models = {"teacher": members[0], "student (distilled)": student}
  disk = {"teacher": export.disk_bytes(teacher_dir),
          "student (distilled)": export.save_model(
              student, out / recipes.MODEL_DIR, overwrite=args.overwrite,
              metadata={"distill": dataclasses.asdict(cfg), "train": tcfg.to_dict(),
                        "teacher": [str(d) for d in teacher_dirs]})}
  if args.baseline:
    alone = train.fit(model_lib.init(student_cfg, args.seed), images, tcfg,
                      workdir=out / "baseline" / recipes.TRAIN_DIR, run_name="baseline",
                      desc="no teacher", on_step=record("no teacher"))
    models["student (no teacher)"] = alone
    disk["student (no teacher)"] = export.save_model(
        alone, out / "baseline" / recipes.MODEL_DIR, overwrite=args.overwrite)
  if sharding.is_writer():
    png = plots.training_curves(history, out / "curves.png",
                                f"{args.student_preset} from {teacher_dir}")
    print(f"wrote {out / recipes.MODEL_DIR} and {png}")
    _compare_and_print(models, data.test, disk, "teacher")
  return 0


def cmd_survey(args: argparse.Namespace) -> int:
  settings = survey.Settings.quick_mode(args.preset) if args.quick else survey.Settings(
      preset=args.preset)
  overrides = {k: v for k, v in (("finetune_steps", args.finetune_steps),
                                 ("student_teacher", args.student_teacher),
                                 ("student_targets", args.student_targets),
                                 ("student_epochs", args.student_epochs),
                                 ("teacher_epochs", args.teacher_epochs),
                                 ("cnn_epochs", args.cnn_epochs),
                                 ("tune_seconds", args.tune_seconds)) if v is not None}
  settings = dataclasses.replace(settings, **overrides)
  out = pathlib.Path(args.out or ("checkpoints/survey-quick" if args.quick
                                  else "checkpoints/survey"))
  export.check_writable_directory(out)
  if args.overwrite and out.is_dir():
    # Every method and intermediate stage (e.g. student+structured) is built
    # again; finished teachers are kept (each is reused only if it was
    # trained with these settings and data).
    teachers = {pathlib.Path(args.teacher or out / "teacher").resolve(),
                pathlib.Path(args.cnn_teacher or out / survey.CNN_TEACHER).resolve()}
    for run in out.iterdir():
      is_run = (run / recipes.MODEL_DIR).is_dir() or (run / recipes.TRAIN_DIR).is_dir()
      if run.is_dir() and is_run and run.resolve() not in teachers:
        shutil.rmtree(run)
  results = survey.run(settings, out, dataset=_load_data(args), teacher_dir=args.teacher,
                       cnn_teacher_dir=args.cnn_teacher)
  print(survey.markdown(results))
  print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'pareto.png'}")
  return 0


TUNE_ENTRIES = {"history.jsonl", "sensitivity.json", "sensitivity.png", "allocation.json",
                "best_policy.json", "policy.json", "front.json", "front.png", "latency.jsonl",
                recipes.MODEL_DIR}


def _duration(text: str) -> float:
  """An argparse type: seconds from '90', '90s', '10m' or '1.5h' (> 0)."""
  units = {"s": 1.0, "m": 60.0, "h": 3600.0}
  number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
  try:
    seconds = float(number) * units[unit]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 10m or 1h")
  if not seconds > 0:
    raise argparse.ArgumentTypeError(f"{text!r} must be a positive duration")
  return seconds


def cmd_tune(args: argparse.Namespace) -> int:
  budget = tuner.Budget(max_drop=args.max_drop, max_bytes_ratio=args.max_bytes_ratio,
                        max_latency_ratio=args.max_latency_ratio, prefer=args.prefer)
  config = tuner.TuneConfig(
      menu=tuple(args.menu) if args.menu else space.DEFAULT_MENU, keeps=tuple(args.keeps),
      a_bits=args.a_bits,
      eval_images=args.eval_images, sensitivity_images=args.sensitivity_images,
      calibration=args.calib, time_budget_s=args.time_budget,
      search=search.SearchConfig(population=min(args.population, args.evals),
                                 evaluations=args.evals, seed=args.seed))
  model_dir, model, dataset = _load_source(args)
  out = pathlib.Path(args.out or f"{model_dir.parent}-tuned")
  if args.overwrite:
    remove_run(out, TUNE_ENTRIES, "a tuning run")
  result = tuner.tune(model, dataset, budget, out, config)
  print(f"wrote {out}/policy.json, {out}/model, front.json/png, sensitivity.json/png, "
        "history.jsonl")
  _compare_and_print({"fp32": model, "tuned": result.model}, dataset.test,
                     {"fp32": export.disk_bytes(model_dir),
                      "tuned": result.disk_bytes}, "fp32")
  return 0 if result.feasible else 1


def cmd_compress(args: argparse.Namespace) -> int:
  chosen = policy_lib.load(args.policy)
  model_dir, model, dataset = _load_source(args)
  out = pathlib.Path(args.out or f"{model_dir.parent}-{pathlib.Path(args.policy).stem}")
  export.check_output_path(out, args.overwrite)
  if not 1 <= args.calib <= len(dataset.calibration):
    raise ValueError(f"--calib {args.calib} is outside 1..{len(dataset.calibration)} "
                     "(the calibration split's size)")
  compressed = policy_lib.apply_policy(chosen, model,
                                       dataset.calibration.take(slice(0, args.calib)))
  disk = export.save_model(compressed, out, overwrite=args.overwrite,
                           metadata={"policy": policy_lib.to_dict(chosen),
                                     "source": str(model_dir)})
  print(f"wrote {out}")
  _compare_and_print({"fp32": model, "policy": compressed}, dataset.test,
                     {"fp32": export.disk_bytes(model_dir), "policy": disk}, "fp32")
  return 0


def _floats(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers")


def cmd_import(args: argparse.Namespace) -> int:
  out = pathlib.Path(args.out)
  export.check_output_path(out, args.overwrite)
  overrides = {k: v for k, v in (("num_heads", args.num_heads),
                                 ("pixel_mean", args.pixel_mean),
                                 ("pixel_std", args.pixel_std), ("gelu", args.gelu),
                                 ("norm_eps", args.norm_eps)) if v is not None}
  start = time.perf_counter()
  imported = convert.read(args.source, format=args.format, **overrides)
  model = imported.model
  print(f"read {args.source} as {imported.format}: {adapt.describe(model.config)}")
  for note in imported.notes:
    print(f"  note: {note}")
  if args.num_classes or args.image_size or args.channels:
    model = adapt.adapt(model, num_classes=args.num_classes, image_size=args.image_size,
                        channels=args.channels)
    print(f"adapted to {adapt.describe(model.config)}")
  size = export.save_model(model, out, overwrite=args.overwrite, metadata={
      "imported_from": str(args.source), "format": imported.format,
      "notes": list(imported.notes), "adapted": {
          "num_classes": args.num_classes, "image_size": args.image_size,
          "channels": args.channels}})
  print(f"wrote {out} ({size / 1e6:.2f} MB, {model_lib.param_count(model) / 1e6:.2f} M "
        f"parameters) in {time.perf_counter() - start:.1f} s")
  return 0


def cmd_export(args: argparse.Namespace) -> int:
  model_dir = recipes.model_dir_of(args.checkpoint)
  model = export.load_model(model_dir)
  run_dir = model_dir.parent if model_dir.name == recipes.MODEL_DIR else model_dir
  out = pathlib.Path(args.out or f"{run_dir}-stablehlo")
  batch = None if args.batch == "dynamic" else int(args.batch)
  start = time.perf_counter()
  signature = stablehlo.save(model, out, batch=batch, input_shape=args.input_shape,
                             input_dtype=args.input_dtype, platforms=args.platforms,
                             overwrite=args.overwrite)
  mlir = (out / stablehlo.MLIR).read_text()
  forward = stablehlo.load(out)
  images = stablehlo.random_images(signature, 2 if batch is None else batch)
  got = np.asarray(forward(images))
  want = np.asarray(jax.jit(stablehlo.inference_fn(model))(images))
  print(f"wrote {out} in {time.perf_counter() - start:.1f} s: input "
        f"{signature['input']['shape']} {signature['input']['dtype']}, platforms "
        f"{signature['platforms']}, {stablehlo.integer_dots(mlir)} integer dot_general ops, "
        f"{export.disk_bytes(out) / 1e6:.2f} MB; reloaded: max |logit difference| "
        f"{np.abs(got - want).max():.2e}")
  return 0


def _shape(text: str) -> tuple[int, ...]:
  try:
    shape = tuple(int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not HxWxC, e.g. 28x28x1")
  if len(shape) != 3 or min(shape) < 1:
    raise argparse.ArgumentTypeError(f"{text!r} is not HxWxC with positive sizes")
  return shape


def _batch(text: str) -> str:
  if text != "dynamic" and not (text.isdigit() and int(text) >= 1):
    raise argparse.ArgumentTypeError(f"{text!r} is neither a positive int nor 'dynamic'")
  return text


def vars_json(args: argparse.Namespace) -> dict:
  """The parsed arguments that shape a run's result, as JSON-ready metadata
  (not where it is written, nor how processes meet)."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
          if k not in NOT_RUN_SETTINGS}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="vitjax", description="Make Vision Transformers smaller and faster.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("import", help="convert a timm / Hugging Face / big_vision ViT "
                                    "into a vitjax checkpoint")
  p.add_argument("source", help="a .safetensors or .npz file, or a model directory "
                                "(with config.json); pickles (.bin/.pth/.pt) are refused")
  p.add_argument("--out", required=True, help="the vitjax model directory to write")
  p.add_argument("--format", default=None, choices=convert.FORMATS,
                 help="default: detected from the tensor names")
  p.add_argument("--num-heads", type=POSITIVE_INT, default=None,
                 help="attention heads (timm files do not say; default from config.json "
                      "or the architecture name, else width / 64)")
  p.add_argument("--pixel-mean", type=_floats, default=None, help="e.g. 0.485,0.456,0.406")
  p.add_argument("--pixel-std", type=_floats, default=None, help="e.g. 0.229,0.224,0.225")
  p.add_argument("--gelu", default=None, choices=GELUS)
  p.add_argument("--norm-eps", type=POSITIVE, default=None)
  p.add_argument("--num-classes", type=POSITIVE_INT, default=None,
                 help="replace the head by a zero one for this many classes")
  p.add_argument("--image-size", type=POSITIVE_INT, default=None,
                 help="resample the position embedding for this image size")
  p.add_argument("--channels", type=int, choices=[1, 3], default=None,
                 help="1: fold an RGB model to read grayscale exactly as gray-to-RGB")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(func=cmd_import)

  p = sub.add_parser("export", help="write a deployable StableHLO artifact (jax.export)")
  p.add_argument("checkpoint", help="a run directory or its model/ directory")
  p.add_argument("--format", default="stablehlo", choices=["stablehlo"])
  p.add_argument("--batch", type=_batch, default="dynamic",
                 help="a fixed batch size, or 'dynamic' (symbolic, the default)")
  p.add_argument("--input-shape", type=_shape, default=None,
                 help="raw image HxWxC (default: the model's); resized inside")
  p.add_argument("--input-dtype", default="uint8", choices=stablehlo.INPUT_DTYPES)
  p.add_argument("--platforms", nargs="+", default=None, choices=stablehlo.PLATFORMS,
                 help="lowering platforms (default: this machine's backend)")
  p.add_argument("--out", default=None, help="default: <checkpoint>-stablehlo")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(func=cmd_export)

  p = sub.add_parser("train", help="train a ViT or CNN teacher and report it")
  p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
  p.add_argument("--arch", default="vit", choices=list(ARCHS),
                 help="vit: the preset's ViT; cnn: the preset's ResNet teacher "
                      "(recipes.CNN_PRESETS, DeiT's convnet teacher)")
  p.add_argument("--epochs", type=POSITIVE, default=None, help="default: the preset's recipe")
  p.add_argument("--steps", type=POSITIVE_INT, default=None, help="overrides --epochs")
  p.add_argument("--batch-size", type=POSITIVE_INT, default=None)
  p.add_argument("--lr", type=POSITIVE, default=None, help="peak learning rate")
  p.add_argument("--patch-dropout", type=FRACTION_OPEN_TOP, default=None,
                 help="fraction of patch tokens each training image drops, in [0, 1) "
                      "(default: the preset's recipe)")
  p.add_argument("--init", default=None,
                 help="start from this saved model (e.g. from `vitjax import`) instead of "
                      "the preset's random init; trains with the transfer recipe "
                      "(recipes.TRANSFER_RECIPE) unless overridden")
  p.add_argument("--seed", type=COUNT, default=0)
  p.add_argument("--fsdp", action="store_true", help="shard params over devices")
  p.add_argument("--hold-out-validation", action="store_true",
                 help="train on the training split only (the tiny recipe also trains on "
                      "the validation images, so `eval --split validation` would score "
                      "seen images)")
  p.add_argument("--out", default="checkpoints/teacher",
                 help="run directory: model/ and resumable train/ state")
  p.add_argument("--overwrite", action="store_true",
                 help="delete an earlier run in --out (finished or not) and train anew")
  _add_process_args(p)
  _add_data_args(p)
  _add_folder_args(p)
  p.set_defaults(func=cmd_train)

  p = sub.add_parser("eval", help="measure a saved model")
  p.add_argument("checkpoint", help="a run directory or its model/ directory")
  p.add_argument("--split", default="test", choices=["test", "validation"],
                 help="the tiny teacher recipe also trains on the validation images")
  p.add_argument("--json", action="store_true", help="also print the figures as JSON")
  _add_data_args(p)
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser("quantize", help="quantize a saved model with AQT and compare it")
  p.add_argument("checkpoint", help="a run directory or its model/ directory")
  how = p.add_mutually_exclusive_group(required=True)
  how.add_argument("--method", choices=QUANT_METHODS,
                   help="linear layers only: weight-only, dynamic or static int8")
  how.add_argument("--recipe", help="every matmul's inputs and weights: one of "
                   f"{', '.join(ptq.SITE_RECIPES)}, optionally '+gptq' (or gptq alone)")
  how.add_argument("--policy", help="a JSON policy file (see vitjax.transforms.ptq)")
  p.add_argument("--w-bits", type=BITS, default=None,
                 help="weight bits of --recipe (2..8; default 8)")
  p.add_argument("--a-bits", type=BITS, default=None,
                 help="activation bits of --recipe (2..8; default 8)")
  p.add_argument("--layernorm-inputs", action="store_true",
                 help="--recipe also quantizes every LayerNorm's input")
  p.add_argument("--calib", type=POSITIVE_INT, default=1024,
                 help="calibration images for static-int8, --recipe and --policy "
                 "(from the training split)")
  p.add_argument("--calibrator", default="percentile", choices=uniform.METHODS)
  p.add_argument("--exclude", nargs="*", default=(),
                 help="regex patterns of layers to keep in float, e.g. embedding head")
  p.add_argument("--out", default=None, help="default: <run dir>-<method>")
  p.add_argument("--overwrite", action="store_true")
  _add_data_args(p)
  p.set_defaults(func=cmd_quantize)

  p = sub.add_parser("prune", help="prune a saved model, fine-tune it and compare")
  p.add_argument("checkpoint", help="a run directory or its model/ directory")
  p.add_argument("--method", required=True, choices=["magnitude", "global", "nm", "structured"],
                 help="magnitude: per layer; global: one threshold; nm: N:M; structured: "
                      "remove heads and MLP neurons")
  p.add_argument("--sparsity", type=FRACTION_OPEN_TOP, default=0.5,
                 help="magnitude/global, in [0, 1)")
  p.add_argument("--gradual", action="store_true",
                 help="raise the sparsity along a cubic schedule during fine-tuning")
  p.add_argument("--n", type=POSITIVE_INT, default=2)
  p.add_argument("--m", type=POSITIVE_INT, default=4)
  p.add_argument("--head-keep", type=FRACTION_KEPT, default=0.75, help="structured: fraction kept")
  p.add_argument("--mlp-keep", type=FRACTION_KEPT, default=0.5, help="structured: fraction kept")
  p.add_argument("--score", default="l2", choices=structured.SCORES)
  _add_compress_args(p, ("embedding", "head"), "<source>-prune-<method>")
  p.set_defaults(func=cmd_prune)

  p = sub.add_parser("lowrank", help="factorize a saved model by SVD, fine-tune, compare")
  p.add_argument("checkpoint", help="a run directory or its model/ directory")
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument("--rank", type=POSITIVE_INT)
  group.add_argument("--energy", type=FRACTION_KEPT, help="fraction of spectral energy kept")
  group.add_argument("--budget", type=FRACTION_OPEN, help="fraction of linear parameters kept")
  p.add_argument("--data-aware", action="store_true",
                 help="whiten by calibration activations before the SVD")
  _add_compress_args(p, ("embedding", "head(_dist)?"), "<source>-lowrank")
  p.set_defaults(func=cmd_lowrank)

  p = sub.add_parser("distill", help="distill a student from a saved teacher")
  p.add_argument("--teacher", required=True, nargs="+",
                 help="the teacher's run or model directory (a ViT, or a CNN from "
                      "`vitjax train --arch cnn`); several: an ensemble (mean "
                      "log-probabilities); the table compares against the first")
  p.add_argument("--student-preset", default="tiny-student", choices=sorted(PRESETS))
  p.add_argument("--hard", type=WEIGHT, default=0.5, help="weight of DeiT hard-label loss")
  p.add_argument("--soft", type=WEIGHT, default=0.0, help="weight of soft KL (use with --T)")
  p.add_argument("--T", type=POSITIVE, default=1.0, help="temperature of the soft loss")
  p.add_argument("--ce", type=WEIGHT, default=0.5, help="weight of the true-label loss")
  p.add_argument("--feature", type=WEIGHT, default=0.0, help="weight of feature MSE")
  p.add_argument("--attention", type=WEIGHT, default=0.0, help="weight of attention KL")
  p.add_argument("--offline", type=COUNT, default=0, metavar="K",
                 help="cache the teacher's top-K logits once and train from the cache")
  p.add_argument("--baseline", action="store_true",
                 help="also train the same student without a teacher, same steps")
  p.add_argument("--epochs", type=POSITIVE, default=None)
  p.add_argument("--steps", type=POSITIVE_INT, default=None)
  p.add_argument("--batch-size", type=POSITIVE_INT, default=None)
  p.add_argument("--lr", type=POSITIVE, default=None)
  p.add_argument("--patch-dropout", type=FRACTION_OPEN_TOP, default=None,
                 help="fraction of the student's patch tokens each training image drops, "
                      "in [0, 1) (default: the recipe's)")
  p.add_argument("--seed", type=COUNT, default=0)
  p.add_argument("--hold-out-validation", action="store_true",
                 help="distill on the training split only (the tiny-student recipe also "
                      "uses the validation images)")
  p.add_argument("--out", default="checkpoints/student")
  p.add_argument("--overwrite", action="store_true")
  _add_process_args(p)
  _add_data_args(p)
  _add_folder_args(p)
  p.set_defaults(func=cmd_distill)

  p = sub.add_parser("tune", help="search the best compression policy under a size / "
                     "accuracy / latency budget (auto-tuner)")
  p.add_argument("checkpoint", help="a run directory or its model/ directory (uncompressed)")
  p.add_argument("--max-drop", type=WEIGHT, default=None,
                 help="validation accuracy drop allowed, in points")
  p.add_argument("--max-bytes-ratio", type=FRACTION_KEPT, default=None,
                 help="stored bytes allowed, as a fraction of the fp32 model's")
  p.add_argument("--max-latency-ratio", type=POSITIVE, default=None,
                 help="batch-1 latency allowed, as a fraction of the fp32 model's (measured)")
  p.add_argument("--prefer", default=None, choices=["smallest", "most-accurate"],
                 help="which policy meeting the budget wins (default: smallest with "
                      "--max-drop, else most-accurate)")
  p.add_argument("--time-budget", type=_duration, default=None,
                 help="score no new policy after this long, e.g. 10m, counted from the "
                      "start (the front so far is used)")
  p.add_argument("--evals", type=POSITIVE_INT, default=96,
                 help="policies the search evaluates (a resumed run counts earlier ones)")
  p.add_argument("--population", type=_number(int, 4), default=16)
  p.add_argument("--seed", type=COUNT, default=0)
  p.add_argument("--menu", nargs="+", default=None,
                 help="per-layer settings to search, e.g. fp32 w8 w4 2:4+w8 50%%+w4 r0.5+w8 "
                      "(default: vitjax.tune.space.DEFAULT_MENU)")
  p.add_argument("--keeps", nargs="*", type=FRACTION_OPEN, default=[0.75, 0.5],
                 help="structured keep ratios per block for heads and neurons (none: off)")
  p.add_argument("--a-bits", type=BITS, default=None,
                 help="static activation bits at every layer input (default: float)")
  p.add_argument("--eval-images", type=POSITIVE_INT, default=5000,
                 help="validation images every policy is scored on")
  p.add_argument("--sensitivity-images", type=POSITIVE_INT, default=1000)
  p.add_argument("--calib", type=POSITIVE_INT, default=256,
                 help="training images for activation ranges and Hessian traces")
  p.add_argument("--out", default=None, help="default: <run dir>-tuned (resumed if present)")
  p.add_argument("--overwrite", action="store_true", help="start the search over")
  _add_data_args(p)
  p.set_defaults(func=cmd_tune)

  p = sub.add_parser("compress", help="apply a compression policy file (from vitjax tune, "
                     "or written by hand) to a saved model and compare")
  p.add_argument("checkpoint", help="a run directory or its model/ directory (uncompressed)")
  p.add_argument("--policy", required=True, help="a policy JSON file (vitjax.tune.policy)")
  p.add_argument("--calib", type=POSITIVE_INT, default=256,
                 help="training images for activation ranges")
  p.add_argument("--out", default=None, help="default: <run dir>-<policy file stem>")
  p.add_argument("--overwrite", action="store_true")
  _add_data_args(p)
  p.set_defaults(func=cmd_compress)

  p = sub.add_parser("survey", help="the main job: every method and combination compared")
  p.add_argument("--preset", default="tiny", choices=sorted(recipes.TEACHER_RECIPES))
  p.add_argument("--quick", action="store_true",
                 help="smoke run with a few steps per stage (checks the plumbing)")
  p.add_argument("--teacher", default=None,
                 help="run directory of a trained teacher (default <out>/teacher)")
  p.add_argument("--cnn-teacher", default=None,
                 help="run directory of a trained CNN teacher (default <out>/cnn-teacher)")
  p.add_argument("--student-teacher", default=None, choices=list(survey.STUDENT_TEACHERS),
                 help="who teaches the student row (default: Settings.student_teacher)")
  p.add_argument("--student-targets", default=None, choices=list(survey.TARGETS),
                 help="hard or soft distillation targets (default: Settings.student_targets)")
  p.add_argument("--finetune-steps", type=COUNT, default=None)
  p.add_argument("--student-epochs", type=POSITIVE, default=None)
  p.add_argument("--teacher-epochs", type=POSITIVE, default=None)
  p.add_argument("--cnn-epochs", type=POSITIVE, default=None)
  p.add_argument("--tune-seconds", type=POSITIVE, default=None,
                 help="time budget of the tuned row (default: Settings.tune_seconds)")
  p.add_argument("--out", default=None,
                 help="default checkpoints/survey (checkpoints/survey-quick with --quick)")
  p.add_argument("--overwrite", action="store_true",
                 help="build every method anew (their resumable states too); the teacher "
                      "is kept if it was trained with these settings")
  _add_data_args(p)
  p.set_defaults(func=cmd_survey)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, OSError, data_lib.DatasetError, export.CheckpointError,
          convert.ConversionError) as e:
    print(f"vitjax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
