"""Tuned training recipes per preset, and train-or-reuse of a teacher run.

A run directory holds `model/` (the exported model, see `vitjax.export`) and
`train/` (the resumable orbax training state); `train_teacher` reuses a
finished `model/`, resumes an interrupted `train/`, or starts fresh.
"""

from __future__ import annotations

import pathlib
from typing import Any

from vitjax import data as data_lib
from vitjax import export
from vitjax import model as model_lib
from vitjax import streaming, train
from vitjax.model import Model
from vitjax.models.arch import Config
from vitjax.models.cnn import CNN_PRESETS as CNN_PRESETS_BY_NAME
from vitjax.models.config import ViTConfig, preset

MODEL_DIR = "model"
TRAIN_DIR = "train"

# Per preset: the epochs, optimizer settings and training images of the teacher
# recipe. `with_validation` trains on the held-out validation images too: the
# final fit of a recipe that was chosen on them.
TEACHER_RECIPES: dict[str, dict[str, Any]] = {
    # Tuned on Fashion-MNIST on a 2-core CPU (see README, "Teacher recipe"): past
    # ~6 epochs the model overfits unless label smoothing and weight decay hold it;
    # the moving average of the weights gave +0.3 pt at seed 0. Patch dropout
    # (each training image keeps a random 6 of its 16 patch tokens) makes a step
    # 2.5x cheaper and regularizes: 21 such epochs beat 9 full ones in less time.
    "tiny": dict(epochs=21.0, batch_size=128, learning_rate=1e-3, warmup_steps=100,
                 weight_decay=0.1, label_smoothing=0.1, ema_decay=0.999,
                 patch_dropout=0.625, with_validation=True),
    "s16": dict(epochs=10.0, batch_size=256, learning_rate=1e-3, warmup_steps=500,
                weight_decay=0.05, label_smoothing=0.1, crop_pad=2, flip=True),
    "b16": dict(epochs=10.0, batch_size=256, learning_rate=5e-4, warmup_steps=500,
                weight_decay=0.05, label_smoothing=0.1, crop_pad=2, flip=True),
}


# The convolutional teacher per preset (`vitjax train --arch cnn`) and its
# recipe. Trained on the training split only (validation held out, so the
# distillation recipes that use it are chosen on unseen images). Crops and
# flips; XLA's CPU convolutions make an epoch ~2.5x a ViT-teacher epoch here,
# so the schedule is short (experiments/distill_cnn_teacher.py). Its step
# compiles with YNNPACK fusions off: 1.26x faster on the 2-core EPYC, same
# arithmetic (see TrainConfig.xla_cpu, benchmarks/train_options.py). No label
# smoothing: it is a teacher, and a smoothed teacher distills worse (Müller et
# al. 2019). experiments/distill_teacher_smoothing.py, validation: the teacher
# 90.36% without smoothing against 90.80% with 0.1, but its soft-distilled
# student 90.82% against 89.76% (89.42% without a teacher).
CNN_PRESETS = {"tiny": "tiny-cnn"}
CNN_TEACHER_RECIPES: dict[str, dict[str, Any]] = {
    "tiny-cnn": dict(epochs=6.0, batch_size=128, learning_rate=2e-3, warmup_steps=200,
                     weight_decay=0.05, label_smoothing=0.0, crop_pad=2, flip=True,
                     xla_cpu="ynn-off"),
}


# Fine-tuning a model from elsewhere (`vitjax train --init`): short, held-out
# validation kept unseen for choosing; the zero head learns from the first step.
TRANSFER_RECIPE: dict[str, Any] = dict(epochs=1.0, batch_size=64, learning_rate=5e-4,
                                       warmup_steps=50, weight_decay=0.05,
                                       label_smoothing=0.1)


STUDENT_PRESETS = {"tiny": "tiny-student", "s16": "ti16-student", "b16": "ti16-student"}

# Distillation recipes per student preset (offline cache of the teacher's logits).
STUDENT_RECIPES: dict[str, dict[str, Any]] = {
    # 9 epochs on all 60k images: 89.30% against the 90.11% teacher, 89.35% against
    # the earlier 90.06% one (6 epochs on 55k: 88.66%; a weight average did not
    # help here: 88.59%; patch dropout at equal time neither: 88.98% at 0.5).
    "tiny-student": dict(epochs=9.0, batch_size=128, learning_rate=2e-3, warmup_steps=100,
                         weight_decay=0.05, label_smoothing=0.0, with_validation=True),
    "ti16-student": dict(epochs=30.0, batch_size=256, learning_rate=1e-3, warmup_steps=1000,
                         weight_decay=0.05, label_smoothing=0.0, crop_pad=2, flip=True,
                         augment_views=10),
}


