"""Quantization: AQT leaves, integer arithmetic, calibration, QAT, storage."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import TINY, noisy_model, synthetic_split
from vitjax import export, leaves
from vitjax import model as model_lib
from vitjax.leaves import FakeQuantWeight, QuantizedWeight
from vitjax.leaves.quantized import quantize_per_channel
from vitjax.models.inputs import preprocess
from vitjax import data
from vitjax.quantizers import histogram
from vitjax.quantizers.uniform import fit_uniform
from vitjax.transforms import chain, only, site_calibration
from vitjax.transforms import quantize as q


def _noisy_model(seed=0):
  return noisy_model(TINY, seed, scale=0.2)


def _calibration(n, seed=0):
  split = synthetic_split(n, seed=seed)
  return data.Split(split.images, split.labels, "train")


def _site(model, layer):
  return model.sites[layer + "/input"]


def _images(n=6, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 8, 8, 1))


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_round_trip_error_is_at_most_half_a_step_per_channel(bits):
  w = jax.random.normal(jax.random.PRNGKey(bits), (64, 24)) * jnp.linspace(0.1, 3, 24)
  qt = quantize_per_channel(w, bits)
  scale = np.asarray(qt.scale[0])
  assert scale.shape == (1, 24)
  err = np.abs(np.asarray(w) - np.asarray(qt.dequant()))
  assert np.all(err <= scale / 2 + 1e-6)
  values = np.asarray(qt.qvalue).astype(np.int32)
  assert qt.qvalue.dtype == (jnp.int4 if bits == 4 else jnp.int8)
  assert values.min() >= -(2 ** (bits - 1) - 1) and values.max() <= 2 ** (bits - 1) - 1
  assert np.all(np.abs(values).max(0) == 2 ** (bits - 1) - 1)  # each channel uses its range


def _static_leaf(w, act_scale, shift=None):
  leaf = QuantizedWeight(quantize_per_channel(w, 8), bits=8, activations="static")
  return leaf.replace(act_scale=jnp.float32(act_scale),
                      act_shift=None if shift is None else jnp.float32(shift))


def test_static_int8_matmul_equals_numpy_integer_reference_exactly():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(32, 16)).astype(np.float32))
  x = jnp.asarray(rng.normal(size=(3, 5, 32)).astype(np.float32))
  leaf = _static_leaf(w, 3.0 / 127.5)
  got = np.asarray(jax.jit(leaves.matmul)(x, leaf))
  wq = np.asarray(leaf.qt.qvalue).astype(np.int32)
  sw = np.asarray(leaf.qt.scale[0])
  xq = np.clip(np.round(np.asarray(x) / np.float32(3.0 / 127.5)), -127, 127).astype(np.int32)
  acc = np.einsum("btk,kn->btn", xq, wq)  # exact int32 accumulation
  want = acc.astype(np.float32) * np.float32(3.0 / 127.5) * sw
  np.testing.assert_array_equal(got, want)


def test_static_int8_with_shift_subtracts_the_shift_exactly():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(32, 16)).astype(np.float32))
  x = jnp.asarray(rng.uniform(-0.2, 3.0, size=(4, 32)).astype(np.float32))  # post-GELU-like
  leaf = _static_leaf(w, 1.6 / 127.5, shift=-1.4)
  got = np.asarray(jax.jit(leaves.matmul)(x, leaf))
  s = np.float32(1.6 / 127.5)
  xq = np.clip(np.round((np.asarray(x) - np.float32(1.4)) / s), -127, 127).astype(np.int32)
  wq = np.asarray(leaf.qt.qvalue).astype(np.int32)
  sw = np.asarray(leaf.qt.scale[0])
  want = (xq @ wq).astype(np.float32) * s * sw + np.float32(1.4) * (wq.sum(0) * sw[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got, np.asarray(x) @ np.asarray(w), atol=0.15)


def test_dynamic_int8_matmul_matches_per_token_integer_reference():
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(32, 16)).astype(np.float32))
  x = jnp.asarray(rng.normal(size=(2, 7, 32)).astype(np.float32) * np.arange(1, 8)[:, None])
  leaf = QuantizedWeight(quantize_per_channel(w, 8), bits=8, activations="dynamic")
  got = np.asarray(jax.jit(leaves.matmul)(x, leaf))
  sx = np.abs(np.asarray(x)).max(-1, keepdims=True) / np.float32(127.5)  # per token
  xq = np.clip(np.round(np.asarray(x) / sx), -127, 127).astype(np.int32)
  wq = np.asarray(leaf.qt.qvalue).astype(np.int32)
  want = (xq @ wq).astype(np.float32) * sx * np.asarray(leaf.qt.scale[0])
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)


def test_int8_dots_really_run_in_integers():
  leaf = QuantizedWeight(quantize_per_channel(jnp.ones((32, 16)), 8), bits=8,
                         activations="dynamic")
  hlo = jax.jit(leaves.matmul).lower(jnp.ones((4, 32)), leaf).compile().as_text()
  dots = [line for line in hlo.splitlines() if " dot(" in line]
  assert dots and all("s32[" in line for line in dots)


def test_zeroing_qvalue_changes_the_output():
  """AQT's Flax SERVE silently re-quantizes a float kernel when its int entry is
  missing; here the int values are the only copy of the weight."""
  m = q.weight_only(8)(_noisy_model())
  params = jax.tree_util.tree_map(lambda a: a, m.params)
  dense = params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]
  dense["kernel"] = dense["kernel"].replace(
      qt=dense["kernel"].qt.replace(qvalue=jnp.zeros_like(dense["kernel"].qt.qvalue)))
  zeroed = m.replace(params=params)
  assert not np.allclose(model_lib.apply(zeroed, _images()), model_lib.apply(m, _images()))


def test_quantized_model_errors_order_by_bits():
  m = _noisy_model()
  ref = model_lib.apply(m, _images())
  def rel_err(t):
    got = jax.jit(model_lib.apply)(t(m), _images())
    return float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
  int8, dyn, int4, int2 = (rel_err(t) for t in (q.weight_only(8), q.dynamic_int8(),
                                                 q.weight_only(4), q.weight_only(2)))
  assert int8 < 0.08 and dyn < 0.1
  assert int8 < int4 < int2 and dyn < int4


def test_every_linear_layer_is_quantized_and_bytes_shrink():
  m = _noisy_model()
  qm = q.weight_only(8)(m)
  kernels = [leaf for path, leaf in model_lib.weight_leaves(qm.params) if path.endswith("kernel")]
  assert len(kernels) == 2 + TINY.depth * 6 and all(isinstance(k, QuantizedWeight) for k in kernels)
  n_kernel = sum(int(np.prod(k.shape)) for k in kernels)
  saved = model_lib.stored_bytes(m) - model_lib.stored_bytes(qm)
  assert saved == 3 * n_kernel - 4 * sum(k.shape[1] for k in kernels)  # 4 B -> 1 B, + scales
  q4 = q.weight_only(4)(m)
  assert model_lib.stored_bytes(m) - model_lib.stored_bytes(q4) == \
      3.5 * n_kernel - 4 * sum(k.shape[1] for k in kernels)


def test_layer_patterns_keep_embedding_and_head_in_float():
  qm = q.weight_only(8, exclude=("embedding", "head"))(_noisy_model())
  paths = dict(model_lib.weight_leaves(qm.params))
  assert isinstance(paths["embedding/kernel"], jax.Array)
  assert isinstance(paths["head/kernel"], jax.Array)
  assert isinstance(paths["Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"], QuantizedWeight)
  only_mlp = only(r".*/MlpBlock_3/.*", q.weight_only(4))(_noisy_model())
  paths = dict(model_lib.weight_leaves(only_mlp.params))
  assert isinstance(paths["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"], QuantizedWeight)
  assert isinstance(paths["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel"],
                    jax.Array)


def test_histogram_calibrators_pick_the_expected_bounds():
  x = np.random.default_rng(0).normal(size=1_000_000)
  hist = histogram.Histogram.of(x)
  assert histogram.choose_bound(hist, "minmax") == pytest.approx(np.abs(x).max())
  # P(|x| > 3.89) = 1e-4 for a standard normal.
  assert histogram.choose_bound(hist, "percentile", percentile=99.99) == pytest.approx(3.89, abs=0.05)
  # The MSE-optimal 8-bit clip of a Gaussian is about 3.9 sigma (Banner et al., ACIQ),
  # for 4 bits about 2.55 sigma.
  assert histogram.choose_bound(hist, "mse", bits=8) == pytest.approx(3.9, abs=0.25)
  assert histogram.choose_bound(hist, "mse", bits=4) == pytest.approx(2.55, abs=0.15)
  outliers = np.concatenate([np.random.default_rng(1).uniform(-1, 1, 100_000), [40.0]])
  hist = histogram.Histogram.of(outliers)
  assert histogram.choose_bound(hist, "minmax") == 40.0
  assert histogram.choose_bound(hist, "percentile", percentile=99.9) == pytest.approx(1.0, abs=0.03)


def test_static_calibration_records_ranges_and_shifts_skewed_inputs():
  m = _noisy_model()
  calib = _calibration(64)
  layers = ["Transformer/encoderblock_0/MlpBlock_3/Dense_1", "embedding"]
  samples = site_calibration.record(m, calib, [f"{k}/input" for k in layers],
                                    progress=False)
  x = model_lib.linear_inputs(m, preprocess(jnp.asarray(calib.images), TINY))
  gelu_in = np.asarray(x[layers[0]])
  rows = samples[layers[0] + "/input"].values
  flat = gelu_in.reshape(-1, gelu_in.shape[-1])
  np.testing.assert_allclose(rows[-2], flat.min(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rows[-1], flat.max(0), rtol=1e-5, atol=1e-6)
  static = q.static_int8(calib, progress=False)(m)
  leaf = dict(model_lib.weight_leaves(static.params))[layers[0] + "/kernel"]
  assert isinstance(leaf, QuantizedWeight) and leaf.activations == "float"
  # Calibrated on the model as served: int8 weights, float activations.
  x = model_lib.linear_inputs(static.replace(sites={}),
                              preprocess(jnp.asarray(calib.images), TINY))
  gelu_in = np.asarray(x[layers[0]])
  # Post-GELU inputs are skewed: shifted; the patch embedding's are not.
  assert _site(static, layers[0]).shift is not None
  assert float(_site(static, layers[0]).shift) == pytest.approx(
      -(gelu_in.min() + gelu_in.max()) / 2, rel=1e-5)
  sym = q.static_int8(calib, symmetric=True, calibrator="minmax", progress=False)(m)
  site = _site(sym, layers[0])
  assert site.shift is None
  assert float(site.scale) == pytest.approx(np.abs(gelu_in).max() / 127, rel=1e-5)


def test_qat_gradient_is_the_straight_through_gradient():
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(size=(16, 8)).astype(np.float32))
  x = jnp.asarray(rng.normal(size=(5, 16)).astype(np.float32))
  g = jnp.asarray(rng.normal(size=(5, 8)).astype(np.float32))
  leaf = FakeQuantWeight(w, bits=4, act_bits=8)
  grad = jax.grad(lambda lf: (leaves.matmul(x, lf) * g).sum())(leaf).w
  # STE: d round(.)/d. = 1, so dL/dw = fq(x)^T g with fq(x) the fake-quantized input.
  sx = np.abs(np.asarray(x)).max(-1, keepdims=True) / 127.5
  fq_x = np.clip(np.round(np.asarray(x) / sx), -127, 127) * sx
  np.testing.assert_allclose(grad, fq_x.T @ np.asarray(g), rtol=1e-5, atol=1e-5)
  # The forward pass is the fake-quantized product.
  wq = quantize_per_channel(w, 4)
  np.testing.assert_allclose(leaves.matmul(x, leaf), fq_x @ np.asarray(wq.dequant()),
                             rtol=1e-5, atol=1e-5)


def test_convert_qat_serves_the_same_forward_pass():
  m = q.qat(4, 8)(_noisy_model())
  assert leaves.trainable_mask(m.params)["head"]["kernel"].w is True
  served = q.convert_qat()(m)
  kernel = dict(model_lib.weight_leaves(served.params))["head/kernel"]
  assert isinstance(kernel, QuantizedWeight) and kernel.qt.qvalue.dtype == jnp.int4
  np.testing.assert_allclose(jax.jit(model_lib.apply)(served, _images()),
                             jax.jit(model_lib.apply)(m, _images()), rtol=1e-4, atol=1e-4)


def _stored_arrays(path):
  checkpointer = ocp.StandardCheckpointer()
  arrays = checkpointer.restore(path / export.ARRAYS_DIR)
  checkpointer.close()
  return arrays


@pytest.mark.parametrize("bits", [8, 4])
def test_checkpoint_stores_ints_and_no_float_copy(tmp_path, bits):
  m = _noisy_model()
  qm = q.dynamic_int8(bits=bits)(m)
  disk = export.save_model(qm, tmp_path / "m")
  stored = _stored_arrays(tmp_path / "m")
  kernels = [k for p, k in model_lib.weight_leaves(m.params) if p.endswith("kernel")]
  n_kernel = sum(int(np.prod(k.shape)) for k in kernels)
  n_float = sum(int(np.prod(a.shape)) for p, a in model_lib.weight_leaves(m.params)
                if not p.endswith("kernel"))
  n_scales = sum(k.shape[1] for k in kernels)
  if bits == 8:
    assert stored["int8"].dtype == np.int8 and stored["int8"].size == n_kernel
    assert "uint8" not in stored
  else:  # two int4 values per byte
    assert "int8" not in stored and stored["uint8"].dtype == np.uint8
    assert stored["uint8"].size == sum((int(np.prod(k.shape)) + 1) // 2 for k in kernels)
  # The only floats are biases, norms, embeddings and one scale per output
  # channel: no float copy of any quantized kernel.
  assert set(stored) <= {"int8", "uint8", "float32"}
  assert stored["float32"].size == n_float + n_scales
  back = export.load_model(tmp_path / "m")
  np.testing.assert_array_equal(jax.jit(model_lib.apply)(back, _images()),
                                jax.jit(model_lib.apply)(qm, _images()))
  kernel = dict(model_lib.weight_leaves(back.params))["head/kernel"]
  assert kernel.qt.qvalue.dtype == (jnp.int4 if bits == 4 else jnp.int8)
  assert disk < export.save_model(m, tmp_path / "f")


@pytest.mark.parametrize("bits", [1, 9, 0, 2.5])
def test_bits_outside_2_to_8_are_refused(bits):
  with pytest.raises(ValueError, match=r"bits=.* is outside the supported range 2..8"):
    q.weight_only(bits)
  with pytest.raises(ValueError, match=r"bits=.* is outside the supported range 2..8"):
    q.qat(bits)


def test_bad_calibration_sets_are_refused():
  empty = data.Split(np.zeros((0, 8, 8, 1), np.uint8), np.zeros(0, np.int32), "train")
  with pytest.raises(ValueError, match="calibration set is empty"):
    q.static_int8(empty)
  bad = np.zeros((4, 8, 8, 1), np.float32)
  bad[1, 2, 3, 0] = np.nan
  with pytest.raises(ValueError, match="calibration images hold NaN or inf"):
    q.static_int8(data.Split(bad, np.zeros(4, np.int32), "train"))
  bad[1, 2, 3, 0] = np.inf
  with pytest.raises(ValueError, match="calibration images hold NaN or inf"):
    q.static_int8(data.Split(bad, np.zeros(4, np.int32), "train"))
  with pytest.raises(ValueError, match="method='kl'"):
    q.static_int8(_calibration(4), calibrator="kl")
  with pytest.raises(ValueError, match="origin is 'test'"):
    q.static_int8(data.Split(bad, np.zeros(4, np.int32), "test"))


def test_pattern_that_matches_nothing_is_refused():
  with pytest.raises(ValueError, match="layer pattern 'blocks/.*' matches no linear layer"):
    only("blocks/.*", q.weight_only(8))(_noisy_model())
  with pytest.raises(ValueError, match="matches no linear layer"):
    q.weight_only(8, exclude="heads")(_noisy_model())


def test_quantizing_twice_needs_requantize():
  qm = q.weight_only(8)(_noisy_model())
  with pytest.raises(ValueError, match="already quantized .*requantize=True"):
    q.dynamic_int8()(qm)
  again = q.dynamic_int8(requantize=True)(qm)
  kernel = dict(model_lib.weight_leaves(again.params))["head/kernel"]
  assert kernel.activations == "dynamic"
  with pytest.raises(ValueError, match="set up for QAT"):
    q.weight_only(8)(q.qat(4)(_noisy_model()))


def test_chain_composes_quantizers_over_disjoint_layers():
  t = chain(only(r".*/MlpBlock_3/.*", q.weight_only(4)),
            q.dynamic_int8(exclude=r".*/MlpBlock_3/.*"))
  paths = dict(model_lib.weight_leaves(t(_noisy_model()).params))
  assert paths["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].bits == 4
  assert paths["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].activations == "dynamic"


def test_int4_values_survive_save_and_load_exactly(tmp_path):
  w = jnp.asarray(np.tile(np.arange(-7, 8, dtype=np.float32)[:, None], (1, 16)))
  leaf = QuantizedWeight(quantize_per_channel(w, 4), bits=4)
  assert set(np.unique(np.asarray(leaf.qt.qvalue).astype(int))) == set(range(-7, 8))
  m = _noisy_model()
  params = dict(m.params)
  params["head"] = {**params["head"], "kernel": QuantizedWeight(
      quantize_per_channel(params["head"]["kernel"], 4), bits=4)}
  # Every int4 value -7..7 sits in the head, through save_model to disk and back.
  head = np.asarray(params["head"]["kernel"].qt.qvalue).astype(np.int8)
  params["head"]["kernel"] = params["head"]["kernel"].replace(
      qt=params["head"]["kernel"].qt.replace(
          qvalue=jnp.asarray(np.resize(np.arange(-7, 8, dtype=np.int8), head.shape)
                             .astype(ml_dtypes.int4))))
  m = m.replace(params=params)
  export.save_model(m, tmp_path / "m")
  stored = _stored_arrays(tmp_path / "m")
  assert "int4" not in stored and stored["uint8"].dtype == np.uint8  # packed on disk
  back = export.load_model(tmp_path / "m")
  got = back.params["head"]["kernel"].qt.qvalue
  assert got.dtype == jnp.int4
  np.testing.assert_array_equal(np.asarray(got).astype(np.int8),
                                np.resize(np.arange(-7, 8, dtype=np.int8), head.shape))
  np.testing.assert_array_equal(jax.jit(model_lib.apply)(back, _images()),
                                jax.jit(model_lib.apply)(m, _images()))


def test_weight_only_matmul_equals_x_times_the_dequantized_weight():
  rng = np.random.default_rng(4)
  w = jnp.asarray(rng.normal(size=(32, 16)).astype(np.float32))
  x = rng.normal(size=(3, 5, 32)).astype(np.float32)
  for bits in (8, 4):
    leaf = QuantizedWeight(quantize_per_channel(w, bits), bits=bits, activations="float")
    wq = np.asarray(leaf.qt.qvalue).astype(np.float32) * np.asarray(leaf.qt.scale[0])
    got = np.asarray(jax.jit(leaves.matmul)(jnp.asarray(x), leaf))
    np.testing.assert_allclose(got, x @ wq, rtol=1e-5, atol=1e-5)
    assert np.abs(got - x @ np.asarray(w)).max() > 1e-4  # quantization really happened


def test_convert_qat_without_activation_bits_is_weight_only_and_exact():
  m = q.qat(4, None)(_noisy_model())
  served = q.convert_qat()(m)
  for path, leaf in model_lib.weight_leaves(served.params):
    if path.endswith("/kernel"):
      assert isinstance(leaf, QuantizedWeight) and leaf.activations == "float", path
  x = np.asarray(_images())
  np.testing.assert_allclose(jax.jit(model_lib.apply)(served, x),
                             jax.jit(model_lib.apply)(m, x), rtol=1e-5, atol=1e-5)
  # Each served layer computes x @ dequant(w) of the 4-bit per-channel weights.
  kernel = dict(model_lib.weight_leaves(served.params))["head/kernel"]
  qat_w = np.asarray(dict(model_lib.weight_leaves(m.params))["head/kernel"].w)
  step = np.abs(qat_w).max(0) / 7.5
  want = np.clip(np.round(qat_w / step), -7, 7) * step
  np.testing.assert_allclose(np.asarray(kernel.dequantize()), want, rtol=1e-5, atol=1e-6)


def test_asymmetric_static_calibration_sets_shift_and_scale_from_the_data():
  m = _noisy_model()
  calib = _calibration(48)
  static = q.static_int8(calib, symmetric=False, calibrator="minmax", progress=False)(m)
  # Each site calibrated on the model as served: int8 weights, float inputs.
  inputs = model_lib.linear_inputs(static.replace(sites={}),
                                   preprocess(jnp.asarray(calib.images), TINY))
  x = np.asarray(_images())
  for layer, xin in inputs.items():
    xin = np.asarray(xin, np.float64)
    lo, hi = xin.min(), xin.max()
    site = _site(static, layer)
    assert float(site.shift) == pytest.approx(-(lo + hi) / 2, rel=1e-5, abs=1e-6)
    assert float(site.scale) == pytest.approx((hi - lo) / 2 / 127, rel=1e-4)
  # One layer of the whole model against a NumPy integer reference.
  layer = "Transformer/encoderblock_0/MlpBlock_3/Dense_1"
  leaf = dict(model_lib.weight_leaves(static.params))[layer + "/kernel"]
  site = _site(static, layer)
  xin = np.asarray(model_lib.linear_inputs(m, preprocess(jnp.asarray(x), TINY))[layer])
  s, shift = np.float32(site.scale), np.float32(site.shift)
  xq = np.clip(np.round((xin + shift) / s), -127, 127).astype(np.int32)
  wq = np.asarray(leaf.qt.qvalue).astype(np.int32)
  sw = np.asarray(leaf.qt.scale[0])
  want = (xq.reshape(-1, xq.shape[-1]) @ wq).astype(np.float32) * s * sw - \
      shift * (wq.sum(0) * sw[0])
  got = np.asarray(jax.jit(lambda a: leaves.linear(a, leaf, None, site))(jnp.asarray(xin)))
  np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-5, atol=1e-4)


def test_recorded_samples_then_calibrators_match_numpy_end_to_end():
  """Site calibration over batches, then each calibrator, against NumPy on
  the same activations."""
  m = _noisy_model(1)
  calib = _calibration(80, seed=3)
  layer = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query"
  xin = np.asarray(model_lib.linear_inputs(m, preprocess(jnp.asarray(calib.images), TINY))[
      layer], np.float64).reshape(-1)
  samples = site_calibration.record(m, calib, [layer + "/input"], batch_size=32,
                                    max_rows=10 ** 6, progress=False)[layer + "/input"]
  # Every row once (sampling without replacement), then the channel extremes.
  assert samples.values.shape[0] == len(xin) // 16 + 2
  np.testing.assert_allclose(np.sort(samples.values[:-2].reshape(-1)), np.sort(xin),
                             rtol=1e-5, atol=1e-6)
  mags = np.abs(xin)
  assert float(fit_uniform(samples.values, method="minmax").scale) == pytest.approx(
      mags.max() / 127, rel=1e-5)
  assert float(fit_uniform(samples.values, method="percentile", percentile=99.0).scale) * 127 \
      == pytest.approx(np.percentile(np.abs(samples.values), 99.0), rel=1e-6)
  # MSE and OMSE: the chosen bound's real 8-bit error on these activations is
  # within 3% of the best bound on a fine grid.
  def error(c):
    step = c / 127
    return np.mean((np.clip(np.round(xin / step), -127, 127) * step - xin) ** 2)
  grid = np.linspace(mags.max() / 16, mags.max(), 400)
  best = min(error(c) for c in grid)
  for method in ("mse", "omse"):
    bound = float(fit_uniform(samples.values, method=method).scale) * 127
    assert error(bound) <= 1.03 * best + 1e-12, method
  # Shifted (asymmetric): the shift centres the range.
  shifted = fit_uniform(samples.values, symmetric=False)
  assert float(shifted.shift) == pytest.approx(-(xin.min() + xin.max()) / 2, rel=1e-5,
                                               abs=1e-7)


def test_selections_that_compress_nothing_are_errors():
  m = _noisy_model()
  with pytest.raises(ValueError, match="select no layer together"):
    only("head", q.weight_only(8), exclude="head")(m)
  with pytest.raises(ValueError, match="select no layer together"):
    only("embedding", q.weight_only(8, layers=r".*/MlpBlock_3/.*"))(m)
  with pytest.raises(ValueError, match="matches no linear layer"):
    only(".*", q.weight_only(8), exclude="nothing_like_this")(m)


def test_an_unknown_activation_mode_is_refused():
  qt = quantize_per_channel(jnp.ones((4, 4)), 8)
  with pytest.raises(ValueError, match=r"activations='sometimes'; choose one of \('float', "
                                       r"'dynamic', 'static'\)"):
    QuantizedWeight(qt, activations="sometimes")
  with pytest.raises(ValueError, match="act_bits=9 is outside"):
    QuantizedWeight(qt, activations="dynamic", act_bits=9)
