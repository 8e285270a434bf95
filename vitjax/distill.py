"""Distillation losses and the teacher -> student objective.

Losses are pure functions of logits / features, each checked against a hand
computation in the tests:

  soft_kl(s, t, T)          T^2 * KL(softmax(t / T) || softmax(s / T)), batch mean;
  soft_kl_topk(s, v, i, T)  the same against a teacher known only by its top-k
                            logits `v` at class indices `i` (offline cache);
  hard_label(s, t)          cross-entropy of s against argmax(t) (DeiT hard);
  feature_mse(s, t, proj)   MSE between student tokens (projected to the
                            teacher's width when they differ) and teacher tokens;
  attention_kl(s, t)        KL between head-averaged patch-to-patch attention maps.

`DistillConfig` weights them into one objective; `objective` builds the
`train.LossFn` whose auxiliary input is the frozen teacher (its forward runs in
the same jit, under `stop_gradient`) or an offline `TeacherCache`.

A teacher is any frozen function of images to logits a `Model` holds: a
ViT/DeiT, or the ResNet of `vitjax.models.cnn` (DeiT's convnet teacher), or a
tuple of such models, an ensemble whose log-probabilities are averaged
(`teacher_logits`). Feature and attention terms need a single ViT teacher.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vitjax import data as data_lib
from vitjax import model as model_lib
from vitjax import progress as progress_lib
from vitjax import sharding
from vitjax import train as train_lib
from vitjax.model import Model
from vitjax.models.arch import Config
from vitjax.models.inputs import preprocess
from vitjax.models.config import ViTConfig
from vitjax.losses import cross_entropy
from vitjax.train import Batch, Metrics


def _check_temperature(t: float) -> None:
  if not t > 0:
    raise ValueError(f"temperature T={t} must be > 0")


def soft_kl(student: jax.Array, teacher: jax.Array, temperature: float = 1.0) -> jax.Array:
  """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the batch."""
  _check_temperature(temperature)
  log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return temperature ** 2 * kl.mean()


def soft_kl_topk(student: jax.Array, values: jax.Array, indices: jax.Array,
                 temperature: float = 1.0) -> jax.Array:
  """`soft_kl` against a teacher given by its top-k logits only.

  The teacher distribution is the softmax of its k logits (zero elsewhere);
  with k = number of classes this equals `soft_kl` exactly.
  """
  _check_temperature(temperature)
  log_p = jax.nn.log_softmax(values / temperature, axis=-1)
  log_q = jnp.take_along_axis(jax.nn.log_softmax(student / temperature, axis=-1),
                              indices, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return temperature ** 2 * kl.mean()


def hard_label(student: jax.Array, teacher_labels: jax.Array) -> jax.Array:
  """Cross-entropy of the student against the teacher's hard decisions."""
  return cross_entropy(student, teacher_labels)


def feature_mse(student: jax.Array, teacher: jax.Array,
                projection: jax.Array | None = None) -> jax.Array:
  """Mean squared error of (B, T, ds) student tokens, projected by a (ds, dt)
  matrix when the widths differ, against (B, T, dt) teacher tokens."""
  if projection is not None:
    student = student @ projection
  if student.shape != teacher.shape:
    raise ValueError(f"feature shapes differ: student {student.shape}, teacher "
                     f"{teacher.shape}; pass a projection of shape "
                     f"({student.shape[-1]}, {teacher.shape[-1]})")
  return jnp.mean((student - teacher) ** 2)