def model_config(preset_name: str, dataset: data_lib.Dataset) -> Config:
  """The preset's config (a ViT preset, or a CNN one of `cnn.CNN_PRESETS`)
  fitted to the data: its classes, its pixel statistics, and its channels (a
  1-channel dataset may feed a 3-channel preset)."""
  return fitted_config(preset_name, dataset.num_classes, dataset.image_shape[-1],
                       dataset.pixel_mean, dataset.pixel_std)


def fitted_config(preset_name: str, num_classes: int, channels: int,
                  pixel_mean: tuple[float, ...], pixel_std: tuple[float, ...]) -> Config:
  """`model_config` from the data's figures alone (e.g. a streamed image
  folder's classes, channels and `streaming.folder_statistics`)."""
  if preset_name in CNN_PRESETS_BY_NAME:
    cfg = CNN_PRESETS_BY_NAME[preset_name].replace(num_classes=num_classes)
  else:
    cfg = preset(preset_name, num_classes=num_classes)
  if channels != cfg.channels and channels != 1:
    cfg = cfg.replace(channels=channels)
  return cfg.replace(pixel_mean=pixel_mean, pixel_std=pixel_std)


def student_config(student_preset: str, teacher: Config) -> ViTConfig:
  """The student preset's config taking the teacher's input: its classes, image
  size, channels and pixel statistics."""
  return preset(student_preset, num_classes=teacher.num_classes, channels=teacher.channels,
                image_size=teacher.image_size, pixel_mean=teacher.pixel_mean,
                pixel_std=teacher.pixel_std)


