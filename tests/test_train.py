"""Training: losses by hand, sharding parity, kill-and-resume, workdir checks."""

import dataclasses
import io
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import TINY, assert_params_close, noisy_model, synthetic_split
from vitjax import evaluate, losses, progress, recipes, sharding, train, xla_cpu
from vitjax import model as model_lib
from vitjax.models.inputs import preprocess


def _leaves(model):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(model.params)]


def test_cross_entropy_with_smoothing_by_hand():
  logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], np.float32)
  labels = np.array([0, 1])
  eps = 0.1
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = np.full((2, 3), eps / 3)
  targets[np.arange(2), labels] += 1 - eps
  want = -(targets * logp).sum(-1).mean()
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, eps), want, rtol=1e-6)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels),
                             -logp[np.arange(2), labels].mean(), rtol=1e-6)


def test_training_learns_synthetic_task():
  split = synthetic_split(512)
  cfg = train.TrainConfig(steps=120, batch_size=32, learning_rate=1e-2, warmup_steps=5,
                          label_smoothing=0.0)
  model = train.fit(model_lib.init(TINY, 0), split, cfg, progress=False,
                    mesh=sharding.make_mesh(jax.devices()[:1]))
  assert evaluate.accuracy(model, synthetic_split(128, seed=1)) > 0.9


def test_weight_decay_skips_norms_biases_and_embeddings():
  part = train.Partition.of(model_lib.init(TINY, 0).params)
  flat = jax.tree_util.tree_flatten_with_path(model_lib.init(TINY, 0).params)[0]
  decayed = {model_lib.path_str(p) for (p, _), d in zip(flat, part.decay) if d}
  assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in decayed
  assert not any(k.endswith(("bias", "scale")) or "pos_embedding" in k or k == "cls"
                 for k in decayed)