def attention_kl(student: jax.Array, teacher: jax.Array, s_prefix: int, t_prefix: int,
                 eps: float = 1e-8) -> jax.Array:
  """KL(teacher || student) of head-averaged patch-to-patch attention rows.

  Args:
    student, teacher: (B, heads, T, T) attention probabilities (head counts
      may differ; token counts may differ only in their prefix tokens).
    s_prefix, t_prefix: how many class/distillation tokens lead each sequence.
  """
  def patch_rows(a: jax.Array, prefix: int) -> jax.Array:
    a = a.mean(axis=1)[:, prefix:, prefix:]
    return a / (a.sum(-1, keepdims=True) + eps)
  p, q = patch_rows(teacher, t_prefix), patch_rows(student, s_prefix)
  if p.shape != q.shape:
    raise ValueError(f"attention maps differ in patches: student {q.shape}, teacher {p.shape}")
  return jnp.mean(jnp.sum(p * (jnp.log(p + eps) - jnp.log(q + eps)), axis=-1))


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Weights of the distillation objective's terms.

  Attributes:
    ce: cross-entropy with the true label (on the class head of a DeiT).
    soft: `soft_kl` at `temperature` (on the distillation head of a DeiT).
    hard: `hard_label` (on the distillation head of a DeiT).
    feature: `feature_mse` over `feature_pairs` (student block, teacher block).
    attention: `attention_kl` over `attention_pairs`.
    temperature: T of the soft term.
    label_smoothing: of the ce term.
  """

  ce: float = 0.5
  soft: float = 0.0
  hard: float = 0.5
  feature: float = 0.0
  attention: float = 0.0
  temperature: float = 1.0
  label_smoothing: float = 0.0
  feature_pairs: tuple[tuple[int, int], ...] = ((-1, -1),)
  attention_pairs: tuple[tuple[int, int], ...] = ((-1, -1),)

  def __post_init__(self) -> None:
    weights = {k: getattr(self, k) for k in ("ce", "soft", "hard", "feature", "attention")}
    negative = {k: v for k, v in weights.items() if v < 0}
    if negative:
      raise ValueError(f"distillation weights must be >= 0, got {negative}")
    if not any(weights.values()):
      raise ValueError("all distillation weights are zero; give at least one positive weight")
    if weights["ce"] and not any(v for k, v in weights.items() if k != "ce"):
      raise ValueError("only the ce weight is positive: that is training without a teacher")
    _check_temperature(self.temperature)
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"label_smoothing={self.label_smoothing} is outside [0, 1)")

  @property
  def needs_intermediates(self) -> bool:
    return bool(self.feature or self.attention)


Teacher = Any  # a Model, or a tuple of Models (an ensemble)


def members(teacher: Teacher) -> tuple[Model, ...]:
  """The models of a teacher: itself, or the members of an ensemble.

  Raises:
    ValueError: an empty ensemble, or members that are not Models.
  """
  models = tuple(teacher) if isinstance(teacher, (tuple, list)) else (teacher,)
  if not models:
    raise ValueError("the teacher ensemble is empty; give at least one model")
  bad = [type(m).__name__ for m in models if not isinstance(m, Model)]
  if bad:
    raise ValueError(f"a teacher must be a vitjax Model (ViT or CNN) or a tuple of them, "
                     f"got {bad}")
  return models


def teacher_logits(teacher: Teacher, images: jax.Array) -> jax.Array:
  """The teacher's logits on preprocessed `images`; an ensemble's are the mean
  of its members' log-probabilities (the log of their geometric mean, up to a
  constant per image, which no loss here sees)."""
  models = members(teacher)
  if len(models) == 1:
    return model_lib.apply(models[0], images)
  return sum(jax.nn.log_softmax(model_lib.apply(m, images), axis=-1)
             for m in models) / len(models)


def check_pair(student: ViTConfig, teacher: Config) -> None:
  """Raises ValueError if the teacher cannot teach this student."""
  if student.num_classes != teacher.num_classes:
    raise ValueError(f"teacher has num_classes={teacher.num_classes} but the student has "
                     f"{student.num_classes}; they must match")
  if (student.image_size, student.channels) != (teacher.image_size, teacher.channels):
    raise ValueError(
        f"teacher takes {teacher.image_size}x{teacher.image_size}x{teacher.channels} images, "
        f"the student {student.image_size}x{student.image_size}x{student.channels}; "
        "they must take the same input")
  if (student.pixel_mean, student.pixel_std) != (teacher.pixel_mean, teacher.pixel_std):
    raise ValueError(
        f"teacher normalizes pixels with mean {teacher.pixel_mean} / std "
        f"{teacher.pixel_std}, the student with {student.pixel_mean} / "
        f"{student.pixel_std}; they see the same preprocessed images, so these must match")


@flax.struct.dataclass
class TeacherCache:
  """Offline teacher outputs: top-k logits per training image and view.

  `values` (N, views, k) float32 and `indices` (N, views, k) int32, where
  view v of image i is the augmentation the training step draws for image i
  in epochs e with e % views == v (`train.augmentation_view`).
  """

  values: jax.Array
  indices: jax.Array


def projection_shapes(student: ViTConfig, teacher: Config,
                      cfg: DistillConfig) -> dict[str, tuple[int, int]]:
  """Learned feature projections the objective needs (student dim != teacher dim)."""
  if not cfg.feature or student.dim == teacher.dim:
    return {}
  return {f"proj_{i}": (student.dim, teacher.dim) for i, _ in enumerate(cfg.feature_pairs)}


def init_projections(student: ViTConfig, teacher: Config, cfg: DistillConfig,
                     seed: int = 0) -> dict[str, jax.Array]:
  """Xavier-initialized feature projections (trained with the student)."""
  init = jax.nn.initializers.xavier_uniform()
  shapes = projection_shapes(student, teacher, cfg)
  keys = jax.random.split(jax.random.PRNGKey(seed), max(len(shapes), 1))
  return {name: init(k, shape) for k, (name, shape) in zip(keys, sorted(shapes.items()))}


def objective(cfg: DistillConfig, teacher_config: Config):
  """The `train.LossFn` of `cfg`; its aux is the teacher (a Model or an
  ensemble tuple) or a TeacherCache.

  For a DeiT student the true label trains the class head and the teacher the
  distillation head; inference averages the two (DeiT). For a plain student
  all terms act on its single head.
  """
  def loss_fn(model: Model, batch: Batch, rng: jax.Array, aux: Any,
              extra: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
    del rng
    s_cfg = model.config
    if cfg.needs_intermediates:
      out, s_inter = model_lib.apply_with_intermediates(
          model, batch.images, heads="both" if s_cfg.distilled else "mean")
    else:
      out = model_lib.apply(model, batch.images, heads="both" if s_cfg.distilled else "mean",
                            keep=batch.keep)
      s_inter = None
    cls_logits, dist_logits = out if s_cfg.distilled else (out, out)

    if isinstance(aux, TeacherCache):
      values = aux.values[batch.index, batch.view]
      indices = aux.indices[batch.index, batch.view]
      t_logits, t_inter = None, None
      teacher_top1 = indices[:, 0]
    else:
      if cfg.needs_intermediates:
        t_logits, t_inter = model_lib.apply_with_intermediates(aux, batch.images)
      else:
        t_logits, t_inter = teacher_logits(aux, batch.images), None
      t_logits = jax.lax.stop_gradient(t_logits)
      t_inter = jax.lax.stop_gradient(t_inter)
      teacher_top1 = t_logits.argmax(-1)

    terms = {}
    if cfg.ce:
      terms["ce"] = cfg.ce * cross_entropy(cls_logits, batch.labels, cfg.label_smoothing)
    if cfg.soft:
      terms["soft"] = cfg.soft * (
          soft_kl_topk(dist_logits, values, indices, cfg.temperature)
          if t_logits is None else soft_kl(dist_logits, t_logits, cfg.temperature))
    if cfg.hard:
      terms["hard"] = cfg.hard * hard_label(dist_logits, teacher_top1)
    if cfg.feature or cfg.attention:
      if t_inter is None:
        raise ValueError("feature and attention distillation need the teacher model, "
                         "not an offline cache of its logits")
      s_pre, t_pre = s_cfg.num_prefix_tokens, teacher_config.num_prefix_tokens
      if cfg.feature:
        total = 0.0
        for i, (sb, tb) in enumerate(cfg.feature_pairs):
          s_tok = s_inter["features"][sb][:, s_pre:]
          t_tok = t_inter["features"][tb][:, t_pre:]
          total = total + feature_mse(s_tok, t_tok, extra.get(f"proj_{i}"))
        terms["feature"] = cfg.feature * total / len(cfg.feature_pairs)
      if cfg.attention:
        total = 0.0
        for sb, tb in cfg.attention_pairs:
          total = total + attention_kl(s_inter["attention"][sb], t_inter["attention"][tb],
                                       s_pre, t_pre)
        terms["attention"] = cfg.attention * total / len(cfg.attention_pairs)
    loss = sum(terms.values())
    logits = (cls_logits + dist_logits) / 2 if s_cfg.distilled else cls_logits
    metrics = {"loss": loss, "accuracy": (logits.argmax(-1) == batch.labels).mean(),
               "agreement": (logits.argmax(-1) == teacher_top1).mean()}
    metrics.update({f"loss_{k}": v for k, v in terms.items()})
    return loss, metrics

  return loss_fn


# ------------------------------------------------------------ offline cache


def cache_views(train_cfg: train_lib.TrainConfig) -> int:
  """Views per image an offline cache needs for `train_cfg`.

  Raises:
    ValueError: augmentation without a fixed number of views.
  """
  if not train_cfg.augments:
    return 1
  if not train_cfg.augment_views:
    raise ValueError("an offline teacher cache needs TrainConfig.augment_views > 0 when "
                     "training augments (a fixed set of views per image)")
  return train_cfg.augment_views


def build_teacher_cache(teacher: Teacher, split: data_lib.Split,
                        train_cfg: train_lib.TrainConfig, *, k: int = 10,
                        batch_size: int = 500, progress: bool = True) -> TeacherCache:
  """Top-k teacher logits of every training image and view, in one pass each.

  The views are the exact augmentations `train.fit` will draw with `train_cfg`.
  """
  models = members(teacher)
  views = cache_views(train_cfg)
  k = min(k, models[0].config.num_classes)
  if k < 1:
    raise ValueError(f"k={k} must be >= 1")
  config = models[0].config

  @jax.jit
  def top_k(t: Teacher, images: jax.Array, index: jax.Array, view: jax.Array):
    x = preprocess(images, config)
    if train_cfg.augments:
      keys = train_lib.augmentation_keys(train_cfg.seed, index, view)
      x = data_lib.augment(keys, x, train_cfg.crop_pad, train_cfg.flip)
    return jax.lax.top_k(teacher_logits(t, x), k)

  n = len(split)
  values = np.zeros((n, views, k), np.float32)
  indices = np.zeros((n, views, k), np.int32)
  bar = progress_lib.bar(views * -(-n // batch_size), "teacher cache", enabled=progress)
  for v in range(views):
    for start, (images, _, count) in zip(range(0, n, batch_size),
                                         data_lib.eval_batches(split, batch_size)):
      index = np.minimum(np.arange(start, start + len(images), dtype=np.int32), n - 1)
      vals, idx = jax.device_get(top_k(models, images, index,
                                       np.full(len(images), v, np.int32)))
      values[start:start + count, v] = vals[:count]
      indices[start:start + count, v] = idx[:count]
      bar.update(1)
  bar.close()
  return TeacherCache(jnp.asarray(values), jnp.asarray(indices))


def save_cache(cache: TeacherCache, path: str | pathlib.Path, key: str) -> None:
  """Writes the cache (npz, no pickles) with `key` (what it was computed for)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, values=np.asarray(cache.values), indices=np.asarray(cache.indices),
           key=np.frombuffer(key.encode(), np.uint8))
  tmp.replace(path)


