"""Pruning: exact sparsity, N:M patterns, masks through fine-tuning, structured."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, noisy_model, synthetic_split
from vitjax.models.inputs import preprocess
from vitjax import data as data_lib
from vitjax import export, leaves, sharding, train
from vitjax import model as model_lib
from vitjax.leaves import Masked, QuantizedWeight
from vitjax.transforms import chain, lowrank, only, prune, select, structured
from vitjax.transforms import quantize as q

CFG = TINY.replace(dim=32, mlp_dim=64, num_heads=4)


def _model(config=CFG, seed=0):
  return noisy_model(config, seed)


def _kernels(model):
  return {p[:-7]: leaf for p, leaf in model_lib.weight_leaves(model.params)
          if p.endswith("/kernel")}


def _images(n=4):
  return jax.random.normal(jax.random.PRNGKey(0), (n, 8, 8, 1))


def _one_device():
  return sharding.make_mesh(jax.devices()[:1])


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_layerwise_magnitude_has_exact_sparsity_and_drops_the_smallest(sparsity):
  m = _model()
  pruned = prune.magnitude(sparsity)(m)
  before = _kernels(m)
  for layer, leaf in _kernels(pruned).items():
    assert isinstance(leaf, Masked)
    n = leaf.mask.size
    assert int((~leaf.mask).sum()) == round(sparsity * n)
    w = np.abs(np.asarray(before[layer]))
    if 0 < sparsity:
      assert w[~np.asarray(leaf.mask)].max() <= w[np.asarray(leaf.mask)].min()
    np.testing.assert_array_equal(np.asarray(leaves.constrain(leaf).w)[~np.asarray(leaf.mask)], 0)


def test_global_magnitude_shares_one_threshold():
  m = _model()
  pruned = prune.magnitude(0.5, scope="global")(m)
  kept, dropped, total = [], [], 0
  for layer, leaf in _kernels(pruned).items():
    w = np.abs(np.asarray(_kernels(m)[layer]))
    mask = np.asarray(leaf.mask)
    kept.append(w[mask])
    dropped.append(w[~mask])
    total += mask.size
  kept, dropped = np.concatenate(kept), np.concatenate(dropped)
  assert dropped.max() <= kept.min()
  assert abs(len(dropped) - total / 2) <= 1
  sparsities = prune.sparsity_report(pruned).values()
  assert max(sparsities) - min(sparsities) > 0.05  # layers differ under one threshold


@pytest.mark.parametrize("n, m_", [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_n_m_pattern_holds_in_every_group(n, m_):
  pruned = prune.n_m(n, m_)(_model())
  for layer, leaf in _kernels(pruned).items():
    mask = np.asarray(leaf.mask)
    groups = mask.reshape(mask.shape[0] // m_, m_, mask.shape[1])
    assert np.all(groups.sum(1) == n), layer
  # The kept ones are the n largest of their group.
  w = np.abs(np.asarray(_kernels(_model())["head"])).reshape(-1, m_, 4)
  mask = np.asarray(_kernels(pruned)["head"].mask).reshape(-1, m_, 4)
  assert np.all(np.where(mask, w, np.inf).min(1) >= np.where(mask, -np.inf, w).max(1))


def test_masked_matmul_uses_only_kept_weights():
  leaf = _kernels(prune.magnitude(0.5)(_model()))["Transformer/encoderblock_0/MlpBlock_3/Dense_0"]
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 32))
  dense = np.asarray(leaf.w) * np.asarray(leaf.mask)
  np.testing.assert_allclose(leaves.matmul(x, leaf), np.asarray(x) @ dense, rtol=1e-5, atol=1e-5)


def test_masks_survive_fine_tuning_and_weights_stay_zero():
  pruned = chain(prune.n_m(2, 4, layers=r".*/MlpBlock_3/.*"),
                 prune.magnitude(0.5, exclude=r".*/MlpBlock_3/.*"))(_model())
  cfg = train.TrainConfig(steps=6, batch_size=16, warmup_steps=1, weight_decay=0.3,
                          learning_rate=1e-2)
  tuned = train.fit(pruned, synthetic_split(64, CFG), cfg, progress=False, mesh=_one_device())
  for layer, leaf in _kernels(tuned).items():
    before = _kernels(pruned)[layer]
    np.testing.assert_array_equal(leaf.mask, before.mask)
    np.testing.assert_array_equal(np.asarray(leaf.w)[~np.asarray(leaf.mask)], 0)
    assert not np.allclose(np.asarray(leaf.w), np.asarray(leaves.constrain(before).w))


def test_gradual_schedule_reaches_the_final_sparsity_along_the_cubic():
  assert float(prune.cubic_sparsity(0, 0.8, 0, 100)) == 0.0
  assert float(prune.cubic_sparsity(50, 0.8, 0, 100)) == pytest.approx(0.8 * (1 - 0.5 ** 3))
  assert float(prune.cubic_sparsity(200, 0.8, 0, 100)) == pytest.approx(0.8)
  start = prune.magnitude(0.0)(_model())
  hook = prune.gradual(0.6, 2, 8, every=2)
  for steps, want in ((4, float(prune.cubic_sparsity(4, 0.6, 2, 8))), (10, 0.6)):
    cfg = train.TrainConfig(steps=steps, batch_size=16, warmup_steps=1, log_every=1)
    tuned = train.fit(start, synthetic_split(64, CFG), cfg, post_update=hook,
                      progress=False, mesh=_one_device())
    assert 0 < want <= 0.6
    for layer, s in prune.sparsity_report(tuned).items():
      leaf = _kernels(tuned)[layer]
      assert s == pytest.approx(round(want * leaf.mask.size) / leaf.mask.size,
                                abs=1.0 / leaf.mask.size + 1e-9), (steps, layer)
      np.testing.assert_array_equal(np.asarray(leaf.w)[~np.asarray(leaf.mask)], 0)


def test_gradual_midway_sparsity_follows_the_schedule():
  start = prune.magnitude(0.0)(_model())
  hook = jax.jit(prune.gradual(0.8, 0, 10, every=5))
  params = hook(start.params, jnp.int32(5))
  want = float(prune.cubic_sparsity(5, 0.8, 0, 10))
  for layer, leaf in _kernels(start.replace(params=params)).items():
    assert 1 - float(leaf.mask.mean()) == pytest.approx(want, abs=1.0 / leaf.mask.size + 1e-6)
  same = hook(start.params, jnp.int32(6))  # not a pruning step
  assert all(bool(leaf.mask.all()) for leaf in _kernels(start.replace(params=same)).values())


def test_pruned_then_quantized_keeps_the_zeros(tmp_path):
  pq = chain(prune.magnitude(0.5), q.weight_only(8))(_model())
  leaf = _kernels(pq)["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query"]
  assert isinstance(leaf, Masked) and isinstance(leaf.w, QuantizedWeight)
  np.testing.assert_array_equal(np.asarray(leaf.w.qt.qvalue)[~np.asarray(leaf.mask)], 0)
  export.save_model(pq, tmp_path / "m")
  back = export.load_model(tmp_path / "m")
  np.testing.assert_array_equal(model_lib.apply(back, _images()), model_lib.apply(pq, _images()))


def test_static_int8_of_a_pruned_model_equals_static_int8_of_its_masked_weights(tmp_path):
  pruned = prune.magnitude(0.5, exclude=("embedding", "head"))(_model())
  dense = pruned.replace(params=jax.tree_util.tree_map(
      lambda leaf: leaves.constrain(leaf).w if isinstance(leaf, Masked) else leaf,
      pruned.params, is_leaf=lambda x: isinstance(x, Masked)))
  split = synthetic_split(32, CFG)
  calib = data_lib.Split(split.images, split.labels, "train")
  pq = q.static_int8(calib, progress=False)(pruned)
  dq = q.static_int8(calib, progress=False)(dense)
  name = "Transformer/encoderblock_1/MlpBlock_3/Dense_1"
  leaf = _kernels(pq)[name]
  assert isinstance(leaf, Masked) and isinstance(leaf.w, QuantizedWeight)
  assert pq.sites[name + "/input"] == dq.sites[name + "/input"]
  images = _images()
  np.testing.assert_array_equal(model_lib.apply(pq, images), model_lib.apply(dq, images))
  export.save_model(pq, tmp_path / "m")
  np.testing.assert_array_equal(model_lib.apply(export.load_model(tmp_path / "m"), images),
                                model_lib.apply(pq, images))


def test_static_int8_of_a_low_rank_layer_quantizes_its_input_and_both_factors(tmp_path):
  small = lowrank.svd(rank=8)(_model())
  split = synthetic_split(32, CFG)
  calib = data_lib.Split(split.images, split.labels, "train")
  sq = q.static_int8(calib, calibrator="minmax", symmetric=True, progress=False)(small)
  name = "Transformer/encoderblock_1/MlpBlock_3/Dense_0"
  leaf = _kernels(sq)[name]
  assert isinstance(leaf.u, QuantizedWeight) and isinstance(leaf.v, QuantizedWeight)
  # Calibrated on the model as it is served: int weights, float activations.
  weights_only = sq.replace(sites={})
  x = model_lib.linear_inputs(weights_only, preprocess(split.images, CFG))[name]
  site = sq.sites[name + "/input"]
  np.testing.assert_allclose(site.scale, np.abs(x).max() / 127, rtol=1e-6)
  # What the layer sees in the served model (earlier layers quantized too).
  x = model_lib.site_inputs(sq, preprocess(split.images, CFG))[name + "/input"]
  # (int8 input @ int8 u) in int32, then its float result @ int8 v (weight-only).
  s = float(site.scale)
  codes = np.clip(np.round(np.asarray(x) / s), -127, 127)
  v = np.asarray(leaf.v.dequantize())
  want = (codes @ np.asarray(leaf.u.qt.qvalue, np.float64)) * s * np.asarray(
      leaf.u.qt.scale[0]) @ v + np.asarray(select.get_module(sq.params, name)["bias"])
  got = model_lib.linear_inputs(sq, preprocess(split.images, CFG))[
      "Transformer/encoderblock_1/MlpBlock_3/Dense_1"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(jax.nn.gelu(want)), rtol=1e-4,
                             atol=1e-4)

  images = preprocess(split.images[:8], CFG)
  out = model_lib.apply(sq, images)
  export.save_model(sq, tmp_path / "m")
  np.testing.assert_array_equal(model_lib.apply(export.load_model(tmp_path / "m"), images),
                                out)


def _zero_head(model, block, head):
  params = jax.tree_util.tree_map(lambda a: a, model.params)
  attn = params["Transformer"][f"encoderblock_{block}"]["MultiHeadDotProductAttention_1"]
  hd = model.config.head_dim
  cols = slice(head * hd, (head + 1) * hd)
  for name in ("query", "key", "value"):
    attn[name]["kernel"] = attn[name]["kernel"].at[:, cols].set(0)
    attn[name]["bias"] = attn[name]["bias"].at[cols].set(0)
  attn["out"]["kernel"] = attn["out"]["kernel"].at[cols, :].set(0)
  return model.replace(params=params)


def _zero_neurons(model, block, neurons):
  params = jax.tree_util.tree_map(lambda a: a, model.params)
  mlp = params["Transformer"][f"encoderblock_{block}"]["MlpBlock_3"]
  neurons = jnp.asarray(neurons)
  mlp["Dense_0"]["kernel"] = mlp["Dense_0"]["kernel"].at[:, neurons].set(0)
  mlp["Dense_0"]["bias"] = mlp["Dense_0"]["bias"].at[neurons].set(0)
  mlp["Dense_1"]["kernel"] = mlp["Dense_1"]["kernel"].at[neurons, :].set(0)
  return model.replace(params=params)


@pytest.mark.parametrize("score", ["l1", "l2"])
def test_removing_zero_heads_and_neurons_leaves_logits_unchanged(score):
  m = _zero_head(_zero_head(_model(), 0, 2), 1, 0)
  m = _zero_neurons(_zero_neurons(m, 0, [3, 9, 40, 63]), 1, [0, 1, 2, 5])
  small = structured.heads_and_neurons(head_keep=0.75, mlp_keep=60 / 64, score=score)(m)
  assert small.config.block_heads == (3, 3) and small.config.block_mlp_dims == (60, 60)
  np.testing.assert_allclose(model_lib.apply(small, _images()), model_lib.apply(m, _images()),
                             rtol=1e-5, atol=1e-5)
  assert model_lib.flops_per_image(small) < model_lib.flops_per_image(m)
  kernels = _kernels(small)
  assert kernels["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query"].shape == (32, 24)
  assert kernels["Transformer/encoderblock_1/MlpBlock_3/Dense_1"].shape == (60, 32)


def test_taylor_scores_rank_a_useless_head_last():
  m = _zero_head(_model(), 0, 1)
  heads, neurons = structured.taylor_scores(m, synthetic_split(64, CFG))
  assert heads[0][1] == 0.0 and heads[0].min() == 0.0
  assert all(h.shape == (4,) for h in heads) and all(n.shape == (64,) for n in neurons)
  small = structured.heads_and_neurons(head_keep=[3, 4], score="taylor",
                                       calibration=synthetic_split(64, CFG))(m)
  np.testing.assert_allclose(model_lib.apply(small, _images()), model_lib.apply(m, _images()),
                             rtol=1e-5, atol=1e-5)


def test_structured_model_saves_and_reloads(tmp_path):
  small = structured.heads_and_neurons(head_keep=[1, 2], mlp_keep=[8, 16])(_model())
  export.save_model(small, tmp_path / "s")
  back = export.load_model(tmp_path / "s")
  assert back.config.block_heads == (1, 2)
  np.testing.assert_array_equal(model_lib.apply(back, _images()), model_lib.apply(small, _images()))


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_outside_0_1_is_refused(sparsity):
  with pytest.raises(ValueError, match=r"sparsity=.* is outside \[0, 1\)"):
    prune.magnitude(sparsity)
  with pytest.raises(ValueError, match=r"final=.* is outside \[0, 1\)"):
    prune.gradual(sparsity, 0, 10)


@pytest.mark.parametrize("n, m_, match", [
    (4, 4, "1 <= N < M"), (5, 4, "1 <= N < M"), (0, 4, "1 <= N < M"),
    (2, 5, "M=5 does not divide layer .* input dimension 32")])
def test_bad_n_m(n, m_, match):
  with pytest.raises(ValueError, match=match):
    prune.n_m(n, m_)(_model())


def test_pruning_all_heads_of_a_layer_is_refused():
  with pytest.raises(ValueError, match="head_keep leaves block 1 with 0 of its 4 heads"):
    structured.heads_and_neurons(head_keep=[2, 0])(_model())
  with pytest.raises(ValueError, match=r"head_keep=0 is outside \(0, 1\]"):
    structured.heads_and_neurons(head_keep=0)(_model())
  with pytest.raises(ValueError, match="head_keep leaves block 0 with 0 of its 4 heads"):
    structured.heads_and_neurons(head_keep=0.1)(_model())
  with pytest.raises(ValueError, match="mlp_keep leaves block 0 with 0 of its 64 neurons"):
    structured.heads_and_neurons(mlp_keep=[0, 3])(_model())
  with pytest.raises(ValueError, match="needs a labeled calibration split"):
    structured.heads_and_neurons(score="taylor")


def test_structured_refuses_compressed_weights_and_only():
  with pytest.raises(ValueError, match="structured pruning needs float weights"):
    structured.heads_and_neurons(head_keep=0.5)(q.weight_only(8)(_model()))
  with pytest.raises(TypeError, match="only\\(\\) restricts layer-by-layer transforms"):
    only("head", structured.heads_and_neurons(head_keep=0.5))