def train_config(recipe: dict[str, Any], n_train: int, *, epochs: float | None = None,
                 steps: int | None = None, **overrides: Any) -> train.TrainConfig:
  """A recipe as a TrainConfig; `steps` wins over `epochs`, None overrides are
  ignored; warmup is cut to a tenth of the steps and the weight-average decay
  to a horizon of a quarter of them."""
  recipe = dict(recipe)
  recipe_epochs = recipe.pop("epochs")
  recipe.pop("with_validation", None)
  recipe.update({k: v for k, v in overrides.items() if v is not None})
  if steps is None:
    steps = train.steps_for_epochs(epochs or recipe_epochs, n_train, recipe["batch_size"])
  recipe["warmup_steps"] = min(recipe["warmup_steps"], steps // 10)
  if recipe.get("ema_decay"):
    # A short run (a quick survey, --steps) averages over its last quarter
    # instead of staying near the initial weights: the horizon 1 / (1 - decay)
    # is at most steps / 4.
    recipe["ema_decay"] = min(recipe["ema_decay"], max(0.0, 1.0 - 4.0 / steps))
  return train.TrainConfig(steps=steps, **recipe)


def _recipe(recipes: dict[str, dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
  if name not in recipes:
    raise ValueError(f"preset {name!r} has no {kind} recipe; the presets with one are "
                     f"{sorted(recipes)} (give the steps and optimizer settings yourself, "
                     "or add a recipe to vitjax.recipes)")
  return recipes[name]


def teacher_recipe(preset_name: str) -> dict[str, Any]:
  """The teacher recipe of a preset (ViT or CNN).

  Raises:
    ValueError: the preset has none (no silent fallback to another preset's).
  """
  return _recipe({**TEACHER_RECIPES, **CNN_TEACHER_RECIPES}, preset_name, "teacher")


def cnn_preset(preset_name: str) -> str:
  """The CNN teacher preset that goes with a ViT preset.

  Raises:
    ValueError: the preset has no CNN teacher.
  """
  if preset_name not in CNN_PRESETS:
    raise ValueError(f"preset {preset_name!r} has no CNN teacher; the presets with one are "
                     f"{sorted(CNN_PRESETS)}")
  return CNN_PRESETS[preset_name]


def teacher_train_config(preset_name: str, n_train: int, **kwargs: Any) -> train.TrainConfig:
  """The teacher recipe of a preset as a TrainConfig (see `train_config`)."""
  return train_config(teacher_recipe(preset_name), n_train, **kwargs)


def recipe_images(recipe: dict[str, Any], dataset: data_lib.Dataset, *,
                  hold_out_validation: bool = False) -> data_lib.Split:
  """The images a recipe trains on: the training split, followed by the
  validation split where the recipe says `with_validation` unless
  `hold_out_validation` keeps it unseen."""
  if recipe.get("with_validation", False) and not hold_out_validation:
    return dataset.train.concat(dataset.validation)
  return dataset.train


def teacher_images(preset_name: str, dataset: data_lib.Dataset, *,
                   hold_out_validation: bool = False) -> data_lib.Split:
  """The images a preset's teacher trains on (see `recipe_images`)."""
  return recipe_images(teacher_recipe(preset_name), dataset,
                       hold_out_validation=hold_out_validation)


def student_recipe(student_preset: str) -> dict[str, Any]:
  """The distillation recipe of a student preset.

  Raises:
    ValueError: the preset has none.
  """
  return _recipe(STUDENT_RECIPES, student_preset, "distillation")


def student_images(student_preset: str, dataset: data_lib.Dataset, *,
                   hold_out_validation: bool = False) -> data_lib.Split:
  """The images a student preset distills on (see `recipe_images`)."""
  return recipe_images(student_recipe(student_preset), dataset,
                       hold_out_validation=hold_out_validation)


def student_train_config(student_preset: str, n_train: int, **kwargs: Any
                         ) -> train.TrainConfig:
  """The distillation recipe of a student preset (see `train_config`)."""
  return train_config(student_recipe(student_preset), n_train, **kwargs)


def finetune_config(n_train: int, steps: int, *, learning_rate: float = 3e-4,
                    batch_size: int = 128, seed: int = 0) -> train.TrainConfig:
  """Short fine-tune after compression: constant-ish low LR, brief warmup."""
  return train.TrainConfig(steps=steps, batch_size=min(batch_size, n_train),
                           learning_rate=learning_rate, warmup_steps=min(20, steps // 10),
                           end_lr_ratio=0.1, weight_decay=0.0, label_smoothing=0.0,
                           seed=seed)


def finetune(model: Model, split: data_lib.Split, steps: int, workdir: str | pathlib.Path,
             *, learning_rate: float = 3e-4, post_update: train.PostUpdate | None = None,
             name: str = "fine-tune", progress: bool = True,
             run_info: dict[str, Any] | None = None) -> Model:
  """`steps` of `finetune_config` training on `split`, resumable in `workdir`;
  the model's constraints (masks, factors, QAT) hold after every step."""
  cfg = finetune_config(len(split), steps, learning_rate=learning_rate)
  return train.fit(model, split, cfg, workdir=workdir, post_update=post_update,
                   progress=progress, run_name=name, desc=name, run_info=run_info)


def train_teacher(run_dir: str | pathlib.Path, config: Config,
                  images: data_lib.Split | streaming.Stream, cfg: train.TrainConfig, *,
                  seed: int = 0, progress: bool = True, init: Model | None = None) -> Model:
  """Returns the trained model of `run_dir`, training (or resuming) it on
  `images` (in RAM, or streamed from an image folder) if needed, from `init`
  (e.g. an imported model) or a random init.

  A finished `run_dir/model` is reused only when it was trained with the same
  config, training settings, initial seed or weights, and images (recorded in
  its metadata).

  Raises:
    ValueError: `run_dir` holds a model trained otherwise (the message names
      what differs); delete the run or use another directory.
  """
  run_dir = pathlib.Path(run_dir)
  model_dir = run_dir / MODEL_DIR
  recipe = {"train": cfg.recipe_dict(), "seed": seed,
            "data": train.data_fingerprint(images)}
  if init is not None:
    if init.config != config:
      raise ValueError("init's config differs from the run's config")
    recipe["init"] = train.fingerprint(init.params)
  if (model_dir / export.META_FILE).exists():
    saved = export.read_metadata(model_dir)["metadata"]
    diffs = [k for k in recipe if saved.get(k) != recipe[k]]
    if diffs:
      raise ValueError(f"{model_dir} was trained with other {', '.join(diffs)} than this "
                       f"run asks for; delete {run_dir} (`vitjax train --overwrite` does; "
                       "`vitjax survey --overwrite` keeps teachers) or use another directory")
    return export.load_model(model_dir, expect_config=config)
  start = init if init is not None else model_lib.init(config, seed)
  trained = train.fit(start, images, cfg,
                      workdir=run_dir / TRAIN_DIR, progress=progress,
                      run_name="teacher", desc="teacher")
  export.save_model(trained, model_dir, metadata=recipe, overwrite=True)
  return trained


def model_dir_of(path: str | pathlib.Path) -> pathlib.Path:
  """Accepts a run directory or a model directory; returns the model directory."""
  path = pathlib.Path(path)
  if (path / MODEL_DIR / export.META_FILE).exists():
    return path / MODEL_DIR
  return path