def load_cache(path: str | pathlib.Path, key: str) -> TeacherCache | None:
  """The cache at `path` if it was computed for `key`, else None."""
  path = pathlib.Path(path)
  if not path.exists():
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      if bytes(f["key"]).decode() != key:
        return None
      return TeacherCache(jnp.asarray(f["values"]), jnp.asarray(f["indices"]))
  except (OSError, ValueError, KeyError):
    return None


def cached_teacher(teacher: Teacher, split: data_lib.Split, train_cfg: train_lib.TrainConfig,
                   path: str | pathlib.Path, *, k: int = 10, progress: bool = True
                   ) -> TeacherCache:
  """Loads the cache at `path` if it matches this teacher, data and augmentation,
  else computes it and writes it there (process 0 writes it in a multi-process
  run; every process computes it).

  Raises:
    ValueError: `split` is not an in-memory `data.Split` (a streamed dataset
      is distilled with the online teacher instead).
  """
  if not isinstance(split, data_lib.Split):
    raise ValueError(f"an offline teacher cache covers an in-memory data.Split, got a "
                     f"{type(split).__name__}; distill from a stream with the online "
                     "teacher (cache=None)")
  models = members(teacher)
  key = json.dumps({"teacher": train_lib.fingerprint([m.params for m in models]),
                    "config": [m.config.to_dict() for m in models],
                    "data": train_lib.fingerprint(split.images, split.labels), "k": k,
                    "views": cache_views(train_cfg), "seed": train_cfg.seed,
                    "crop_pad": train_cfg.crop_pad, "flip": train_cfg.flip}, sort_keys=True)
  cache = load_cache(path, key)
  if cache is None:
    cache = build_teacher_cache(teacher, split, train_cfg, k=k, progress=progress)
    if sharding.is_writer():  # every process computes the same cache; one writes it
      save_cache(cache, path, key)
  return cache


