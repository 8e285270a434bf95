"""Sharded optax training with orbax checkpoints and bit-exact resume.

`fit` trains any `Model` (plain or compressed: only leaves that `leaves.trainable`
marks are updated, and each leaf's constraints are re-applied after every
update) on a `Split`, with a loss function that may use a frozen auxiliary
pytree (a teacher `Model` for distillation). The step is one `jax.jit` over a
`data` mesh of all devices: the batch is split, parameters replicated or
FSDP-sharded. With a `workdir`, an orbax `CheckpointManager` saves the state
every `checkpoint_every` steps; a killed run started again with the same
arguments resumes from the last save and ends with bit-identical parameters,
because the batch and the random key of step s depend only on (seed, s).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import time
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from vitjax import data as data_lib
from vitjax import leaves, sharding, streaming
from vitjax import xla_cpu as xla_cpu_lib
from vitjax import progress as progress_lib
from vitjax.losses import cross_entropy
from vitjax.model import Model, apply
from vitjax.models.config import ViTConfig
from vitjax.models.inputs import preprocess

PyTree = Any
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class Batch:
  """One training batch as the loss sees it.

  Attributes:
    images: preprocessed and augmented (B, H, W, C) float images.
    labels: (B,) int labels.
    index: (B,) positions of the images in the training split.
    view: (B,) which augmentation of each image this is (see
      `TrainConfig.augment_views`); 0 everywhere without augmentation.
    keep: (B, K) patch tokens each image keeps (`TrainConfig.patch_dropout`),
      for the student's forward pass; None keeps all.
  """

  images: jax.Array
  labels: jax.Array
  index: jax.Array
  view: jax.Array
  keep: jax.Array | None = None


# (model, batch, rng, aux, extra) -> (loss, metrics); `aux` is frozen (e.g. a
# teacher), `extra` holds trainable parameters beside the model (projections).
LossFn = Callable[[Model, Batch, jax.Array, Any, PyTree], tuple[jax.Array, Metrics]]
# (params, step after the update) -> params, e.g. a gradual pruning schedule
PostUpdate = Callable[[PyTree, jax.Array], PyTree]

STATE_DIR = "train_state"
META_FILE = "train_meta.json"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimization settings (AdamW, linear warmup then cosine decay).

  Attributes:
    steps: total optimizer steps.
    batch_size: global batch (split over all devices).
    learning_rate: peak learning rate.
    end_lr_ratio: final learning rate as a fraction of the peak.
    warmup_steps: linear warmup length.
    weight_decay: AdamW decoupled decay on matrices (not on norms, biases,
      position or class embeddings).
    label_smoothing: in [0, 1).
    ema_decay: 0 trains as usual; in (0, 1), `fit` returns an exponential
      moving average of the parameters over the steps (Polyak averaging,
      kept in the optimizer state so that it resumes), not the last ones.
    grad_clip: global-norm clip (0 disables).
    crop_pad: random-crop padding in pixels (0 disables cropping).
    flip: random horizontal flips.
    augment_views: 0: every epoch draws a new augmentation of each image;
      V > 0: image i in epoch e gets view e % V, the same each time (what an
      offline teacher cache of V views per image needs).
    patch_dropout: in [0, 1): the fraction of patch tokens each training
      image drops, a new random subset per image and view (PatchDropout, Liu
      et al. 2022); a step then costs somewhat more than (1 - patch_dropout)
      of a full one (see benchmarks/patch_dropout.py).
      Evaluation always sees every token.
    seed: seeds batch order, augmentation and any loss randomness.
    checkpoint_every: save the state every this many steps (with a workdir).
    fsdp: shard parameters and optimizer state over devices.
    log_every: refresh the progress bar metrics every this many steps.
    xla_cpu: how XLA's CPU backend compiles the step (`xla_cpu.CANDIDATES`;
      ignored on GPU/TPU). The same arithmetic either way; "ynn-off" trains
      the CNN teacher 1.26x faster on this project's 2-core EPYC (6.38 ->
      8.06 steps/s), the ViT teacher 0.93x as fast (10.04 -> 9.35;
      benchmarks/train_options.py).
  """

  steps: int
  batch_size: int = 128
  learning_rate: float = 1e-3
  end_lr_ratio: float = 0.01
  warmup_steps: int = 100
  weight_decay: float = 0.05
  label_smoothing: float = 0.1
  ema_decay: float = 0.0
  grad_clip: float = 1.0
  crop_pad: int = 0
  flip: bool = False
  augment_views: int = 0
  patch_dropout: float = 0.0
  seed: int = 0
  checkpoint_every: int = 500
  fsdp: bool = False
  log_every: int = 20
  xla_cpu: xla_cpu_lib.Candidate = "xla-default"

  def __post_init__(self) -> None:
    for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
    if not self.learning_rate > 0:
      raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps} must be in "
                       f"0..steps-1={self.steps - 1}")
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"TrainConfig.label_smoothing must be in [0, 1), got "
                       f"{self.label_smoothing}")
    if not 0 <= self.ema_decay < 1:
      raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
    if not 0 <= self.end_lr_ratio <= 1:
      raise ValueError(f"TrainConfig.end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
    if self.weight_decay < 0 or self.grad_clip < 0 or self.crop_pad < 0:
      raise ValueError("TrainConfig.weight_decay, grad_clip and crop_pad must be >= 0")
    if self.augment_views < 0:
      raise ValueError(f"TrainConfig.augment_views must be >= 0, got {self.augment_views}")
    if not 0 <= self.patch_dropout < 1:
      raise ValueError(f"TrainConfig.patch_dropout must be in [0, 1), got {self.patch_dropout}")
    if self.xla_cpu not in xla_cpu_lib.CANDIDATES:
      raise ValueError(f"TrainConfig.xla_cpu={self.xla_cpu!r}; choose one of "
                       f"{tuple(xla_cpu_lib.CANDIDATES)}")

  @property
  def augments(self) -> bool:
    return bool(self.crop_pad or self.flip)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
    """The inverse of `to_dict`; fields missing from `values` (saved before
    they existed) take their defaults.

    Raises:
      TypeError: an unknown field. ValueError: what the constructor refuses.
    """
    return cls(**values)

  def recipe_dict(self) -> dict[str, Any]:
    """`to_dict` without the fields that choose kernels, not the computation
    (`xla_cpu`): what a finished model's reuse is checked against, while a
    resume checks everything (bit-exactness needs the same kernels)."""
    return {k: v for k, v in self.to_dict().items() if k != "xla_cpu"}


@flax.struct.dataclass
class TrainState:
  params: PyTree
  extra: PyTree
  opt_state: PyTree
  step: jax.Array


# ------------------------------------------------------------------- losses


def classification_loss(label_smoothing: float = 0.0) -> LossFn:
  """Cross-entropy on the logits (both heads of a DeiT get the true label)."""
  def loss_fn(model: Model, batch: Batch, rng: jax.Array, aux: Any,
              extra: PyTree) -> tuple[jax.Array, Metrics]:
    del rng, aux, extra
    images, labels = batch.images, batch.labels
    if model.config.distilled:
      cls_logits, dist_logits = apply(model, images, heads="both", keep=batch.keep)
      loss = (cross_entropy(cls_logits, labels, label_smoothing) +
              cross_entropy(dist_logits, labels, label_smoothing)) / 2
      logits = (cls_logits + dist_logits) / 2
    else:
      logits = apply(model, images, keep=batch.keep)
      loss = cross_entropy(logits, labels, label_smoothing)
    accuracy = (logits.argmax(-1) == labels).mean()
    return loss, {"loss": loss, "accuracy": accuracy}
  return loss_fn


# ------------------------------------------------------- trainable partition


@dataclasses.dataclass(frozen=True)
class Partition:
  """Which flattened leaves of a params tree the optimizer owns."""

  treedef: Any
  trainable: tuple[bool, ...]
  decay: tuple[bool, ...]

  @classmethod
  def of(cls, params: PyTree) -> Partition:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    mask = jax.tree_util.tree_leaves(leaves.trainable_mask(params))
    if len(mask) != len(flat):
      raise ValueError("a leaf type's `trainable` rule does not match its arrays")
    no_decay = ("pos_embedding", "cls", "dist")
    decay = tuple(
        bool(m) and np.ndim(x) >= 2 and
        not any(getattr(k, "key", None) in no_decay for k in path)
        for (path, x), m in zip(flat, mask))
    return cls(treedef, tuple(bool(m) for m in mask), decay)

  def split(self, params: PyTree) -> tuple[list, list]:
    flat = self.treedef.flatten_up_to(params)
    train = [x for x, t in zip(flat, self.trainable) if t]
    frozen = [x for x, t in zip(flat, self.trainable) if not t]
    return train, frozen

  def merge(self, train: list, frozen: list) -> PyTree:
    it_train, it_frozen = iter(train), iter(frozen)
    flat = [next(it_train) if t else next(it_frozen) for t in self.trainable]
    return self.treedef.unflatten(flat)

  def decay_mask(self) -> list[bool]:
    return [d for d, t in zip(self.decay, self.trainable) if t]


class ParamAverageState(NamedTuple):
  average: PyTree


def param_average(decay: float) -> optax.GradientTransformationExtraArgs:
  """Passes updates through unchanged and keeps, in its state, the exponential
  moving average (weight `decay` on the past) of the parameters each update
  produces; the average starts at the initial parameters. Its `update`
  refuses to run without `params`."""
  def init(params: PyTree) -> ParamAverageState:
    return ParamAverageState(jax.tree_util.tree_map(jnp.copy, params))

  def update(updates: PyTree, state: ParamAverageState, params: PyTree = None,
             **extra_args: Any) -> tuple[PyTree, ParamAverageState]:
    del extra_args
    if params is None:
      raise ValueError("param_average needs the params in update(updates, state, params)")
    new = optax.apply_updates(params, updates)
    return updates, ParamAverageState(
        optax.tree_utils.tree_update_moment(new, state.average, decay, 1))

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(cfg: TrainConfig, decay_mask: list[bool]) -> optax.GradientTransformation:
  """AdamW with warmup-cosine schedule, optional global-norm clipping and,
  with `cfg.ema_decay`, a `param_average` as the last link of the chain."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, cfg.warmup_steps, cfg.steps,
      end_value=cfg.learning_rate * cfg.end_lr_ratio)
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
  parts.append(optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask))
  if cfg.ema_decay:
    parts.append(param_average(cfg.ema_decay))
  return optax.chain(*parts)


def averaged_leaves(opt_state: PyTree) -> PyTree:
  """The trainable leaves' moving average held by `make_optimizer`'s chain
  state; refuses a state without a `param_average`."""
  last = opt_state[-1] if isinstance(opt_state, tuple) and opt_state else None
  if not isinstance(last, ParamAverageState):
    raise ValueError("the optimizer state holds no parameter average (ema_decay=0)")
  return last.average


# --------------------------------------------------------------------- step


def augmentation_view(epoch: jax.Array, views: int) -> jax.Array:
  """Which augmentation of an image epoch `epoch` uses (see `augment_views`)."""
  return epoch % views if views else epoch


def augmentation_keys(seed: int, index: jax.Array, view: jax.Array) -> jax.Array:
  """One PRNG key per image, a function of (seed, image index, view) only."""
  base = jax.random.fold_in(jax.random.PRNGKey(seed), 0x5EED)
  return jax.vmap(lambda i, v: jax.random.fold_in(jax.random.fold_in(base, i), v))(
      index, view)


def kept_patches(keys: jax.Array, num_patches: int, patch_dropout: float) -> jax.Array:
  """(B, K) sorted patch-token indices, a random subset of K = round((1 -
  patch_dropout) * num_patches) (at least 1) per image key in `keys`."""
  k = max(1, round((1 - patch_dropout) * num_patches))
  def subset(key: jax.Array) -> jax.Array:
    return jnp.sort(jax.random.permutation(jax.random.fold_in(key, 0xD409), num_patches)[:k])
  return jax.vmap(subset)(keys)


def make_train_step(model: Model, cfg: TrainConfig, partition: Partition,
                    optimizer: optax.GradientTransformation, loss_fn: LossFn,
                    post_update: PostUpdate | None, steps_per_epoch: int) -> Callable:
  """The pure update `(state, images, labels, index, aux) -> (state, metrics)`."""
  config = model.config
  base_key = jax.random.PRNGKey(cfg.seed)

  def step(state: TrainState, images: jax.Array, labels: jax.Array, index: jax.Array,
           aux: Any):
    loss_rng = jax.random.fold_in(base_key, state.step)
    epoch = state.step // steps_per_epoch
    view = jnp.broadcast_to(augmentation_view(epoch, cfg.augment_views), index.shape)
    x = preprocess(images, config)
    keys = augmentation_keys(cfg.seed, index, view)
    keep = kept_patches(keys, config.num_patches, cfg.patch_dropout) \
        if cfg.patch_dropout else None
    if cfg.augments:
      x = data_lib.augment(keys, x, cfg.crop_pad, cfg.flip)
    else:
      view = jnp.zeros_like(index)
    batch = Batch(x, labels, index, view, keep)
    train, frozen = partition.split((state.params, state.extra))

    def objective(train_leaves):
      params, extra = partition.merge(train_leaves, frozen)
      return loss_fn(Model(config, params), batch, loss_rng, aux, extra)

    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(train)
    updates, opt_state = optimizer.update(grads, state.opt_state, train)
    train = optax.apply_updates(train, updates)
    params, extra = _constrained_params(partition, train, frozen, post_update, state.step + 1)
    return TrainState(params, extra, opt_state, state.step + 1), metrics

  return step


def _constrained_params(partition: Partition, train_leaves: list, frozen: list,
                       post_update: PostUpdate | None, step: jax.Array
                       ) -> tuple[PyTree, PyTree]:
  """`(params, extra)` merged from trainable and frozen leaves, with the leaf
  constraints (masks, factors, QAT) and `post_update` at `step` applied."""
  params, extra = partition.merge(train_leaves, frozen)
  params = leaves.constrain_tree(params)
  if post_update is not None:
    params = post_update(params, step)
  return params, extra


# ---------------------------------------------------------------- checkpoints


def fingerprint(*trees: Any) -> str:
  """SHA-256 over the structure (tree layout, leaf types and their static
  fields) and the bytes, shapes and dtypes of every array in `trees`."""
  digest = hashlib.sha256()
  for tree in trees:
    leaves_, treedef = jax.tree_util.tree_flatten(tree)
    digest.update(str(treedef).encode())
    for leaf in leaves_:
      arr = np.asarray(leaf)
      digest.update(f"{arr.dtype}{arr.shape}".encode())
      digest.update(np.ascontiguousarray(arr).tobytes())
  return digest.hexdigest()


def data_fingerprint(split: data_lib.Split | streaming.Stream) -> str:
  """SHA-256 of the training data: a split's images and labels, or a stream's
  own `fingerprint()` (files, sizes, labels and decoding settings)."""
  if isinstance(split, streaming.Stream):
    return split.fingerprint()
  return fingerprint(split.images, split.labels)


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
  """'key: saved X vs now Y' for every entry of `now` that differs, naming the
  differing fields of a dict entry (e.g. 'train.steps') instead of the whole dict."""
  diffs = []
  for k, v in now.items():
    old = saved.get(k)
    if old == v:
      continue
    if isinstance(old, dict) and isinstance(v, dict):
      diffs += [f"{k}.{f}: saved {old.get(f)!r} vs now {v.get(f)!r}"[:300]
                for f in sorted(set(old) | set(v)) if old.get(f) != v.get(f)]
    else:
      diffs.append(f"{k}: saved {old!r} vs now {v!r}"[:300])
  return diffs


def _check_meta(workdir: pathlib.Path, meta: dict[str, Any]) -> None:
  path = workdir / META_FILE
  exists = path.exists()
  sharding.barrier("train-meta-read")  # every process looked before any writes
  if exists:
    saved = json.loads(path.read_text())
    # A config saved before a field existed holds that field's default.
    for key, cls in (("model", ViTConfig), ("train", TrainConfig)):
      try:
        saved[key] = cls.from_dict(saved[key]).to_dict()
      except (KeyError, TypeError, ValueError):
        pass
    diffs = _differences(saved, meta)
    if diffs:
      raise ValueError(
          f"the training state in {workdir} was written for a different run ("
          + "; ".join(diffs) + "); use a fresh workdir (CLI: --overwrite starts over) or "
          "the same settings, weights and data")
  else:
    workdir.mkdir(parents=True, exist_ok=True)
    if sharding.is_writer():
      tmp = path.with_suffix(".tmp")
      tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
      tmp.replace(path)
  sharding.barrier("train-meta-written")


DATA_STATE_DIR = "data_iterator"


def _data_state_path(workdir: pathlib.Path, step: int) -> pathlib.Path:
  return workdir / DATA_STATE_DIR / f"step-{step}-process-{jax.process_index()}.json"


def _save_data_state(workdir: pathlib.Path, step: int, state: dict[str, Any]) -> None:
  """Writes this process's grain iterator state after `step` (before the
  training state of that step, so a restorable step always has it)."""
  path = _data_state_path(workdir, step)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(state))
  tmp.replace(path)


def _data_state(workdir: pathlib.Path | None, step: int) -> dict[str, Any] | None:
  """The grain iterator state saved with training step `step` (None at step 0).

  Raises:
    ValueError: a resumed step without its saved data state.
  """
  if step == 0:
    return None
  path = _data_state_path(workdir, step)
  if not path.exists():
    raise ValueError(f"the training state of step {step} in {workdir} has no data iterator "
                     f"state ({path}); it was not written by a streaming run")
  return json.loads(path.read_text())


def _manager(workdir: pathlib.Path, cfg: TrainConfig) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=2, save_interval_steps=cfg.checkpoint_every, create=True)
  return ocp.CheckpointManager(workdir.resolve() / STATE_DIR, options=options)


# ---------------------------------------------------------------------- fit


def fit(model: Model, split: data_lib.Split | streaming.Stream, cfg: TrainConfig, *,
        workdir: str | pathlib.Path | None = None,
        loss_fn: LossFn | None = None, aux: Any = None, extra: PyTree = None,
        post_update: PostUpdate | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        mesh: jax.sharding.Mesh | None = None, progress: bool = True,
        run_name: str = "train", desc: str = "train",
        run_info: dict[str, Any] | None = None) -> Model:
  """Trains `model` for `cfg.steps` steps on `split`; returns the trained Model.

  Args:
    model: the model to train; its compressed leaves keep their constraints.
    split: training images (uint8 or float, (N, H, W, C)) and labels, in
      memory, or a `streaming.Stream` read batch by batch (its grain iterator
      state is saved with each checkpoint and restored on resume).
    cfg: optimization settings.
    workdir: where the orbax state and run metadata live; a run started again
      with the same workdir resumes from the last saved step (and returns at
      once if it had finished).
    loss_fn: defaults to `classification_loss(cfg.label_smoothing)`.
    aux: a frozen pytree handed to `loss_fn` (e.g. the teacher Model).
    extra: trainable parameters beside the model, handed to `loss_fn` and
      optimized with it (e.g. distillation projections); not returned.
    post_update: applied to the params after every update.
    on_step: called with (step, host metrics) every `cfg.log_every` steps.
    mesh: defaults to a `data` mesh over all devices.
    progress: show a tqdm bar with loss, accuracy and images/s.
    run_name: recorded in the workdir metadata; a resume must match it.
    run_info: JSON-ready settings that shaped the run but are not visible in
      the arguments above (e.g. a `post_update` schedule's parameters);
      recorded, and a resume must match them too. A resume must also start
      from the same weights, `extra`, `aux` and data (by SHA-256).

  Raises:
    ValueError: bad shapes, a batch size the devices do not divide, a
      workdir written by a different run, or a model with activation
      quantizers at its sites (rounding has no gradient: train the float or
      QAT model, then quantize its sites).
  """
  if model.sites:
    raise ValueError(f"the model has activation quantizers at {len(model.sites)} sites "
                     f"(e.g. {next(iter(model.sites))}); fit() trains float or QAT "
                     "models: train first, then quantize the sites")
  streamed = isinstance(split, streaming.Stream)
  if streamed:
    data_lib.check_compatible(split.image_shape, split.num_classes, model.config)
  else:
    data_lib.check_compatible(split.images.shape[1:], int(split.labels.max()) + 1,
                              model.config)
  if cfg.patch_dropout and not isinstance(model.config, ViTConfig):
    raise ValueError(f"TrainConfig.patch_dropout={cfg.patch_dropout} drops patch tokens, "
                     f"which a {type(model.config).__name__} model does not have; use 0")
  mesh = mesh or sharding.make_mesh()
  sharding.check_batch_size(cfg.batch_size, mesh)
  if cfg.batch_size > len(split):
    raise ValueError(f"batch_size={cfg.batch_size} exceeds the {len(split)} training images")
  loss_fn = loss_fn or classification_loss(cfg.label_smoothing)
  extra = {} if extra is None else extra
  partition = Partition.of((model.params, extra))
  optimizer = make_optimizer(cfg, partition.decay_mask())
  train_leaves, _ = partition.split((model.params, extra))
  # The jitted step donates its input state; copy so the caller's values survive.
  params, extra = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True),
                                         (model.params, extra))
  state = TrainState(params, extra, optimizer.init(train_leaves), jnp.zeros((), jnp.int32))

  state_sharding = TrainState(
      sharding.param_shardings(state.params, mesh, cfg.fsdp),
      sharding.param_shardings(state.extra, mesh, cfg.fsdp),
      sharding.param_shardings(state.opt_state, mesh, cfg.fsdp),
      sharding.replicated(mesh))
  state = jax.device_put(state, state_sharding)
  manager = None
  start = 0
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    # Everything that determines the result: a resume with other initial
    # weights, teacher (aux), data or caller settings is refused.
    _check_meta(workdir, {"run": run_name, "model": model.config.to_dict(),
                          "train": cfg.to_dict(), "run_info": run_info or {},
                          "initial_weights": fingerprint(model.params, extra),
                          "aux": fingerprint(aux),
                          "data": data_fingerprint(split)})
    manager = _manager(workdir, cfg)
    latest = manager.latest_step()
    if latest is not None:
      # Restored straight into the (possibly multi-process, FSDP) shardings.
      abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
      state = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
      start = int(latest)

  aux = jax.device_put(aux, sharding.replicated(mesh)) if aux is not None else None
  per_epoch = data_lib.steps_per_epoch(len(split), cfg.batch_size)
  data_spec = sharding.batch_sharding(mesh)
  step_fn = jax.jit(
      make_train_step(model, cfg, partition, optimizer, loss_fn, post_update, per_epoch),
      in_shardings=(state_sharding, data_spec, data_spec, data_spec,
                    sharding.replicated(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=(0,),
      compiler_options=xla_cpu_lib.options_for(cfg.xla_cpu, jax.default_backend()))

  local = cfg.batch_size // jax.process_count()
  lo = jax.process_index() * local
  if streamed:  # each process decodes only its rows; grain's state resumes
    data_iter = split.iterator(cfg.batch_size, cfg.seed, rows=slice(lo, lo + local),
                            steps=cfg.steps, state=_data_state(workdir, start))
    batches = data_iter
  else:
    batches = (tuple(a[lo:lo + local] for a in b) for b in
               data_lib.train_batches(split, cfg.batch_size, cfg.seed, start))
  bar = progress_lib.bar(cfg.steps, desc, enabled=progress, initial=start)
  tick, seen = time.perf_counter(), 0
  try:
    for step in range(start, cfg.steps):
      state, metrics = step_fn(state, *sharding.global_batch(next(batches), mesh), aux)
      seen += cfg.batch_size
      if manager is not None:
        if streamed and manager.should_save(step + 1):
          _save_data_state(workdir, step + 1, data_iter.get_state())
        manager.save(step + 1, args=ocp.args.StandardSave(state))
      if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        host["img/s"] = seen / max(now - tick, 1e-9)
        tick, seen = now, 0
        bar.set_postfix({k: f"{v:.4g}" if k != "img/s" else f"{v:.0f}"
                         for k, v in host.items()}, refresh=False)
        if on_step is not None:
          on_step(step + 1, host)
      bar.update(1)
  finally:
    bar.close()
    if manager is not None:
      manager.wait_until_finished()
  if manager is not None and manager.latest_step() != cfg.steps:
    if streamed:
      _save_data_state(workdir, cfg.steps, data_iter.get_state())
    manager.save(cfg.steps, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
  if manager is not None:
    manager.close()
  params = state.params
  if cfg.ema_decay:
    _, frozen = partition.split((state.params, state.extra))
    params, _ = _constrained_params(partition, averaged_leaves(state.opt_state), frozen,
                                   post_update, state.step)
  # FSDP shards across processes are all-gathered: every process returns the
  # whole model (only process 0 should write it: `export.save_model` does so).
  return Model(model.config, sharding.to_host(params))


def steps_for_epochs(epochs: float, n: int, batch_size: int) -> int:
  """Optimizer steps in `epochs` passes over `n` images (at least 1)."""
  return max(1, math.ceil(epochs * data_lib.steps_per_epoch(n, batch_size)))
