"""The activation quantizers against hand computations and NumPy references:
log2 levels, twin-uniform ranges, power-of-two factors, uniform fits, and
integer matmuls that equal an integer NumPy dot exactly."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.quantizers import (Logarithmic, LogarithmicSpec, Operands, OperandsSpec,
                               PowerOfTwoSpec, TwinUniform, TwinUniformSpec, Uniform,
                               UniformSpec, fit_logarithmic, fit_power_of_two,
                               fit_twin_uniform, fit_uniform)
from vitjax.leaves.quantized import quantize_per_channel
from vitjax.quantizers.planes import planes_dot_general
from vitjax.quantizers.uniform import quantized_dot_general


def test_log2_reproduces_exact_powers_of_two_and_rounds_in_the_log_domain():
  q = Logarithmic(jnp.float32(1.0), bits=4, base="2")
  powers = np.array([2.0 ** -k for k in range(16)], np.float32)
  np.testing.assert_array_equal(np.asarray(q(jnp.asarray(powers))), powers)
  np.testing.assert_array_equal(np.asarray(q.codes(jnp.asarray(powers))), np.arange(16))
  # Between levels: round(-log2 x); 0.3 -> 2^-2 (log2 0.3 = -1.74), 0.4 -> 2^-1 (-1.32).
  np.testing.assert_array_equal(np.asarray(q(jnp.asarray([0.3, 0.4, 0.7], jnp.float32))),
                                [0.25, 0.5, 0.5])
  # Codes past 2^bits - 1 become 0 (FQ-ViT), and zero stays zero.
  np.testing.assert_array_equal(np.asarray(q(jnp.asarray([2.0 ** -17, 0.0], jnp.float32))),
                                [0.0, 0.0])
  # log-sqrt2 (RepQ-ViT): levels sqrt2^-q.
  r = Logarithmic(jnp.float32(1.0), bits=4, base="sqrt2")
  levels = np.array([math.sqrt(2) ** -k for k in range(16)], np.float32)
  np.testing.assert_allclose(np.asarray(r(jnp.asarray(levels))), levels, rtol=1e-6)


def test_log_fit_refuses_negative_values_and_takes_a_power_of_two_scale():
  with pytest.raises(ValueError, match="non-negative values, but blk/gelu has values down to"):
    fit_logarithmic(np.array([[-0.1, 0.5]]), site="blk/gelu")
  assert float(fit_logarithmic(np.array([[0.1, 0.9]])).scale) == 1.0
  assert float(fit_logarithmic(np.array([[0.1, 2.5]])).scale) == 4.0


def test_twin_uniform_has_the_two_ranges_it_claims():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(50), size=200).astype(np.float32)
  q = fit_twin_uniform(probs, bits=6, mode="softmax")
  s1, s2 = float(q.s1), float(q.s2)
  ratio = s2 / s1
  assert ratio >= 1 and ratio == 2.0 ** round(math.log2(ratio))  # a power of two
  (lo1, hi1), (lo2, hi2) = q.ranges()
  assert (lo1, hi1) == (0.0, 31 * s1) and (lo2, hi2) == (0.0, 31 * s2)
  y = np.asarray(q(jnp.asarray(probs)))
  small = probs < 32 * s1
  # R1 values are multiples of s1 within R1; R2 values multiples of s2 within R2.
  np.testing.assert_allclose(y[small] / s1, np.round(y[small] / s1), atol=1e-4)
  assert y[small].max() <= hi1 * (1 + 1e-6)
  np.testing.assert_allclose(y[~small] / s2, np.round(y[~small] / s2), atol=1e-4)
  assert y[~small].max() <= hi2 * (1 + 1e-6)
  assert len(np.unique(y)) <= 2 ** 6
  # gelu mode: negatives in R1 = [-2^(b-1) s1, 0], positives in R2.
  g = TwinUniform(jnp.float32(0.01), jnp.float32(0.08), bits=4, mode="gelu")
  out = np.asarray(g(jnp.asarray([-0.2, -0.033, 0.05, 0.3, 9.0], jnp.float32)))
  np.testing.assert_allclose(out, [-0.08, -0.03, 0.08, 0.32, 0.56], rtol=1e-6)
  assert g.ranges() == ((-8 * float(g.s1), 0.0), (0.0, 7 * float(g.s2)))


def test_twin_uniform_search_follows_the_hessian_weights():
  rng = np.random.default_rng(1)
  x = rng.exponential(0.02, size=4000).astype(np.float32)
  x[:40] = rng.uniform(0.5, 1.0, 40)
  heavy = np.ones_like(x)
  heavy[:40] = 1e4  # the large values matter most: their error must shrink
  plain = fit_twin_uniform(x, bits=4, weights=None)
  weighted = fit_twin_uniform(x, bits=4, weights=heavy)
  err = lambda q: np.abs(np.asarray(q(jnp.asarray(x[:40]))) - x[:40]).mean()  # noqa: E731
  assert err(weighted) < err(plain)


def test_power_of_two_factors_are_powers_of_two_and_fit_each_channel():
  rng = np.random.default_rng(0)
  widths = np.array([0.1, 0.5, 1.0, 4.0, 8.0] * 4)
  x = rng.normal(size=(500, 20)) * widths
  q = fit_power_of_two(x, bits=8, max_factor=3)
  scales = np.asarray(q.channel_scales())
  ratio = scales / float(q.scale)
  np.testing.assert_array_equal(ratio, 2.0 ** np.asarray(q.alpha))
  assert set(np.asarray(q.alpha).tolist()) <= {0, 1, 2, 3}
  # The widest channels take the largest factor, the narrowest the smallest.
  assert np.asarray(q.alpha)[4] == 3 and np.asarray(q.alpha)[0] == 0
  # Quantized channel by channel on its own grid.
  y = np.asarray(q(jnp.asarray(x, jnp.float32))) + float(q.shift)
  np.testing.assert_allclose(y / scales, np.round(y / scales), atol=2e-3)
  # Beats one shared scale on the narrow channels.
  shared = fit_uniform(x, bits=8, symmetric=False)
  narrow = widths < 1
  err = lambda z: np.mean((z - x)[:, narrow] ** 2)  # noqa: E731
  assert err(np.asarray(q(jnp.asarray(x, jnp.float32)))) < err(
      np.asarray(shared(jnp.asarray(x, jnp.float32))))


def test_uniform_fits_against_hand_computations():
  x = np.array([[-1.0, 0.5], [3.0, -2.0]])
  q = fit_uniform(x, bits=8, method="minmax", granularity="tensor")
  assert float(q.scale) == pytest.approx(3.0 / 127) and q.shift is None
  a = fit_uniform(x, bits=8, symmetric=False)
  assert float(a.shift) == pytest.approx(-0.5) and float(a.scale) == pytest.approx(2.5 / 127)
  c = fit_uniform(x, bits=4, granularity="channel")
  np.testing.assert_allclose(np.asarray(c.scale), [3.0 / 7, 2.0 / 7], rtol=1e-6)
  assert fit_uniform(x, granularity="token").scale is None
  # OMSE clips a lone outlier; minmax does not.
  rng = np.random.default_rng(0)
  y = np.concatenate([rng.normal(size=20000), [60.0]])[:, None]
  assert float(fit_uniform(y, bits=4, method="omse").scale) < 0.5 * float(
      fit_uniform(y, bits=4, method="minmax").scale)
  # Codes: clip, then round half to even, as AQT does.
  u = Uniform(jnp.float32(0.5), None, 4)
  np.testing.assert_array_equal(np.asarray(u.codes(jnp.asarray([0.25, 0.75, 9.0, -9.0]))),
                                [0, 2, 7, -7])


def _int_ref(codes_a, codes_b, subscripts):
  return np.einsum(subscripts, codes_a.astype(np.int64), codes_b.astype(np.int64))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_qk_and_pv_equal_an_integer_numpy_einsum(bits):
  rng = np.random.default_rng(bits)
  q = jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 6, 3, 4)) * 2, jnp.float32)
  uq, uk = Uniform(jnp.float32(0.03), None, bits), Uniform(jnp.float32(0.05), None, bits)
  qk_dims = (((3,), (3,)), ((0, 2), (0, 2)))
  y = jax.jit(lambda a, b: quantized_dot_general(a, uq, b, uk, qk_dims))(q, k)
  ref = _int_ref(np.asarray(uq.codes(q, (3,))), np.asarray(uk.codes(k, (3,))),
                 "bqhd,bkhd->bhqk")
  assert np.abs(ref).max() > 10  # non-trivial
  np.testing.assert_array_equal(np.round(np.asarray(y) / (0.03 * 0.05)), ref)
  # probs . v with an asymmetric (shifted) probs operand: the shift is removed
  # exactly, sum((p + s) v) - s sum(v) over integer codes.
  p = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 5, 6)), jnp.float32), -1)
  v = jnp.asarray(rng.normal(size=(2, 6, 3, 4)), jnp.float32)
  up = Uniform(jnp.float32(1 / 254), jnp.float32(-0.5), bits)
  uv = Uniform(jnp.float32(0.04), None, bits)
  pv_dims = (((3,), (1,)), ((0, 1), (0, 2)))
  y = np.asarray(jax.jit(lambda a, b: quantized_dot_general(a, up, b, uv, pv_dims))(p, v))
  cp, cv = np.asarray(up.codes(p, (3,))), np.asarray(uv.codes(v, (1,)))
  ref = (_int_ref(cp, cv, "bhqk,bkhd->bhqd") * (1 / 254) * 0.04
         + 0.5 * np.einsum("bkhd->bhd", cv)[:, :, None, :] * 0.04)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def _log_by_hand(p, bits, base):
  """FQ-ViT's log2 / RepQ-ViT's log-sqrt2 values (scale 1) in float64."""
  steps = -np.log2(p) * (1 if base == "2" else 2)
  q = np.maximum(np.round(steps), 0)
  level = 2.0 ** -q if base == "2" else np.sqrt(2.0) ** -q
  return np.where((p > 0) & (q < 2 ** bits), level, 0.0)


def _twin_by_hand(x, s1, s2, bits, mode):
  half = 2 ** (bits - 1)
  if mode == "softmax":
    in_r1, r1 = x < half * s1, np.clip(np.round(x / s1), 0, half - 1) * s1
  else:
    in_r1, r1 = x < 0, np.clip(np.round(x / s1), -half, 0) * s1
  return np.where(in_r1, r1, np.clip(np.round(x / s2), 0, half - 1) * s2)


def _only_integer_dots(fn, *args) -> int:
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  assert not re.search(r"= f32\[[^\]]*\][^ ]* dot\(", hlo)
  return len(re.findall(r"= s32\[[^\]]*\][^ ]* dot\(", hlo))


@pytest.mark.parametrize("name", ["log2-4", "log2-8", "sqrt2-4", "sqrt2-6", "twin-6",
                                  "twin-8"])
def test_log_and_twin_probs_v_is_one_integer_dot_of_int8_planes(name):
  kind, bits = name.split("-")
  bits = int(bits)
  rng = np.random.default_rng(bits)
  p = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 3, 5, 6)) * 3, jnp.float32), -1)
  v = jnp.asarray(rng.normal(size=(2, 6, 3, 4)), jnp.float32)
  uv = Uniform(jnp.float32(0.02), None, 8)
  if kind == "twin":
    s1, s2 = 1 / 2 ** (bits + 3), 1 / 2 ** (bits - 1)
    q = TwinUniform(jnp.float32(s1), jnp.float32(s2), bits, "softmax")
    want = _twin_by_hand(np.asarray(p, np.float64), s1, s2, bits, "softmax")
  else:
    base = {"log2": "2", "sqrt2": "sqrt2"}[kind]
    q = Logarithmic(jnp.float32(1.0), bits, base)
    want = _log_by_hand(np.asarray(p, np.float64), bits, base)
  planes = q.planes(p)
  assert planes.codes.dtype == jnp.int8
  # The planes stand for exactly the quantizer's values, which are the
  # hand-computed levels (several distinct ones: the test is not vacuous).
  np.testing.assert_array_equal(np.asarray(planes.values()), np.asarray(q(p)))
  np.testing.assert_array_equal(np.asarray(q(p)), want.astype(np.float32))
  assert len(np.unique(want)) >= 6
  dims = (((3,), (1,)), ((0, 1), (0, 2)))
  y = np.asarray(jax.jit(lambda a, b: planes_dot_general(q.planes(a), b, uv, dims))(p, v))
  codes_v = np.asarray(uv.codes(v, (1,))).astype(np.int64)
  np.testing.assert_allclose(y, np.einsum("bhqk,bkhd->bhqd", want, codes_v) * 0.02,
                             rtol=1e-6, atol=1e-7)
  # One integer dot (the planes are one more free axis), no float dot.
  assert _only_integer_dots(lambda a, b: planes_dot_general(q.planes(a), b, uv, dims),
                            p, v) == 1
  # v quantized at run time: one scale per (batch, head, channel), from its
  # largest |value| over the contracted tokens.
  token = Uniform(None, None, 8)
  y = np.asarray(planes_dot_general(q.planes(p), v, token, dims))
  scale = np.abs(np.asarray(v, np.float64)).max(1, keepdims=True) / 127
  codes = np.round(np.asarray(v, np.float64) / scale)
  np.testing.assert_allclose(y, np.einsum("bhqk,bkhd->bhqd", want, codes * scale),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("w_bits", [8, 4])
def test_twin_gelu_input_times_an_int_weight_is_an_integer_dot(w_bits):
  rng = np.random.default_rng(w_bits)
  x = jnp.asarray(jax.nn.gelu(rng.normal(size=(3, 7, 16)) * 2), jnp.float32)
  qt = quantize_per_channel(jnp.asarray(rng.normal(size=(16, 5)), jnp.float32), w_bits)
  q = TwinUniform(jnp.float32(0.01), jnp.float32(0.04), 6, "gelu")
  want = _twin_by_hand(np.asarray(x, np.float64), 0.01, 0.04, 6, "gelu")
  assert (want < 0).any() and (want > 0).any()
  dims = (((2,), (0,)), ((), ()))
  y = np.asarray(jax.jit(lambda a: planes_dot_general(q.planes(a), None, qt, dims))(x))
  codes_w = np.asarray(qt.qvalue).astype(np.int64)
  np.testing.assert_allclose(y, want @ codes_w * np.asarray(qt.scale[0], np.float64),
                             rtol=1e-5, atol=1e-6)
  assert _only_integer_dots(lambda a: planes_dot_general(q.planes(a), None, qt, dims),
                            x) == 1


def test_per_token_scales_and_a_per_channel_refusal():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 7, 16)) * np.arange(1, 8)[None, :, None], jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
  token = Uniform(None, None, 8)
  dims = (((2,), (0,)), ((), ()))
  wq = Uniform(jnp.float32(0.02), None, 8)
  y = np.asarray(quantized_dot_general(x, token, w, wq, dims))
  scale = np.abs(np.asarray(x)).max(-1, keepdims=True) / 127
  codes = np.round(np.clip(np.asarray(x) / scale, -127, 127))
  ref = np.einsum("btc,co->bto", codes, np.asarray(wq.codes(w, (0,)))) * scale * 0.02
  np.testing.assert_allclose(y, ref, rtol=1e-5)
  channel = Uniform(jnp.ones(16, jnp.float32) * 0.1, None, 8)
  with pytest.raises(ValueError, match="per-channel activation scale cannot feed"):
    quantized_dot_general(x, channel, w, wq, dims)
  # The planes' integer dot refuses the same right operands, and a shifted one.
  planes = Logarithmic(jnp.float32(1.0), 4, "2").planes(jnp.abs(x))
  wide = Uniform(jnp.ones(5, jnp.float32) * 0.1, None, 8)
  with pytest.raises(ValueError, match="per-channel activation scale cannot feed"):
    planes_dot_general(planes, w, wide, dims)
  with pytest.raises(ValueError, match="right operand of an integer matmul must be symmetric"):
    planes_dot_general(planes, w, Uniform(jnp.float32(0.02), jnp.float32(0.1), 8), dims)


@pytest.mark.parametrize("make, message", [
    (lambda: UniformSpec(bits=9), "bits=9 is outside the supported range 2..8"),
    (lambda: UniformSpec(bits=1), "bits=1 is outside"),
    (lambda: LogarithmicSpec(bits=0), "bits=0 is outside"),
    (lambda: TwinUniformSpec(bits=12), "bits=12 is outside"),
    (lambda: PowerOfTwoSpec(bits=9), "bits=9 is outside"),
    (lambda: UniformSpec(method="kl"), "method='kl'; choose one of"),
    (lambda: UniformSpec(granularity="row"), "granularity='row'; choose one of"),
    (lambda: LogarithmicSpec(base="10"), "base='10'; choose one of"),
    (lambda: TwinUniformSpec(mode="relu"), "mode='relu'; choose one of"),
    (lambda: PowerOfTwoSpec(max_factor=9), "max_factor=9 is outside 0..7"),
])
def test_bad_quantizer_settings_are_refused_by_name(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_fits_refuse_nan_and_empty_samples():
  for fit in (fit_uniform, fit_logarithmic, fit_twin_uniform, fit_power_of_two):
    with pytest.raises(ValueError, match="NaN or inf"):
      fit(np.array([[0.1, np.nan]]))
    with pytest.raises(ValueError, match="no calibration samples"):
      fit(np.zeros((0, 3)))


def test_operands_spec_fits_each_side():
  spec = OperandsSpec(UniformSpec(bits=6), None)
  got = spec.fit({"lhs": np.array([[1.0, -2.0]]), "rhs": np.array([[5.0]])}, None, "s")
  assert isinstance(got, Operands) and got.rhs is None
  assert float(got.lhs.scale) == pytest.approx(2.0 / 31)
