"""vitjax's CPU int8 kernel: the exact int32 product on every code path this
CPU has (AMX tiles, AVX-512 VNNI, the plain loop), and the same logits as
XLA's dots in a whole model."""

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

# (M, K, N): whole register tiles, row and column remainders, K not a
# multiple of 4, N past one strip, and empty operands; for AMX (K a multiple
# of 64): fewer rows than one tile (13), 32- and 16-row blocks with a
# remainder (197 = 4 x 48 + 5, 50, 33), a half-filled last strip (17, 100),
# and K of many tiles (3072). Products of more than 2^22 (VNNI) or 2^24 (AMX)
# multiply-adds share their tasks with XLA's thread pool (197 x 192 x 192,
# 33 x 3072 x 64, 200 x 768 x 130); smaller ones run on the calling thread.
SHAPES = [(1, 1, 1), (7, 5, 3), (13, 64, 17), (197, 192, 192), (50, 770, 100), (6, 8, 64),
          (100, 4, 129), (49, 36, 80), (0, 8, 8), (5, 0, 7), (3, 9, 0), (50, 128, 100),
          (33, 3072, 64), (16, 64, 32), (200, 768, 130)]


def paths():
  """Every code path, skipped where this CPU lacks it."""
  here = cpu_int8.available()
  return [pytest.param(p, marks=pytest.mark.skipif(p not in here,
                                                   reason=f"this CPU has no {p} path"))
          for p in cpu_int8.ISAS]


def reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return a.astype(np.int64) @ b.astype(np.int64)


@pytest.mark.parametrize("isa", paths())
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matmul_is_the_exact_int32_product(m, k, n, isa):
  rng = np.random.default_rng(m * 1000 + k * 10 + n)
  a = rng.integers(-128, 128, (m, k)).astype(np.int8)
  b = rng.integers(-128, 128, (k, n)).astype(np.int8)
  packed = cpu_int8.pack(b, isa)
  assert packed.isa == isa
  got = np.asarray(jax.jit(cpu_int8.matmul, static_argnums=2)(a, packed, n))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, reference(a, b))


def test_fastest_path_is_the_default_and_paths_are_ordered():
  here = cpu_int8.available()
  assert here[0] == cpu_int8.isa() and here[-1] == "generic"
  assert list(here) == sorted(here, key=cpu_int8.ISAS.index, reverse=True)
  assert cpu_int8.pack(np.ones((4, 4), np.int8)).isa is None


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


@pytest.mark.parametrize("isa", paths())
def test_every_path_gives_xlas_logits_at_whole_amx_tiles(isa):
  # dim 64 and mlp 128: every K is whole AMX tiles, so AMX runs every layer
  cfg = TINY.replace(dim=64, mlp_dim=128, num_heads=2)
  m = noisy_model(cfg, seed=4)
  calib = data_lib.Split(np.random.default_rng(5).integers(0, 256, (32, 8, 8, 1)).astype(
      np.uint8), np.zeros(32, np.int32), "train")
  x = preprocess(np.random.default_rng(6).integers(0, 256, (9, 8, 8, 1)).astype(np.uint8), cfg)
  forward = jax.jit(model_lib.apply)
  for q in (quantize.dynamic_int8()(m), quantize.static_int8(calib, progress=False)(m)):
    on_path = model_lib.use_cpu_int8_kernel(q, isa)
    assert {leaf.packed.isa for leaf in jax.tree_util.tree_leaves(
        on_path.params, is_leaf=lambda x: hasattr(x, "packed"))
            if getattr(leaf, "packed", None) is not None} == {isa}
    xla = np.asarray(forward(q, x))
    assert xla.std(0).max() > 0.05
    np.testing.assert_array_equal(np.asarray(forward(on_path, x)), xla, err_msg=isa)
  prepared, _ = evaluate.prepared(q, {evaluate.CPU_INT8_KERNEL: isa})
  np.testing.assert_array_equal(np.asarray(forward(prepared, x)), xla)


def test_saving_and_exporting_drop_the_kernel(tmp_path):
  _, variants = _variants()
  m = variants["dynamic-int8"]
  on_kernel = model_lib.use_cpu_int8_kernel(m)
  a = export.save_model(m, tmp_path / "plain")
  b = export.save_model(on_kernel, tmp_path / "kernel")
  # the same layout and arrays, and no packed copy on disk (it would double the
  # int8 bytes; orbax's own files differ between any two saves: paths, content
  # hashes, and how its writes were chunked, by up to 2% on a loaded 2-core CPU)
  assert (tmp_path / "plain" / "vitjax.json").read_text() == \
      (tmp_path / "kernel" / "vitjax.json").read_text()
  assert abs(a - b) < 0.05 * a
  loaded = export.load_model(tmp_path / "kernel")
  plain = export.load_model(tmp_path / "plain")
  for x, y in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(
      plain.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
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
  # the kernel is a candidate where it has its fast path (VNNI or AMX) only
  assert (evaluate.KERNEL_CANDIDATE in evaluate.candidates(m)) == cpu_int8.fast_here()
  assert evaluate.KERNEL_CANDIDATE not in evaluate.candidates(noisy_model(TINY))
  chosen = evaluate.fastest_options(m, 2, calls=1)
  assert evaluate.options_name(chosen) in evaluate.candidates(m)
  assert evaluate.options_name(options) == evaluate.KERNEL_CANDIDATE
  assert evaluate.options_name({**options, evaluate.CPU_INT8_KERNEL: "generic"}) == \
      "xla-default+cpu-int8[generic]"


def test_refusals_name_what_is_wrong():
  plain = noisy_model(TINY)
  with pytest.raises(ValueError, match="no layer of this model multiplies integers"):
    model_lib.use_cpu_int8_kernel(plain)
  with pytest.raises(ValueError, match="no layer of this model multiplies integers"):
    model_lib.use_cpu_int8_kernel(quantize.weight_only(8)(plain))
  with pytest.raises(ValueError, match=r"'vitjax_cpu_int8_kernel'\]='yes'; allowed are 'on'"):
    evaluate.prepared(plain, {evaluate.CPU_INT8_KERNEL: "yes"})
  with pytest.raises(ValueError, match=r"isa='sse2': the kernel's code paths are"):
    cpu_int8.pack(jnp.ones((4, 4), jnp.int8), "sse2")
  with pytest.raises(ValueError, match=r"isa='sse2': the kernel's code paths are"):
    model_lib.use_cpu_int8_kernel(quantize.dynamic_int8()(plain), "sse2")
  missing = [p for p in cpu_int8.ISAS if p not in cpu_int8.available()]
  if missing:
    with pytest.raises(ValueError, match=f"isa='{missing[0]}': this CPU runs only"):
      cpu_int8.pack(jnp.ones((4, 4), jnp.int8), missing[0])
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


def test_unwritable_kernel_cache_is_a_clear_error(monkeypatch, tmp_path):
  (tmp_path / "a-file").write_text("")  # a file where a directory must go (even root fails)
  monkeypatch.setenv("VITJAX_KERNEL_CACHE", str(tmp_path / "a-file" / "cache"))
  with pytest.raises(cpu_int8.KernelUnavailable, match="set VITJAX_KERNEL_CACHE"):
    cpu_int8._build(cpu_int8._compiler())
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
