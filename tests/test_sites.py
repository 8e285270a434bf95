"""Quantization sites of the ViT: addresses, rules, calibration, integer
matmuls in the compiled model, RepQ-ViT's reparameterization, and storage."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, noisy_model, synthetic_split
from vitjax import data, export, train
from vitjax import model as model_lib
from vitjax.models.inputs import preprocess
from vitjax.quantizers import (LogarithmicSpec, OperandsSpec, TwinUniformSpec, Uniform,
                               UniformSpec)
from vitjax.transforms import ptq, quantize, reparam, site_calibration
from vitjax.transforms.sites import SiteRule, assign, quantize_sites

BLOCK = "Transformer/encoderblock_1"
ATTN = f"{BLOCK}/MultiHeadDotProductAttention_1"


def _calibration(n=48, seed=0, origin="train"):
  s = synthetic_split(n, TINY, seed)
  return data.Split(s.images, s.labels, origin)


def _images(n=6, seed=3):
  return preprocess(synthetic_split(n, TINY, seed).images, TINY)


def test_every_op_of_the_vit_has_a_site():
  sites = set(model_lib.site_addresses(noisy_model()))
  per_block = {"LayerNorm_0/input", "LayerNorm_2/input", "MlpBlock_3/gelu",
               "MlpBlock_3/Dense_0/input", "MlpBlock_3/Dense_1/input",
               "MultiHeadDotProductAttention_1/qk", "MultiHeadDotProductAttention_1/softmax",
               "MultiHeadDotProductAttention_1/pv"} | {
                   f"MultiHeadDotProductAttention_1/{n}/input"
                   for n in ("query", "key", "value", "out")}
  want = {f"Transformer/encoderblock_{i}/{s}" for i in range(TINY.depth) for s in per_block}
  want |= {"embedding/input", "head/input", "Transformer/encoder_norm/input"}
  assert sites == want


def test_site_inputs_are_the_tensors_the_model_computes():
  m = noisy_model()
  x = _images()
  seen = model_lib.site_inputs(m, x)
  attention = model_lib.apply_with_intermediates(m, x)[1]["attention"][1]
  np.testing.assert_array_equal(np.asarray(seen[f"{ATTN}/softmax"]), np.asarray(attention))
  np.testing.assert_array_equal(np.asarray(seen[f"{ATTN}/pv"]["lhs"]), np.asarray(attention))
  q = seen[f"{ATTN}/qk"]["lhs"]
  ln = seen[f"{ATTN}/query/input"]
  p = m.params["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_1"]["query"]
  np.testing.assert_allclose(np.asarray(q).reshape(ln.shape[:2] + (-1,)),
                             np.asarray(ln @ p["kernel"] + p["bias"]), rtol=1e-5, atol=1e-6)


def test_rules_first_match_wins_and_every_rule_must_decide_a_site():
  m = noisy_model()
  chosen = assign(m, [SiteRule(".*/softmax", None),
                      SiteRule(".*/(qk|pv)", OperandsSpec(UniformSpec(), UniformSpec())),
                      SiteRule(".*", UniformSpec(bits=6))])
  assert f"{ATTN}/softmax" not in chosen and chosen[f"{ATTN}/gelu".replace(
      "MultiHeadDotProductAttention_1", "MlpBlock_3")].bits == 6
  assert isinstance(chosen[f"{ATTN}/qk"], OperandsSpec)
  with pytest.raises(ValueError, match=r"site rules \['.\*/sofmax'\] match no site"):
    assign(m, [SiteRule(".*/sofmax", LogarithmicSpec())])
  # A rule shadowed by an earlier one decides nothing: an error too.
  with pytest.raises(ValueError, match=r"match no site \(or only sites an earlier rule"):
    assign(m, [SiteRule(".*/softmax", None), SiteRule(f"{ATTN}/softmax", LogarithmicSpec())])
  with pytest.raises(ValueError, match="select no site to quantize"):
    assign(m, [SiteRule(".*", None)])
  with pytest.raises(ValueError, match="takes an OperandsSpec"):
    assign(m, [SiteRule(".*/qk", UniformSpec())])
  with pytest.raises(ValueError, match="takes a single spec"):
    assign(m, [SiteRule(".*/softmax", OperandsSpec(UniformSpec(), None))])
  with pytest.raises(ValueError, match="per-channel scale there has no integer matmul"):
    assign(m, [SiteRule(".*/Dense_0/input", UniformSpec(granularity="channel"))])
  with pytest.raises(ValueError, match="is not a valid regex"):
    SiteRule("(", UniformSpec())


def test_layer_patterns_with_an_empty_intersection_fail():
  m = noisy_model()
  with pytest.raises(ValueError, match="select no layer together"):
    quantize.weight_only(8, layers=".*/Dense_0", exclude=".*/MlpBlock_3/.*")(m)
  from vitjax.transforms.select import only
  with pytest.raises(ValueError, match="select no layer together"):
    only("head", quantize.weight_only(8, layers="embedding"))(m)


def test_calibration_refuses_the_test_split_nan_and_unknown_sites():
  m = noisy_model()
  with pytest.raises(ValueError, match="must come from the training split, but this split's "
                                       "origin is 'test'"):
    quantize_sites([SiteRule(".*", UniformSpec())], _calibration(origin="test"))
  mixed = _calibration().concat(_calibration(origin="test"))
  with pytest.raises(ValueError, match="origin is 'mixed'"):
    ptq.ptq(ptq.recipe_policy("minmax"), mixed)
  with pytest.raises(TypeError, match="must be a data.Split"):
    quantize_sites([SiteRule(".*", UniformSpec())], np.zeros((4, 8, 8, 1)))
  # A dataset's calibration split is from training, its test split is not.
  ds = data.make_dataset(synthetic_split(200), synthetic_split(50, seed=1), "s",
                         validation=20, calibration=20)
  assert ds.calibration.origin == "train" and ds.test.origin == "test"
  with pytest.raises(ValueError, match="origin is 'test'"):
    ptq.quantize_model(m, "minmax", ds.test)
  broken = m.replace(params=jax.tree_util.tree_map(lambda a: a, m.params))
  broken.params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"] = (
      broken.params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
      .at[0, 0].set(jnp.inf))
  with pytest.raises(ValueError, match=r"the values at site .*MlpBlock_3/(Dense_1/input|gelu) "
                                       "hold NaN or inf"):
    quantize_sites([SiteRule(".*/MlpBlock_3/(Dense_1/input|gelu)", UniformSpec())],
                   _calibration())(broken)
  with pytest.raises(ValueError, match="unknown quantization sites"):
    site_calibration.record(m, _calibration(), ["Transformer/encoderblock_9/gelu"])


def test_log2_on_a_site_with_negative_values_is_refused():
  with pytest.raises(ValueError, match=r"needs non-negative values, but "
                                       r".*MlpBlock_3/gelu has values down to -"):
    quantize_sites([SiteRule(".*/gelu", LogarithmicSpec())], _calibration(),
                   progress=False)(noisy_model())


def test_a_linear_site_with_an_int8_weight_is_an_integer_matmul():
  m = quantize.weight_only(8)(noisy_model())
  q = quantize_sites([SiteRule(".*/Dense_0/input", UniformSpec(symmetric=False))],
                     _calibration(), progress=False)(m)
  x = _images()
  u = q.sites[f"{BLOCK}/MlpBlock_3/Dense_0/input"]
  assert isinstance(u, Uniform) and u.shift is not None
  seen = model_lib.site_inputs(q, x)[f"{BLOCK}/MlpBlock_3/Dense_0/input"]
  layer = q.params["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_0"]
  w = layer["kernel"]
  codes_x = np.asarray(u.codes(seen)).astype(np.int64)
  codes_w = np.asarray(w.qt.qvalue).astype(np.int64)
  wscale = np.asarray(w.qt.scale[0])
  ints = codes_x @ codes_w
  # The layer's output, computed from integer codes by hand.
  want = (ints * float(u.scale) * wscale
          - float(u.shift) * (codes_w * wscale).sum(0) + np.asarray(layer["bias"]))
  got = np.asarray(jax.jit(lambda mm, xx: model_lib.linear_inputs(mm, xx))(q, x)[
      f"{BLOCK}/MlpBlock_3/Dense_1"])
  # Dense_1's input is gelu(Dense_0's output).
  np.testing.assert_allclose(got, np.asarray(jax.nn.gelu(jnp.asarray(want, jnp.float32))),
                             rtol=1e-4, atol=1e-5)


def _integer_dots(hlo: str) -> list[str]:
  return [line for line in hlo.splitlines()
          if re.search(r"= s32\[[^\]]*\][^ ]* dot\(", line)]


def test_compiled_w8a8_model_has_integer_dots_for_all_six_matmuls_of_every_block():
  m = ptq.quantize_model(noisy_model(), "minmax", _calibration(), progress=False)
  x = _images(2)
  hlo = jax.jit(model_lib.apply).lower(m, x).compile().as_text()
  dots = _integer_dots(hlo)
  # 6 per block (query, key, value, q.kT, probs.v, out; Dense_0, Dense_1 make 8
  # matmuls in all), plus the patch embedding and the head.
  assert len(dots) == TINY.depth * 8 + 2, "\n".join(dots)
  float_dots = [line for line in hlo.splitlines()
                if re.search(r"= f32\[[^\]]*\][^ ]* dot\(", line)]
  assert float_dots == []
  # The float model has no integer dot.
  assert _integer_dots(jax.jit(model_lib.apply).lower(noisy_model(), x).compile()
                       .as_text()) == []


@pytest.mark.parametrize("recipe", ["fqvit", "ptq4vit", "repqvit"])
def test_log_and_twin_recipes_keep_every_matmul_an_integer_dot(recipe):
  m = ptq.quantize_model(noisy_model(), recipe, _calibration(), w_bits=4, a_bits=4,
                         progress=False)
  x = _images(2)
  hlo = jax.jit(model_lib.apply).lower(m, x).compile().as_text()
  # probs.v multiplies the int8 planes of the log / twin-uniform probabilities,
  # and ptq4vit's Dense_1 those of its twin-uniform GELU output: still one
  # integer dot per matmul, and no float dot anywhere.
  assert len(_integer_dots(hlo)) == TINY.depth * 8 + 2
  assert not re.search(r"= f32\[[^\]]*\][^ ]* dot\(", hlo)
  pv = m.sites[f"{ATTN}/pv"].lhs
  assert type(pv).__name__ == {"ptq4vit": "TwinUniform"}.get(recipe, "Logarithmic")
  # The same quantizers at the value sites instead (softmax, gelu: dequantized
  # values, then float matmuls) give the same logits.
  moved = dict(m.sites)
  for i in range(TINY.depth):
    block = f"Transformer/encoderblock_{i}"
    attn = f"{block}/MultiHeadDotProductAttention_1"
    moved[f"{attn}/softmax"] = moved[f"{attn}/pv"].lhs
    moved[f"{attn}/pv"] = moved[f"{attn}/pv"].replace(lhs=None)
    if recipe == "ptq4vit":
      moved[f"{block}/MlpBlock_3/gelu"] = moved.pop(f"{block}/MlpBlock_3/Dense_1/input")
  fake = m.replace(sites=moved)
  want = np.asarray(model_lib.apply(fake, x))
  assert np.ptp(want) > 0.5  # non-trivial logits
  np.testing.assert_allclose(np.asarray(model_lib.apply(m, x)), want, rtol=1e-4, atol=1e-4)
  assert _integer_dots(jax.jit(model_lib.apply).lower(fake, x).compile().as_text()) != []


def test_reparameterization_keeps_fp32_outputs_and_equalizes_channel_ranges():
  m = noisy_model()
  calib = _calibration()
  r = reparam.reparameterize(calib, progress=False)(m)
  x = _images(8)
  np.testing.assert_allclose(np.asarray(model_lib.apply(r, x)),
                             np.asarray(model_lib.apply(m, x)), atol=1e-5)
  address = f"{BLOCK}/MlpBlock_3/Dense_0/input"
  before = site_calibration.record(m, calib, [address], progress=False)[address].values
  after = site_calibration.record(r, calib, [address], progress=False)[address].values
  assert np.ptp(before[-1] - before[-2]) > 0.5  # channel ranges differ before ...
  np.testing.assert_allclose(after[-2], after[-2].mean(), atol=1e-4)  # ... and not after
  np.testing.assert_allclose(after[-1], after[-1].mean(), atol=1e-4)
  with pytest.raises(ValueError, match="reparameterize before compressing weights"):
    reparam.reparameterize(calib, progress=False)(quantize.weight_only(8)(m))


def test_calibration_keeps_a_random_sample_of_each_batch_without_repeats():
  m = noisy_model()
  calib = _calibration(n=8)
  address = f"{BLOCK}/MlpBlock_3/Dense_0/input"
  seen = model_lib.site_inputs(m, preprocess(calib.images, TINY))[address]
  rows = np.asarray(seen).reshape(-1, seen.shape[-1])
  per_batch = 4 * len(rows) // 8

  def sample(seed):
    return site_calibration.record(m, calib, [address], batch_size=4, max_rows=20, seed=seed,
                                   progress=False)[address].values

  got = sample(0)
  idx = [int(np.argmin(np.abs(rows - r).sum(1))) for r in got[:-2]]
  np.testing.assert_allclose(got[:-2], rows[idx], rtol=1e-5, atol=1e-6)
  # 10 rows of each of the 2 batches, none twice, and not the batch's first rows.
  assert len(idx) == 20 and len(set(idx)) == 20
  assert [i // per_batch for i in idx] == [0] * 10 + [1] * 10
  assert max(i % per_batch for i in idx) >= 10
  # The extremes are over every row, not the sample.
  np.testing.assert_allclose(got[-2:], [rows.min(0), rows.max(0)], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(sample(0), got)
  assert not np.array_equal(sample(1)[:-2], got[:-2])


def test_hessian_weights_are_squared_loss_gradients_of_each_value():
  m = noisy_model()
  calib = _calibration(n=4)
  address = f"{ATTN}/softmax"
  got = site_calibration.record(m, calib, [address], gradients=frozenset([address]),
                                max_rows=10 ** 6, progress=False)[address]
  x = preprocess(calib.images, TINY)
  probs = model_lib.site_inputs(m, x)[address]

  def loss(delta):
    logits, _ = model_lib.apply_with_sites(m, x, {address: delta})
    labels = jnp.argmax(model_lib.apply(m, x), -1)
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  g2 = np.asarray(jax.grad(loss)(jnp.zeros_like(probs))) ** 2
  rows = np.asarray(probs).reshape(-1, probs.shape[-1])
  g2rows = g2.reshape(rows.shape)
  assert got.values.shape == (len(rows) + 2, rows.shape[1]) and g2rows.max() > 0
  # Every sampled row (all of them here) with its own squared gradient.
  idx = [int(np.argmin(np.abs(rows - r).sum(1))) for r in got.values[:-2]]
  np.testing.assert_allclose(got.values[:-2], rows[idx], rtol=1e-5, atol=1e-7)
  # float32 gradients of two differently compiled programs: up to ~2e-4 apart
  # on AVX2 for the smallest squared gradients (a scale bug, such as 1/B^2,
  # is orders of magnitude off)
  np.testing.assert_allclose(got.weights[:-2], g2rows[idx], rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("recipe", ["minmax", "fqvit", "ptq4vit", "repqvit+gptq"])
def test_ptq_checkpoints_store_integers_and_reload_bit_identically(tmp_path, recipe):
  m = ptq.quantize_model(noisy_model(), recipe, _calibration(), w_bits=4, a_bits=6,
                         layernorm_inputs=True, progress=False)
  export.save_model(m, tmp_path / "q")
  back = export.load_model(tmp_path / "q")
  x = _images()
  np.testing.assert_array_equal(np.asarray(model_lib.apply(back, x)),
                                np.asarray(model_lib.apply(m, x)))
  assert set(back.sites) == set(m.sites) and len(m.sites) > 20
  meta = export.read_metadata(tmp_path / "q")
  stored = {info["path"]: info["dtype"] for info in meta["arrays"].values()}
  # No float shadow of any quantized weight: only codes (int4/int8) and scales.
  for path, dtype in stored.items():
    if path.endswith("qvalue"):
      assert dtype in ("int4", "int8"), path
  kernels = [p for p in stored if p.endswith("/kernel")]
  assert kernels == []
  assert any(p.startswith("sites/") for p in stored)


def test_a_checkpoint_naming_a_site_the_model_lacks_is_refused(tmp_path):
  m = noisy_model()
  bad = m.replace(sites={"Transformer/encoderblock_7/MlpBlock_3/gelu": Uniform(
      jnp.float32(0.1), None, 8)})
  with pytest.raises(ValueError, match="does not exist in this model"):
    export.save_model(bad, tmp_path / "bad")
  assert not (tmp_path / "bad").exists()


def test_training_a_model_with_site_quantizers_is_refused():
  m = ptq.quantize_model(noisy_model(), "minmax", _calibration(), progress=False)
  with pytest.raises(ValueError, match="activation quantizers at .* sites"):
    train.fit(m, synthetic_split(64), train.TrainConfig(steps=2, batch_size=8, warmup_steps=0))


def test_quantizing_a_site_twice_is_refused():
  rules = [SiteRule(".*/softmax", TwinUniformSpec(hessian=False))]
  once = quantize_sites(rules, _calibration(), progress=False)(noisy_model())
  with pytest.raises(ValueError, match="already have quantizers"):
    quantize_sites(rules, _calibration(), progress=False)(once)


def test_structured_pruning_of_a_site_quantized_model_is_refused():
  from vitjax.transforms import structured
  m = quantize_sites([SiteRule(".*/Dense_0/input", UniformSpec())], _calibration(),
                     progress=False)(noisy_model())
  with pytest.raises(ValueError, match="prune first, then quantize its sites"):
    structured.heads_and_neurons(head_keep=0.5)(m)


def test_a_site_its_layer_cannot_serve_fails_when_quantized_not_later():
  dynamic = quantize.dynamic_int8()(noisy_model())
  with pytest.raises(ValueError, match="cannot also have an input site quantizer"):
    quantize_sites([SiteRule(".*/Dense_0/input", UniformSpec())], _calibration(),
                   progress=False)(dynamic)
