"""vitjax's CPU int8 kernel: the exact int32 product, on its fast path and on
the plain loop, and the same logits as XLA's dots in a whole model."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, noisy_model
from vitjax import data as data_lib
from vitjax import evaluate, export, stablehlo
from vitjax import model as model_lib
from vitjax.kernels import cpu_int8
from vitjax.models.inputs import preprocess
from vitjax.transforms import lowrank, prune, ptq, quantize

# (M, K, N): whole tiles, row and column remainders, K not a multiple of 4,
# N past one strip, and empty operands.
SHAPES = [(1, 1, 1), (7, 5, 3), (13, 64, 17), (197, 192, 192), (50, 770, 100), (6, 8, 64),
          (100, 4, 129), (49, 36, 80), (0, 8, 8), (5, 0, 7), (3, 9, 0)]

CHECK_EXACT = """
import numpy as np
from vitjax.kernels import cpu_int8
print(cpu_int8.isa())
rng = np.random.default_rng(0)
for m, k, n in {shapes}:
  a = rng.integers(-128, 128, (m, k)).astype(np.int8)
  b = rng.integers(-128, 128, (k, n)).astype(np.int8)
  got = np.asarray(cpu_int8.matmul(a, cpu_int8.pack(b), n))
  assert np.array_equal(got, a.astype(np.int64) @ b.astype(np.int64)), (m, k, n)