@pytest.mark.parametrize("fsdp, patch_dropout", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_eight_devices_match_one(fsdp, patch_dropout):
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  # 5 classes in batches of 16: no class can be exactly balanced, so no
  # gradient is a rounding-noise zero that Adam's normalization would amplify.
  config = TINY.replace(num_classes=5)
  split = synthetic_split(64, config)
  cfg = train.TrainConfig(steps=1, batch_size=16, warmup_steps=0, fsdp=fsdp,
                          patch_dropout=patch_dropout)
  one = train.fit(model_lib.init(config, 0), split, cfg, progress=False,
                  mesh=sharding.make_mesh(jax.devices()[:1]))
  eight = train.fit(model_lib.init(config, 0), split, cfg, progress=False,
                    mesh=sharding.make_mesh(jax.devices()))
  assert_params_close(one, eight, atol=1e-5)
  start = _leaves(model_lib.init(config, 0))
  moved = sum(not np.allclose(a, s) for a, s in zip(_leaves(one), start))
  assert moved > 10  # the step really updated the weights


def test_fsdp_really_shards_parameters():
  mesh = sharding.make_mesh(jax.devices())
  specs = sharding.param_shardings(model_lib.init(TINY, 0).params, mesh, fsdp=True)
  kernel = specs["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
  assert kernel.spec == jax.sharding.PartitionSpec(None, "data")  # (16, 32): 32 split
  assert specs["head"]["bias"].spec == jax.sharding.PartitionSpec()  # 4 < 8 devices


def test_batch_size_must_split_over_devices():
  with pytest.raises(ValueError, match="batch_size=12 must be a multiple of the 8 devices"):
    train.fit(model_lib.init(TINY, 0), synthetic_split(64),
              train.TrainConfig(steps=2, batch_size=12, warmup_steps=0), progress=False)


class Killed(Exception):
  pass


@pytest.mark.parametrize("ema_decay, patch_dropout", [(0.0, 0.0), (0.9, 0.5)])
def test_kill_and_resume_gives_identical_params(tmp_path, ema_decay, patch_dropout):
  split = synthetic_split(96)
  cfg = train.TrainConfig(steps=9, batch_size=16, warmup_steps=2, checkpoint_every=2,
                          log_every=1, crop_pad=1, flip=True, ema_decay=ema_decay,
                          patch_dropout=patch_dropout)
  mesh = sharding.make_mesh(jax.devices()[:2])
  straight = train.fit(model_lib.init(TINY, 0), split, cfg, progress=False, mesh=mesh)

  def die_at_7(step, metrics):
    if step == 7:
      raise Killed()
  with pytest.raises(Killed):
    train.fit(model_lib.init(TINY, 0), split, cfg, workdir=tmp_path, progress=False,
              mesh=mesh, on_step=die_at_7)
  steps_seen = []
  resumed = train.fit(model_lib.init(TINY, 0), split, cfg, workdir=tmp_path,
                      progress=False, mesh=mesh,
                      on_step=lambda s, m: steps_seen.append(s))
  assert steps_seen[0] == 7  # resumed after the step-6 checkpoint, not from 0
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  # A finished run returns its final state without training again.
  steps_seen.clear()
  again = train.fit(model_lib.init(TINY, 0), split, cfg, workdir=tmp_path,
                    progress=False, mesh=mesh, on_step=lambda s, m: steps_seen.append(s))
  assert steps_seen == []
  for a, b in zip(_leaves(straight), _leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_workdir_of_another_run_is_refused(tmp_path):
  split = synthetic_split(64)
  cfg = train.TrainConfig(steps=2, batch_size=16, warmup_steps=0)
  mesh = sharding.make_mesh(jax.devices()[:1])
  train.fit(model_lib.init(TINY, 0), split, cfg, workdir=tmp_path, progress=False,
            mesh=mesh)
  # The message names the differing field, not the whole settings dict.
  with pytest.raises(ValueError, match=r"different run \(train\.steps: saved 2 vs now 3\)"):
    train.fit(model_lib.init(TINY, 0), split,
              train.TrainConfig(steps=3, batch_size=16, warmup_steps=0),
              workdir=tmp_path, progress=False, mesh=mesh)
  # A run saved before a settings field existed holds that field's default.
  meta_path = tmp_path / train.META_FILE
  meta = json.loads(meta_path.read_text())
  del meta["train"]["xla_cpu"]
  meta_path.write_text(json.dumps(meta))
  train.fit(model_lib.init(TINY, 0), split, cfg, workdir=tmp_path, progress=False, mesh=mesh)
  # Same settings, but other initial weights, other data or other caller
  # settings: each is a different run too.
  for kwargs, field in ((dict(model=model_lib.init(TINY, 1)), "initial_weights"),
                        (dict(split=synthetic_split(64, seed=5)), "data"),
                        (dict(aux={"teacher": np.ones(3)}), "aux"),
                        (dict(run_info={"sparsity": 0.9}), "run_info")):
    args = dict(model=model_lib.init(TINY, 0), split=split)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"different run \\({field}[.:]"):
      train.fit(args.pop("model"), args.pop("split"), cfg, workdir=tmp_path, progress=False,
                mesh=mesh, **args)


def test_recipes_refuse_presets_without_one():
  with pytest.raises(ValueError, match=r"preset 'ti16-student' has no teacher recipe; the "
                                       r"presets with one are \['b16', 's16', 'tiny', 'tiny-cnn'\]"):
    recipes.teacher_recipe("ti16-student")
  with pytest.raises(ValueError, match=r"preset 's16' has no CNN teacher; the presets with "
                                       r"one are \['tiny'\]"):
    recipes.cnn_preset("s16")
  with pytest.raises(ValueError, match="preset 'tiny' has no distillation recipe"):
    recipes.student_recipe("tiny")


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps must be >= 1"),
    (dict(steps=5, warmup_steps=5), "warmup_steps=5 must be in 0..steps-1=4"),
    (dict(steps=5, label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    (dict(steps=5, learning_rate=0.0), "learning_rate must be > 0"),
    (dict(steps=5, ema_decay=1.0), r"ema_decay must be in \[0, 1\), got 1.0"),
    (dict(steps=5, patch_dropout=1.0), r"patch_dropout must be in \[0, 1\), got 1.0"),
    (dict(steps=5, patch_dropout=-0.1), r"patch_dropout must be in \[0, 1\), got -0.1"),
    (dict(steps=5, xla_cpu="fast"), r"xla_cpu='fast'; choose one of \('xla-default', "
                                    r"'ynn-off'\)"),
])
def test_train_config_errors(kwargs, match):
  kwargs.setdefault("warmup_steps", 0)
  with pytest.raises(ValueError, match=match):
    train.TrainConfig(**kwargs)


def test_kept_patches_are_a_fresh_sorted_subset_per_image_and_view():
  keys = train.augmentation_keys(0, jnp.arange(64), jnp.zeros(64, jnp.int32))
  keep = np.asarray(train.kept_patches(keys, 16, 0.5))
  assert keep.shape == (64, 8) and keep.min() >= 0 and keep.max() < 16
  assert all(np.all(np.diff(row) > 0) for row in keep)  # sorted, no repeats
  assert len({tuple(row) for row in keep}) > 60  # images draw their own subsets
  # Every patch is kept about half the time (64 images x 8 of 16 patches).
  counts = np.bincount(keep.ravel(), minlength=16)
  assert counts.sum() == 512 and counts.min() > 16 and counts.max() < 48
  other_view = train.augmentation_keys(0, jnp.arange(64), jnp.ones(64, jnp.int32))
  assert not np.array_equal(np.asarray(train.kept_patches(other_view, 16, 0.5)), keep)
  np.testing.assert_array_equal(train.kept_patches(keys, 16, 0.5), keep)  # reproducible
  assert train.kept_patches(keys, 16, 0.99).shape == (64, 1)  # at least one patch
  assert train.kept_patches(keys, 17, 0.25).shape == (64, 13)


def test_patch_dropout_changes_the_step_but_still_learns():
  config = TINY.replace(image_size=16)  # 16 patches, 4 in each lit quadrant
  split = synthetic_split(512, config)
  mesh = sharding.make_mesh(jax.devices()[:1])
  # Half the patches per step: twice the steps of test_training_learns_synthetic_task.
  cfg = train.TrainConfig(steps=240, batch_size=32, learning_rate=1e-2, warmup_steps=5,
                          label_smoothing=0.0, patch_dropout=0.5)
  model = train.fit(model_lib.init(config, 0), split, cfg, progress=False, mesh=mesh)
  assert evaluate.accuracy(model, synthetic_split(128, config, seed=1)) > 0.9
  # Three steps: Adam's first update is the sign of the gradient, not its size.
  short = dataclasses.replace(cfg, steps=3, warmup_steps=0)
  dropped = train.fit(model_lib.init(config, 0), split, short, progress=False, mesh=mesh)
  full = train.fit(model_lib.init(config, 0), split,
                   dataclasses.replace(short, patch_dropout=0.0), progress=False, mesh=mesh)
  assert sum(not np.allclose(a, b) for a, b in zip(_leaves(dropped), _leaves(full))) > 10


def test_optimizer_masks_weight_decay():
  opt = train.make_optimizer(train.TrainConfig(steps=10, warmup_steps=0,
                                               learning_rate=0.1, weight_decay=0.5,
                                               grad_clip=0), [True, False])
  params = [np.ones(3, np.float32), np.ones(3, np.float32)]
  zero = [np.zeros(3, np.float32)] * 2
  updates, _ = opt.update(zero, opt.init(params), params)
  new = optax.apply_updates(params, updates)
  assert np.all(new[0] < 1) and np.all(new[1] == 1)


def test_param_average_by_hand():
  # SGD at lr 0.1 on x^2/2 from x=1: x1 = 0.9, x2 = 0.81; with decay 0.5 the
  # average goes 1 -> 0.95 -> 0.88, with decay 0.9 1 -> 0.99 -> 0.972, while
  # the updates pass through unchanged.
  for decay, averages in ((0.5, (0.95, 0.88)), (0.9, (0.99, 0.972))):
    opt = optax.chain(optax.sgd(0.1), train.param_average(decay))
    x = np.float32(1.0)
    state = opt.init(x)
    for want_x, want_avg in zip((0.9, 0.81), averages):
      updates, state = opt.update(x, state, x)
      x = optax.apply_updates(x, updates)
      np.testing.assert_allclose([x, train.averaged_leaves(state)], [want_x, want_avg],
                                 rtol=1e-6)
  with pytest.raises(ValueError, match="param_average needs the params"):
    train.param_average(0.5).update(x, train.param_average(0.5).init(x))
  with pytest.raises(ValueError, match="holds no parameter average"):
    train.averaged_leaves(optax.sgd(0.1).init(x))


def test_fit_with_ema_returns_the_moving_average_of_the_steps():
  # A constant learning rate makes a k-step run the first k steps of a longer
  # one, so the per-step parameters can be averaged by hand.
  split = synthetic_split(64)
  mesh = sharding.make_mesh(jax.devices()[:1])
  base = dict(batch_size=16, warmup_steps=0, end_lr_ratio=1.0, learning_rate=1e-2)
  start = model_lib.init(TINY, 0)
  average = _leaves(start)
  for k in (1, 2, 3):
    p_k = _leaves(train.fit(start, split, train.TrainConfig(steps=k, **base),
                            progress=False, mesh=mesh))
    average = [0.5 * a + 0.5 * p for a, p in zip(average, p_k)]
  got = train.fit(start, split, train.TrainConfig(steps=3, ema_decay=0.5, **base),
                  progress=False, mesh=mesh)
  for a, b in zip(average, _leaves(got)):
    np.testing.assert_allclose(b, a, atol=1e-6)
  assert not all(np.allclose(a, p) for a, p in zip(average, p_k))  # not the last step


def test_recipe_caps_the_average_horizon_of_short_runs():
  full = recipes.teacher_train_config("tiny", 60_000)
  assert full.steps == 9828 and full.ema_decay == 0.999  # the measured recipe, unchanged
  short = recipes.teacher_train_config("tiny", 60_000, steps=100)
  assert short.ema_decay == pytest.approx(0.96)  # horizon 25 = steps / 4
  assert recipes.teacher_train_config("tiny", 60_000, steps=4).ema_decay == 0.0


def test_slowdown_note_only_past_five_percent():
  assert evaluate.slowdown_note("int8", "fp32", 1.0, 1.0) is None
  assert evaluate.slowdown_note("int8", "fp32", 1.05, 1 / 1.05) is None
  note = evaluate.slowdown_note("int4", "fp32", 1.43, 0.99)
  assert "int4 is SLOWER than fp32" in note and "latency x1.43" in note
  assert "throughput x0.99" in note
  assert evaluate.slowdown_note("masked", "dense", 1.0, 0.90) is not None
  reports = {name: evaluate.Report(accuracy=0.9, params=1, bytes=1, flops=1,
                                   latency_ms=lat, throughput=thr)
             for name, lat, thr in (("fp32", 2.0, 100.0), ("fast", 1.0, 200.0),
                                    ("slow", 3.0, 100.0))}
  notes = evaluate.speed_notes(reports, "fp32")
  assert len(notes) == 1 and "slow is SLOWER" in notes[0] and "x1.50" in notes[0]


def test_progress_bar_writes_rarely_when_not_a_terminal(monkeypatch):
  monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
  assert progress.bar(10, "x", file=io.StringIO()).mininterval == progress.LOG_INTERVAL_S
  monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
  assert progress.bar(10, "x", file=io.StringIO()).mininterval == progress.TERMINAL_INTERVAL_S


def test_accuracy_counts_every_image_against_a_hand_computation():
  m = noisy_model(TINY, 4)
  split = synthetic_split(300, seed=9)  # not a multiple of the batch: the last is padded
  logits = np.asarray(model_lib.apply(m, preprocess(jnp.asarray(split.images), TINY)))
  want = float(np.mean(logits.argmax(-1) == split.labels))
  assert 0.05 < want < 0.95  # a comparison that can tell a half from the whole
  assert evaluate.accuracy(m, split, batch_size=128) == pytest.approx(want, abs=1e-12)
  halves = [float(np.mean(logits[:150].argmax(-1) == split.labels[:150])),
            float(np.mean(logits[150:].argmax(-1) == split.labels[150:]))]
  assert halves[0] != halves[1]


def test_a_training_state_saved_before_a_config_field_existed_still_resumes(tmp_path):
  import json
  from vitjax import train as train_lib
  cfg = TINY
  meta = {"run": "x", "model": cfg.to_dict(), "train": {"steps": 3}}
  old = dict(meta, model={k: v for k, v in cfg.to_dict().items()
                          if k not in ("gelu", "norm_eps")})
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / train_lib.META_FILE).write_text(json.dumps(old))
  train_lib._check_meta(tmp_path / "w", meta)  # the defaults fill the missing fields
  with pytest.raises(ValueError, match="different run"):
    train_lib._check_meta(tmp_path / "w", dict(meta, model=cfg.replace(gelu="erf").to_dict()))


def test_ynn_off_compiles_the_same_training_arithmetic():
  """TrainConfig.xla_cpu changes the CPU kernels, not the computation: the
  parameters after a few steps agree with XLA's default to float rounding,
  and differ from a run that really changes something (another seed)."""
  config = TINY.replace(image_size=16)
  split = synthetic_split(128, config)
  mesh = sharding.make_mesh(jax.devices()[:1])
  cfg = train.TrainConfig(steps=4, batch_size=32, warmup_steps=0)
  runs = {name: train.fit(model_lib.init(config, 0), split, cfg, progress=False, mesh=mesh)
          for name, cfg in (("default", cfg),
                            ("ynn-off", dataclasses.replace(cfg, xla_cpu="ynn-off")),
                            ("seed", dataclasses.replace(cfg, seed=1)))}
  flat = {k: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(m.params)])
          for k, m in runs.items()}
  np.testing.assert_allclose(flat["ynn-off"], flat["default"], rtol=0, atol=1e-5)
  assert np.abs(flat["seed"] - flat["default"]).max() > 1e-3
  assert xla_cpu.options_for("ynn-off", "cpu") == {xla_cpu.YNN_FUSION_TYPE: ""}
  assert xla_cpu.options_for("ynn-off", "gpu") is None
  assert xla_cpu.options_for("xla-default", "cpu") is None
  with pytest.raises(ValueError, match=r"XLA CPU candidate 'fast' is unknown; choose one of "
                                       r"\('xla-default', 'ynn-off'\)"):
    xla_cpu.options_for("fast", "gpu")
  # A finished model's reuse ignores the kernel choice; a resume does not.
  off = dataclasses.replace(cfg, xla_cpu="ynn-off")
  assert off.recipe_dict() == cfg.recipe_dict() and "xla_cpu" not in cfg.recipe_dict()
  assert off.to_dict() != cfg.to_dict()