# ------------------------------------------------------------------ training


def fit_student(teacher: Teacher, student: Model, split: data_lib.Split,
                train_cfg: train_lib.TrainConfig, cfg: DistillConfig, *,
                cache: TeacherCache | None = None, workdir: str | pathlib.Path | None = None,
                mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                on_step: Any = None) -> Model:
  """Trains `student` from the frozen `teacher` (a Model, ViT or CNN, or a
  tuple of them: an ensemble) or its offline `cache`.

  The teacher's forward runs inside the student's jitted, sharded step; only
  the student (and the feature projections, when widths differ) is updated.
  A resume in `workdir` is refused unless the teacher's weights (or the
  cache's values) are the same, by SHA-256.

  Raises:
    ValueError: teacher and student disagree on classes or input, bad
      weights, a cache that does not cover the split and its views,
      feature/attention terms with a CNN or ensemble teacher (they need one
      ViT's tokens and attention maps), or patch dropout with those terms
      (their token grids differ).
  """
  models = members(teacher)
  for m in models:
    check_pair(student.config, m.config)
  if cfg.needs_intermediates and (len(models) > 1 or
                                  not isinstance(models[0].config, ViTConfig)):
    what = "an ensemble" if len(models) > 1 else f"a {type(models[0].config).__name__}"
    raise ValueError(f"feature/attention distillation (feature={cfg.feature}, attention="
                     f"{cfg.attention}) needs a single ViT teacher's tokens and attention "
                     f"maps; the teacher is {what}. Use soft/hard terms with it")
  aux_teacher = models[0] if len(models) == 1 else models
  if train_cfg.patch_dropout and cfg.needs_intermediates:
    raise ValueError(f"TrainConfig.patch_dropout={train_cfg.patch_dropout} drops student "
                     "tokens, so feature/attention distillation cannot pair them with the "
                     "teacher's; use patch_dropout=0 or feature=attention=0")
  if cache is not None:
    if cfg.needs_intermediates:
      raise ValueError("feature/attention distillation needs the teacher model, not a cache")
    want = (len(split), cache_views(train_cfg))
    if tuple(cache.values.shape[:2]) != want:
      raise ValueError(f"the teacher cache covers {tuple(cache.values.shape[:2])} "
                       f"(images, views); this run needs {want}")
  run = json.dumps({"distill": dataclasses.asdict(cfg),
                    "teacher": models[0].config.to_dict() if len(models) == 1 else
                               [m.config.to_dict() for m in models],
                    "offline": cache is not None}, sort_keys=True)
  return train_lib.fit(student, split, train_cfg, workdir=workdir,
                       loss_fn=objective(cfg, models[0].config),
                       aux=cache if cache is not None else aux_teacher,
                       extra=init_projections(student.config, models[0].config, cfg,
                                              train_cfg.seed),
                       mesh=mesh, progress=progress, on_step=on_step, run_name=run,
                       desc="distill")