print("exact")
"""


def reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return a.astype(np.int64) @ b.astype(np.int64)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matmul_is_the_exact_int32_product(m, k, n):
  rng = np.random.default_rng(m * 1000 + k * 10 + n)
  a = rng.integers(-128, 128, (m, k)).astype(np.int8)
  b = rng.integers(-128, 128, (k, n)).astype(np.int8)
  got = np.asarray(jax.jit(cpu_int8.matmul, static_argnums=2)(a, cpu_int8.pack(b), n))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, reference(a, b))


def test_extremes_leading_axes_and_int4_weights():
  # every A byte -128 against every B byte -128 / 127: the largest sums
  a = np.full((2, 3, 256), -128, np.int8)
  b = np.concatenate([np.full((256, 20), -128, np.int8), np.full((256, 20), 127, np.int8)], 1)
  got = np.asarray(cpu_int8.matmul(jnp.asarray(a), cpu_int8.pack(b), 40))
  assert got.shape == (2, 3, 40)
  np.testing.assert_array_equal(got, reference(a.reshape(6, 256), b).reshape(2, 3, 40))
  w4 = np.random.default_rng(1).integers(-8, 8, (24, 10)).astype(np.int8)
  x = np.random.default_rng(2).integers(-128, 128, (5, 24)).astype(np.int8)
  got = cpu_int8.matmul(x, cpu_int8.pack(jnp.asarray(w4, jnp.int4)), 10)
  np.testing.assert_array_equal(np.asarray(got), reference(x, w4))


def test_plain_loop_path_is_exact_too():
  # The reference loop runs on CPUs without AVX-512 VNNI; force it here.
  env = dict(os.environ, VITJAX_CPU_INT8_ISA="generic")
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, "-c", CHECK_EXACT.format(shapes=SHAPES[:8])],
                       env=env, cwd=root, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["generic", "exact"]


def _calibration(n: int = 32) -> data_lib.Split:
  images = np.random.default_rng(5).integers(0, 256, (n, 8, 8, 1)).astype(np.uint8)
  return data_lib.Split(images, np.zeros(n, np.int32), "train")


def _variants():
  m = noisy_model(TINY, seed=3)
  calib = _calibration()
  return m, {
      "dynamic-int8": quantize.dynamic_int8()(m),
      "dynamic-w4a8": quantize.dynamic_int8(bits=4)(m),
      "static-asymmetric": quantize.static_int8(calib, symmetric=False, calibrator="minmax",
                                                progress=False)(m),
      "w8a8-all-sites": ptq.quantize_model(m, "minmax", calib, layernorm_inputs=True,
                                           progress=False),
      "w4a4-minmax": ptq.quantize_model(m, "minmax", calib, w_bits=4, a_bits=4,
                                        progress=False),
      # wrapped leaves: the input site feeds a mask's values, a low-rank
      # pair's first factor (the second takes float input: XLA's dot)
      "prune+static": quantize.static_int8(calib, progress=False)(
          prune.magnitude(0.5, exclude=("embedding", "head"))(m)),
      "lowrank+static": quantize.static_int8(calib, progress=False)(lowrank.svd(rank=4)(m)),
  }


def test_models_on_the_kernel_give_xlas_logits_bit_for_bit():
  base, variants = _variants()
  images = np.random.default_rng(6).integers(0, 256, (9, 8, 8, 1)).astype(np.uint8)
  x = preprocess(images, TINY)
  forward = jax.jit(model_lib.apply)
  for name, m in variants.items():
    on_kernel = model_lib.use_cpu_int8_kernel(m)
    layers = model_lib.cpu_int8_layers(m)
    assert len(layers) >= 8, name  # qkv/out/fc1/fc2 of two blocks at least
    if name == "prune+static":
      assert all(a.endswith("/kernel/w") for a in layers if "encoderblock" in a)
    if name == "lowrank+static":
      assert any(a.endswith("/kernel/u") for a in layers)
      assert not any(a.endswith("/kernel/v") for a in layers)
    hlo = forward.lower(on_kernel, x).as_text()
    assert hlo.count(cpu_int8.TARGET) >= len(layers), name
    assert cpu_int8.TARGET not in forward.lower(m, x).as_text()
    ours, xla = np.asarray(forward(on_kernel, x)), np.asarray(forward(m, x))
    assert xla.std(0).max() > 0.05, name  # logits that differ between images
    np.testing.assert_array_equal(ours, xla, err_msg=name)
    # the packed copy is not model size, values or work
    assert model_lib.stored_bytes(on_kernel) == model_lib.stored_bytes(m)
    assert model_lib.param_count(on_kernel) == model_lib.param_count(m)
    assert model_lib.flops_per_image(on_kernel) == model_lib.flops_per_image(m)
    np.testing.assert_array_equal(np.asarray(forward(model_lib.portable(on_kernel), x)), xla)
  assert model_lib.cpu_int8_layers(base) == []


def test_saving_and_exporting_drop_the_kernel(tmp_path):
  _, variants = _variants()
  m = variants["dynamic-int8"]
  on_kernel = model_lib.use_cpu_int8_kernel(m)
  a = export.save_model(m, tmp_path / "plain")
  b = export.save_model(on_kernel, tmp_path / "kernel")
  # the same layout and arrays (orbax's own files differ by tens of bytes
  # between any two saves: paths and content hashes)
  assert (tmp_path / "plain" / "vitjax.json").read_text() == \
      (tmp_path / "kernel" / "vitjax.json").read_text()
  assert abs(a - b) < 100
  loaded = export.load_model(tmp_path / "kernel")
  assert model_lib.cpu_int8_layers(loaded) == model_lib.cpu_int8_layers(m)
  assert all(leaf.packed is None for leaf in jax.tree_util.tree_leaves(
      loaded.params, is_leaf=lambda x: hasattr(x, "packed")) if hasattr(leaf, "packed"))
  text = stablehlo.exported(on_kernel, batch=2).mlir_module()
  assert cpu_int8.TARGET not in text
  # a replaced leaf cannot keep a copy of int values it no longer holds
  leaf = next(x for x in jax.tree_util.tree_leaves(
      on_kernel.params, is_leaf=lambda x: hasattr(x, "packed")) if hasattr(x, "packed"))
  assert leaf.packed is not None and leaf.replace(bits=leaf.bits).packed is None


def test_evaluate_runs_the_kernel_option_and_names_it():
  _, variants = _variants()
  m = variants["static-asymmetric"]
  images = np.random.default_rng(7).integers(0, 256, (40, 8, 8, 1)).astype(np.uint8)
  split = data_lib.Split(images, np.zeros(40, np.int32))
  options = evaluate.kernel_candidate()
  np.testing.assert_array_equal(evaluate.predictions(m, split, 16, options),
                                evaluate.predictions(m, split, 16))
  prepared, xla = evaluate.prepared(m, options)
  assert xla == {} and model_lib.cpu_int8_layers(prepared)
  assert evaluate.KERNEL_CANDIDATE in evaluate.candidates(m)
  assert evaluate.KERNEL_CANDIDATE not in evaluate.candidates(noisy_model(TINY))
  chosen = evaluate.fastest_options(m, 2, calls=1)
  assert evaluate.options_name(chosen) in evaluate.candidates(m)
  assert evaluate.options_name(options) == evaluate.KERNEL_CANDIDATE


def test_refusals_name_what_is_wrong():
  plain = noisy_model(TINY)
  with pytest.raises(ValueError, match="no layer of this model multiplies integers"):
    model_lib.use_cpu_int8_kernel(plain)
  with pytest.raises(ValueError, match="no layer of this model multiplies integers"):
    model_lib.use_cpu_int8_kernel(quantize.weight_only(8)(plain))
  with pytest.raises(ValueError, match="only value is 'on'"):
    evaluate.prepared(plain, {evaluate.CPU_INT8_KERNEL: "yes"})
  with pytest.raises(ValueError, match="takes XLA compiler options"):
    evaluate.predictor(evaluate.kernel_candidate())
  with pytest.raises(ValueError, match="integer weight of at most 8 bits"):
    cpu_int8.pack(jnp.ones((4, 4), jnp.float32))
  packed = cpu_int8.pack(jnp.ones((8, 4), jnp.int8))
  with pytest.raises(ValueError, match="do not match the packed weight"):
    cpu_int8.matmul(jnp.ones((2, 12), jnp.int8), packed, 4)
  with pytest.raises(ValueError, match="takes int8 activations"):
    cpu_int8.matmul(jnp.ones((2, 8), jnp.float32), packed, 4)
  with pytest.raises(ValueError, match=r"integer \(\.\.\., K\) x \(K, N\)"):
    cpu_int8.dot_general(jnp.ones((2, 3, 8), jnp.int8), jnp.ones((2, 8, 4), jnp.int8),
                         (((2,), (1,)), ((0,), (0,))), packed=packed)


def test_no_compiler_is_a_clear_error(monkeypatch):
  monkeypatch.setenv("CXX", "no-such-compiler")
  monkeypatch.setattr(cpu_int8.shutil, "which", lambda name: None)
  with pytest.raises(cpu_int8.KernelUnavailable, match="no C.. compiler was found"):
    cpu_int8._compiler()
