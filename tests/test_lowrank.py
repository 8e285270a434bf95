"""Low-rank factorization: SVD identities, rank rules, data-aware, nesting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, noisy_model, synthetic_split
from vitjax.models.inputs import preprocess
from vitjax import data as data_lib
from vitjax import export, leaves
from vitjax import model as model_lib
from vitjax.leaves import LowRank, QuantizedWeight
from vitjax.transforms import chain, lowrank
from vitjax.transforms import quantize as q

BIG = TINY.replace(dim=32, mlp_dim=64)


def _model(config=BIG, seed=0):
  return noisy_model(config, seed)


def test_full_rank_reconstructs_and_truncation_error_is_the_dropped_spectrum():
  w = np.random.default_rng(0).normal(size=(24, 16))
  f = lowrank.factor(w)
  full = f.factors(16)
  np.testing.assert_allclose(np.asarray(full.u) @ np.asarray(full.v), w, atol=1e-5)
  for r in (1, 5, 12):
    lr = f.factors(r)
    err = np.linalg.norm(w - np.asarray(lr.u, np.float64) @ np.asarray(lr.v, np.float64)) ** 2
    np.testing.assert_allclose(err, np.sum(f.s[r:] ** 2), rtol=1e-4)
    assert lr.shape == (24, 16) and lr.rank == r


def test_factors_are_balanced():
  w = np.random.default_rng(1).normal(size=(20, 30)) * 5
  lr = lowrank.factor(w).factors(6)
  u, v = np.asarray(lr.u), np.asarray(lr.v)
  np.testing.assert_allclose(np.linalg.norm(u, axis=0), np.linalg.norm(v, axis=1), rtol=1e-4)


def test_rank_for_energy():
  s = np.array([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
  assert lowrank.rank_for_energy(s, 9 / 14) == 1
  assert lowrank.rank_for_energy(s, 0.7) == 2
  assert lowrank.rank_for_energy(s, 1.0) == 3


def test_low_rank_layer_runs_two_thin_matmuls_and_shrinks():
  m = _model()
  lr = lowrank.svd(rank=4)(m)
  kernel = dict(model_lib.weight_leaves(lr.params))["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"]
  assert isinstance(kernel, LowRank) and kernel.u.shape == (32, 4) and kernel.v.shape == (4, 64)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 32))
  np.testing.assert_allclose(leaves.matmul(x, kernel), (x @ kernel.u) @ kernel.v, rtol=1e-5)
  # Every block linear is factorized; embedding and head stay dense by default.
  per_block = 4 * 4 * (32 + 32) + 4 * (32 + 64) * 2
  dense_block = 4 * 32 * 32 + 2 * 32 * 64
  assert model_lib.param_count(m) - model_lib.param_count(lr) == BIG.depth * (dense_block - per_block)
  t, d = BIG.num_tokens, 32
  saved_flops = BIG.depth * 2 * t * (dense_block - per_block)
  assert model_lib.flops_per_image(m) - model_lib.flops_per_image(lr) == saved_flops
  assert isinstance(dict(model_lib.weight_leaves(lr.params))["head/kernel"], jax.Array)


def test_param_budget_keeps_the_requested_fraction():
  m = _model()
  lr = lowrank.svd(param_budget=0.5)(m)
  chosen = [p for p, leaf in model_lib.weight_leaves(m.params)
            if p.endswith("kernel") and p.startswith("Transformer")]
  dense = sum(np.prod(dict(model_lib.weight_leaves(m.params))[p].shape) for p in chosen)
  after = sum(leaves.value_count(dict(model_lib.weight_leaves(lr.params))[p]) for p in chosen)
  assert 0.4 * dense < after <= 0.5 * dense


def test_energy_leaves_layers_dense_when_factors_would_not_be_smaller(capsys):
  m = _model()
  full = lowrank.svd(energy=1.0)(m)
  assert all(not isinstance(leaf, LowRank) for _, leaf in model_lib.weight_leaves(full.params))
  said = capsys.readouterr().out
  assert "stays dense" in said and said.count("\n") == len(
      [p for p, _ in model_lib.weight_leaves(m.params)
       if p.endswith("/kernel") and not p.startswith(("embedding", "head"))])


def test_a_rank_that_would_not_shrink_a_layer_is_an_error():
  with pytest.raises(ValueError, match=r"rank=30 does not shrink layer .*use rank < "):
    lowrank.svd(rank=30)(_model())


def test_data_aware_svd_is_better_on_the_calibration_inputs():
  m = _model()
  calib = synthetic_split(128, BIG).images
  plain = lowrank.svd(rank=3)(m)
  aware = lowrank.svd(rank=3, calibration=calib)(m)
  x = model_lib.linear_inputs(m, preprocess(jnp.asarray(calib), BIG))
  layer = "Transformer/encoderblock_1/MlpBlock_3/Dense_0"
  w = dict(model_lib.weight_leaves(m.params))[layer + "/kernel"]
  def out_err(model):
    k = dict(model_lib.weight_leaves(model.params))[layer + "/kernel"]
    return float(jnp.linalg.norm(leaves.matmul(x[layer], k) - x[layer] @ w))
  assert out_err(aware) < out_err(plain)


def test_data_aware_factor_survives_a_singular_slightly_indefinite_gram():
  # 4 samples of 16 inputs give a rank-4 Gram matrix; float32 rounding (as on
  # an AVX-512 CPU) can push its null space slightly negative.
  rng = np.random.default_rng(0)
  w, a = rng.normal(size=(16, 8)), rng.normal(size=(4, 16))
  gram = a.T @ a - 1e-4 * np.trace(a.T @ a) / 16 * np.eye(16)
  f = lowrank.factor(w, gram)
  assert np.all(np.isfinite(f.u)) and np.all(np.isfinite(f.s))
  np.testing.assert_allclose((f.u * f.s) @ f.vt, w, atol=1e-9)  # full rank: exact
  top4 = (f.u[:, :4] * f.s[:4]) @ f.vt[:4]  # keeps w's action on the sampled inputs
  np.testing.assert_allclose(a @ top4, a @ w, atol=1e-2 * np.abs(a @ w).max())


def test_quantized_factors_nest_and_save(tmp_path):
  m = _model()
  nested = chain(lowrank.svd(rank=4), q.weight_only(8))(m)
  kernel = dict(model_lib.weight_leaves(nested.params))["Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel"]
  assert isinstance(kernel, LowRank) and isinstance(kernel.u, QuantizedWeight)
  assert isinstance(kernel.v, QuantizedWeight)
  export.save_model(nested, tmp_path / "m")
  back = export.load_model(tmp_path / "m")
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  np.testing.assert_array_equal(model_lib.apply(back, x), model_lib.apply(nested, x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one of rank, energy, param_budget"),
    (dict(rank=2, energy=0.5), "exactly one of"),
    (dict(rank=0), "rank=0 must be a positive int"),
    (dict(energy=0.0), r"energy=0.0 is outside \(0, 1\]"),
    (dict(param_budget=1.0), r"param_budget=1.0 is outside \(0, 1\)"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lowrank.svd(**kwargs)


def test_rank_above_the_matrix_is_refused():
  with pytest.raises(ValueError, match=r"rank=40 is above layer .* maximum min\(\d+, \d+\)=32"):
    lowrank.svd(rank=40)(_model())


def test_factorizing_a_quantized_layer_is_refused():
  with pytest.raises(ValueError, match="needs a float weight"):
    lowrank.svd(rank=2)(q.weight_only(8)(_model()))
