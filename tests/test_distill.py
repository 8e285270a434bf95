"""Distillation: losses by hand, the objective, sharding, resume, offline cache,
and a 2-process run."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, assert_params_close, with_noise, noisy_model, synthetic_split
from vitjax.models.cnn import CNNConfig
from vitjax.models.inputs import preprocess
from vitjax import data as data_lib
from vitjax import distill, losses, sharding, train
from vitjax import model as model_lib
from vitjax.train import Batch

STUDENT = TINY.replace(dim=8, num_heads=2, mlp_dim=16, distilled=True)
RNG = np.random.default_rng(0)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_soft_kl_by_hand():
  s, t = RNG.normal(size=(5, 7)), RNG.normal(size=(5, 7)) * 3
  for temp in (1.0, 2.0, 4.0):
    p = np.exp(_log_softmax(t / temp))
    want = temp ** 2 * np.mean(np.sum(p * (_log_softmax(t / temp) - _log_softmax(s / temp)), -1))
    np.testing.assert_allclose(distill.soft_kl(jnp.asarray(s, jnp.float32),
                                               jnp.asarray(t, jnp.float32), temp),
                               want, rtol=1e-5)
  assert float(distill.soft_kl(jnp.asarray(t), jnp.asarray(t), 2.0)) == pytest.approx(0, abs=1e-6)


def test_soft_kl_topk_by_hand_and_equal_to_full_for_k_classes():
  s, t = RNG.normal(size=(4, 6)).astype(np.float32), RNG.normal(size=(4, 6)).astype(np.float32)
  vals, idx = jax.lax.top_k(jnp.asarray(t), 6)
  np.testing.assert_allclose(distill.soft_kl_topk(jnp.asarray(s), vals, idx, 3.0),
                             distill.soft_kl(jnp.asarray(s), jnp.asarray(t), 3.0), rtol=1e-5)
  vals, idx = jax.lax.top_k(jnp.asarray(t), 2)
  p = np.exp(_log_softmax(np.asarray(vals)))
  q = np.take_along_axis(_log_softmax(s), np.asarray(idx), -1)
  want = np.mean(np.sum(p * (np.log(p) - q), -1))
  np.testing.assert_allclose(distill.soft_kl_topk(jnp.asarray(s), vals, idx, 1.0), want, rtol=1e-5)


def test_hard_label_by_hand():
  s, t = RNG.normal(size=(6, 5)), RNG.normal(size=(6, 5))
  want = -np.mean(_log_softmax(s)[np.arange(6), t.argmax(-1)])
  np.testing.assert_allclose(distill.hard_label(jnp.asarray(s), jnp.asarray(t.argmax(-1))),
                             want, rtol=1e-5)


def test_feature_mse_with_projection_by_hand():
  s, t, proj = RNG.normal(size=(2, 3, 4)), RNG.normal(size=(2, 3, 6)), RNG.normal(size=(4, 6))
  np.testing.assert_allclose(distill.feature_mse(jnp.asarray(s), jnp.asarray(t), jnp.asarray(proj)),
                             np.mean((s @ proj - t) ** 2), rtol=1e-5)
  with pytest.raises(ValueError, match=r"pass a projection of shape \(4, 6\)"):
    distill.feature_mse(jnp.asarray(s), jnp.asarray(t))


def test_attention_kl_by_hand():
  def maps(b, h, t):
    a = np.exp(RNG.normal(size=(b, h, t, t)))
    return a / a.sum(-1, keepdims=True)
  s, t = maps(2, 2, 6), maps(2, 3, 5)  # student: 2 prefix tokens, teacher: 1
  def rows(a, pre):
    a = a.mean(1)[:, pre:, pre:]
    return a / a.sum(-1, keepdims=True)
  p, q = rows(t, 1), rows(s, 2)
  want = np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
  np.testing.assert_allclose(distill.attention_kl(jnp.asarray(s), jnp.asarray(t), 2, 1), want,
                             rtol=1e-4)


def test_objective_is_the_weighted_sum_of_its_terms():
  teacher = noisy_model(TINY, 1)
  student = noisy_model(STUDENT, 2)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  labels = jnp.array([0, 1, 2, 3])
  batch = Batch(x, labels, jnp.arange(4), jnp.zeros(4, jnp.int32))
  cfg = distill.DistillConfig(ce=0.3, soft=0.7, hard=0.2, temperature=2.0)
  loss, metrics = jax.jit(distill.objective(cfg, TINY))(student, batch, None, teacher, {})
  cls_l, dist_l = model_lib.apply(student, x, heads="both")
  t_l = model_lib.apply(teacher, x)
  want = (0.3 * losses.cross_entropy(cls_l, labels) + 0.7 * distill.soft_kl(dist_l, t_l, 2.0) +
          0.2 * distill.hard_label(dist_l, t_l.argmax(-1)))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert set(metrics) >= {"loss", "accuracy", "agreement", "loss_ce", "loss_soft", "loss_hard"}
  # The comparison is not vacuous: swapping two weights, or reading a term
  # from the other head, changes the sum by far more than the tolerance.
  swapped = (0.2 * losses.cross_entropy(cls_l, labels) + 0.7 * distill.soft_kl(dist_l, t_l, 2.0)
             + 0.3 * distill.hard_label(dist_l, t_l.argmax(-1)))
  other_head = (0.3 * losses.cross_entropy(dist_l, labels) +
                0.7 * distill.soft_kl(cls_l, t_l, 2.0) +
                0.2 * distill.hard_label(cls_l, t_l.argmax(-1)))
  for wrong in (swapped, other_head):
    assert abs(float(wrong) - float(want)) > 100 * 1e-5 * abs(float(want))


def test_patch_dropout_reaches_the_student_not_the_teacher():
  teacher = noisy_model(TINY, 1)
  student = noisy_model(STUDENT, 2)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  labels = jnp.array([0, 1, 2, 3])
  keep = jnp.array([[0, 3], [1, 2], [0, 1], [2, 3]])  # 2 of the 4 patches
  batch = Batch(x, labels, jnp.arange(4), jnp.zeros(4, jnp.int32), keep)
  cfg = distill.DistillConfig(ce=0.5, soft=0.5, hard=0.0, temperature=2.0)
  loss, _ = jax.jit(distill.objective(cfg, TINY))(student, batch, None, teacher, {})
  cls_l, dist_l = model_lib.apply(student, x, heads="both", keep=keep)
  t_l = model_lib.apply(teacher, x)
  want = 0.5 * losses.cross_entropy(cls_l, labels) + 0.5 * distill.soft_kl(dist_l, t_l, 2.0)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  full, _ = distill.objective(cfg, TINY)(student, batch.replace(keep=None), None, teacher, {})
  assert abs(float(full) - float(loss)) > 1e-3
  with pytest.raises(ValueError, match="patch_dropout=0.5 drops student tokens"):
    distill.fit_student(teacher, student, synthetic_split(32),
                        train.TrainConfig(steps=1, batch_size=16, warmup_steps=0,
                                          patch_dropout=0.5),
                        distill.DistillConfig(feature=1.0))


def test_gradients_reach_only_the_student():
  teacher = noisy_model(TINY, 1)
  student = noisy_model(STUDENT, 2)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  batch = Batch(x, jnp.array([0, 1, 2, 3]), jnp.arange(4), jnp.zeros(4, jnp.int32))
  cfg = distill.DistillConfig(ce=0.5, soft=0.5, hard=0.5, feature=1.0, attention=1.0)
  loss_fn = distill.objective(cfg, TINY)
  extra = distill.init_projections(STUDENT, TINY, cfg)
  grads = jax.jit(jax.grad(lambda s, t, e: loss_fn(s, batch, None, t, e)[0],
                           argnums=(0, 1, 2)))
  g_student, g_teacher, g_proj = grads(student, teacher, extra)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(g_teacher))
  assert sum(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(g_student)) > 10
  assert float(jnp.abs(g_proj["proj_0"]).sum()) > 0


def _fit(mesh, workdir=None, on_step=None, cfg=None, steps=4):
  teacher = noisy_model(TINY, 1)
  tcfg = train.TrainConfig(steps=steps, batch_size=16, warmup_steps=min(1, steps - 1),
                           checkpoint_every=2,
                           log_every=1)
  cfg = cfg or distill.DistillConfig(ce=0.5, soft=0.5, hard=0.0, temperature=2.0)
  return distill.fit_student(teacher, noisy_model(STUDENT, 2), synthetic_split(64), tcfg,
                             cfg, mesh=mesh, workdir=workdir, progress=False, on_step=on_step)


def _leaves(model):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(model.params)]


def test_eight_device_distillation_matches_one_device():
  one = _fit(sharding.make_mesh(jax.devices()[:1]), steps=1)
  eight = _fit(sharding.make_mesh(jax.devices()), steps=1)
  assert_params_close(one, eight, atol=1e-5)
  # The step moved the (non-trivial) student, so agreeing is not vacuous.
  start = noisy_model(STUDENT, 2)
  moved = [float(np.abs(a - b).max()) for a, b in zip(_leaves(start), _leaves(one))]
  assert max(moved) > 1e-4
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 8, 8, 1))
  assert float(jnp.abs(model_lib.apply(one, x)).min()) > 1e-3


class Killed(Exception):
  pass


def test_distillation_kill_and_resume_is_bit_exact(tmp_path):
  mesh = sharding.make_mesh(jax.devices()[:1])
  straight = _fit(mesh, steps=5)
  def die(step, metrics):
    if step == 3:
      raise Killed()
  with pytest.raises(Killed):
    _fit(mesh, workdir=tmp_path, on_step=die, steps=5)
  seen = []
  resumed = _fit(mesh, workdir=tmp_path, steps=5, on_step=lambda step, _: seen.append(step))
  # Saved every 2 steps and killed after step 3: the run resumes from step 2.
  assert seen == [3, 4, 5]
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_offline_cache_gives_the_online_loss(tmp_path):
  teacher = noisy_model(TINY, 1)
  split = synthetic_split(40)
  tcfg = train.TrainConfig(steps=2, batch_size=8, warmup_steps=0, crop_pad=1, flip=True,
                           augment_views=2)
  path = tmp_path / "cache.npz"
  cache = distill.cached_teacher(teacher, split, tcfg, path, k=4, progress=False)
  assert cache.values.shape == (40, 2, 4)
  again = distill.cached_teacher(teacher, split, tcfg, path, k=4, progress=False)
  np.testing.assert_array_equal(again.values, cache.values)  # read back from disk
  # For images 3, 9 in view 1, the cached top-k equals the teacher on that exact view.
  index, view = jnp.array([3, 9]), jnp.array([1, 1])
  x = jnp.asarray(split.images[np.asarray(index)])
  x = data_lib.augment(train.augmentation_keys(tcfg.seed, index, view),
                       preprocess(x, TINY), 1, True)
  logits = model_lib.apply(teacher, x)
  student = model_lib.init(STUDENT, 2)
  batch = Batch(x, jnp.array([0, 1]), index, view)
  cfg = distill.DistillConfig(ce=0.0, soft=1.0, hard=0.5, temperature=2.0)
  online = distill.objective(cfg, TINY)(student, batch, None, teacher, {})[0]
  offline = distill.objective(cfg, TINY)(student, batch, None, cache, {})[0]
  np.testing.assert_allclose(offline, online, rtol=1e-4)
  # (batch 500 vs batch 2 forward passes: float rounding differs slightly)
  np.testing.assert_allclose(cache.values[np.asarray(index), 1], jax.lax.top_k(logits, 4)[0],
                             atol=1e-5)
  # A different teacher does not reuse the file.
  other = distill.cached_teacher(noisy_model(TINY, 5), split, tcfg, path, k=4,
                                 progress=False)
  assert not np.allclose(other.values, cache.values)
  trained = distill.fit_student(teacher, student, split, tcfg, cfg, cache=cache,
                                mesh=sharding.make_mesh(jax.devices()[:1]), progress=False)
  assert trained.config == STUDENT


@pytest.mark.parametrize("kwargs, match", [
    (dict(soft=-1.0), r"must be >= 0, got \{'soft': -1.0\}"),
    (dict(ce=0.0, soft=0.0, hard=0.0), "all distillation weights are zero"),
    (dict(soft=1.0, temperature=0.0), "temperature T=0.0 must be > 0"),
    (dict(soft=1.0, temperature=-2.0), "temperature T=-2.0 must be > 0"),
    (dict(ce=1.0, hard=0.0), "only the ce weight is positive"),
])
def test_bad_distill_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distill.DistillConfig(**kwargs)


def test_teacher_and_student_must_match():
  teacher = model_lib.init(TINY, 1)
  cfg = distill.DistillConfig()
  tcfg = train.TrainConfig(steps=1, batch_size=16, warmup_steps=0)
  with pytest.raises(ValueError, match="teacher has num_classes=4 but the student has 7"):
    distill.fit_student(teacher, model_lib.init(STUDENT.replace(num_classes=7), 0),
                        synthetic_split(32), tcfg, cfg)
  with pytest.raises(ValueError, match="teacher takes 8x8x1 images, the student 16x16x1"):
    distill.fit_student(teacher, model_lib.init(STUDENT.replace(image_size=16), 0),
                        synthetic_split(32), tcfg, cfg)




CNN_TEACHER = CNNConfig(image_size=8, channels=1, num_classes=4, widths=(8, 16),
                        blocks=(1, 1), groups=4)


def _cnn_teacher(seed=1):
  m = model_lib.init(CNN_TEACHER, seed)
  return m.replace(params=with_noise(m.params, seed + 11))


def test_cnn_and_ensemble_teachers_by_hand(tmp_path):
  cnn, vit = _cnn_teacher(), noisy_model(TINY, 1)
  x = jax.random.normal(jax.random.PRNGKey(3), (5, 8, 8, 1))
  # An ensemble's logits: the mean of its members' log-probabilities.
  want = (_log_softmax(np.asarray(model_lib.apply(cnn, x), np.float64)) +
          _log_softmax(np.asarray(model_lib.apply(vit, x), np.float64))) / 2
  np.testing.assert_allclose(distill.teacher_logits((cnn, vit), x), want, atol=1e-5)
  np.testing.assert_array_equal(distill.teacher_logits(cnn, x), model_lib.apply(cnn, x))
  # DeiT hard distillation from the CNN: the distillation head learns the
  # CNN's decisions, online and from the offline cache alike.
  student = noisy_model(STUDENT, 2)
  index = jnp.arange(5)
  batch = Batch(x, jnp.array([0, 1, 2, 3, 0]), index, jnp.zeros_like(index))
  cfg = distill.DistillConfig(ce=0.0, hard=1.0)
  online = distill.objective(cfg, CNN_TEACHER)(student, batch, None, cnn, {})[0]
  _, dist = model_lib.apply(student, x, heads="both")
  want_hard = -np.mean(_log_softmax(np.asarray(dist, np.float64))[
      np.arange(5), np.asarray(model_lib.apply(cnn, x)).argmax(-1)])
  np.testing.assert_allclose(online, want_hard, rtol=1e-5)
  split = synthetic_split(32)
  tcfg = train.TrainConfig(steps=2, batch_size=8, warmup_steps=0)
  for teacher in (cnn, (cnn, vit)):
    cache = distill.cached_teacher(teacher, split, tcfg, tmp_path / f"c{id(teacher)}.npz",
                                   k=4, progress=False)
    images = preprocess(jnp.asarray(split.images[:4]), TINY)
    np.testing.assert_allclose(cache.values[:4, 0],
                               jax.lax.top_k(distill.teacher_logits(teacher, images), 4)[0],
                               atol=1e-5)
    trained = distill.fit_student(teacher, student, split, tcfg, distill.DistillConfig(),
                                  cache=cache, mesh=sharding.make_mesh(jax.devices()[:1]),
                                  progress=False)
    assert trained.config == STUDENT


def test_cnn_or_ensemble_teacher_refuses_feature_and_attention_terms():
  tcfg = train.TrainConfig(steps=1, batch_size=16, warmup_steps=0)
  for teacher, what in ((_cnn_teacher(), "the teacher is a CNNConfig"),
                        ((noisy_model(TINY, 1), _cnn_teacher()), "the teacher is an ensemble")):
    for weights in (dict(feature=1.0), dict(attention=1.0)):
      with pytest.raises(ValueError, match=f"needs a single ViT teacher.*{what}"):
        distill.fit_student(teacher, model_lib.init(STUDENT, 0), synthetic_split(32), tcfg,
                            distill.DistillConfig(**weights))


def test_cnn_teacher_class_and_input_mismatch():
  tcfg = train.TrainConfig(steps=1, batch_size=16, warmup_steps=0)
  cnn = model_lib.init(CNN_TEACHER.replace(num_classes=7), 0)
  with pytest.raises(ValueError, match="teacher has num_classes=7 but the student has 4"):
    distill.fit_student(cnn, model_lib.init(STUDENT, 0), synthetic_split(32), tcfg,
                        distill.DistillConfig())
  cnn = model_lib.init(CNN_TEACHER.replace(image_size=16), 0)
  with pytest.raises(ValueError, match="teacher takes 16x16x1 images, the student 8x8x1"):
    distill.fit_student((noisy_model(TINY, 1), cnn), model_lib.init(STUDENT, 0),
                        synthetic_split(32), tcfg, distill.DistillConfig())
  with pytest.raises(ValueError, match="teacher ensemble is empty"):
    distill.fit_student((), model_lib.init(STUDENT, 0), synthetic_split(32), tcfg,
                        distill.DistillConfig())


def test_resume_with_other_teacher_weights_is_refused(tmp_path):
  mesh = sharding.make_mesh(jax.devices()[:1])
  def die(step, metrics):
    if step == 2:
      raise Killed()
  with pytest.raises(Killed):
    _fit(mesh, workdir=tmp_path, on_step=die, steps=4)
  # Same teacher config, other weights: the saved state is not reused.
  tcfg = train.TrainConfig(steps=4, batch_size=16, warmup_steps=1, checkpoint_every=2,
                           log_every=1)
  with pytest.raises(ValueError, match="written for a different run.*aux"):
    distill.fit_student(noisy_model(TINY, 9), noisy_model(STUDENT, 2), synthetic_split(64),
                        tcfg, distill.DistillConfig(ce=0.5, soft=0.5, hard=0.0,
                                                    temperature=2.0),
                        mesh=mesh, workdir=tmp_path, progress=False)
