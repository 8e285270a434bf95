"""The PyTorch peer of the speed benchmark computes the same function as
vitjax, and the XLA CPU option choice changes compilation, not results."""

import pathlib
import sys

import jax
import numpy as np
import pytest
import torch

from helpers import TINY
from vitjax import evaluate, xla_cpu
from vitjax import model as model_lib
from vitjax.data import Split
from vitjax.models.config import ViTConfig
from vitjax.models.inputs import preprocess

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import torch_vit  # noqa: E402


def noisy(config: ViTConfig, seed: int = 0) -> model_lib.Model:
  """A model whose every parameter (class/distillation tokens and heads too,
  which init leaves zero) is random, so each logit depends on all of them."""
  model = model_lib.init(config, seed)
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(
      lambda a: (np.asarray(a) + rng.normal(0, 0.3, np.shape(a))).astype(np.float32),
      model.params)
  return model_lib.Model(config, params)


CONFIGS = {
    "spt-tok": TINY.replace(tokenizer="spt", pixel_mean=(0.3,), pixel_std=(0.4,)),
    "deit-rgb": ViTConfig(image_size=32, patch_size=8, channels=3, num_classes=7, dim=48,
                          depth=2, num_heads=3, mlp_dim=96, distilled=True,
                          pixel_mean=(0.5, 0.4, 0.3), pixel_std=(0.2, 0.25, 0.3)),
    "gap": TINY.replace(pool="gap"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_peer_gives_vitjax_logits(name):
  cfg = CONFIGS[name]
  model = noisy(cfg)
  images = np.random.default_rng(1).integers(
      0, 256, (5, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.uint8)
  ours = np.asarray(model_lib.apply(model, preprocess(images, cfg)))
  peer = torch_vit.TorchViT(model).eval()
  with torch.inference_mode():
    theirs = peer.logits(torch.from_numpy(images)).numpy()
    classes = peer(torch.from_numpy(images)).numpy()
  assert np.abs(ours).max() > 1.0 and ours.std(0).max() > 0.1  # not a vacuous comparison
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(classes, ours.argmax(-1))


def test_torch_peer_refuses_a_compressed_model_and_a_wrong_image_size():
  from vitjax.transforms import quantize
  with pytest.raises(ValueError, match="compressed leaves"):
    torch_vit.TorchViT(quantize.weight_only(8)(noisy(TINY)))
  peer = torch_vit.TorchViT(noisy(TINY))
  with pytest.raises(ValueError, match="this model takes"):
    peer.logits(torch.zeros((1, TINY.image_size + 4, TINY.image_size + 4, 1),
                            dtype=torch.uint8))


def test_xla_cpu_options_change_the_executable_not_the_predictions():
  model = noisy(TINY)
  rng = np.random.default_rng(2)
  # images of different brightness and contrast, so that classes differ
  images = (rng.random((64, 8, 8, 1)) * rng.integers(1, 256, (64, 1, 1, 1))).astype(np.uint8)
  split = Split(images, np.zeros(64, np.int32))
  texts = {name: evaluate.predictor(opts).lower(model, images).compile().as_text()
           for name, opts in xla_cpu.CANDIDATES.items()}
  assert "__ynn_fusion" in texts["xla-default"]
  assert "__ynn_fusion" not in texts["ynn-off"]
  preds = {name: evaluate.predictions(model, split, 32, opts)
           for name, opts in xla_cpu.CANDIDATES.items()}
  np.testing.assert_array_equal(preds["ynn-off"], preds["xla-default"])
  logits = {name: np.asarray(jax.jit(lambda m, x: model_lib.apply(m, preprocess(x, TINY)),
                                     compiler_options=opts or None)(model, images))
            for name, opts in xla_cpu.CANDIDATES.items()}
  assert logits["xla-default"].std(0).max() > 0.01
  np.testing.assert_allclose(logits["ynn-off"], logits["xla-default"], atol=1e-5)


def test_fastest_options_returns_a_candidate_and_refuses_bad_sizes():
  model = noisy(TINY)
  chosen = evaluate.fastest_options(model, 2, calls=1)
  assert xla_cpu.candidate_name(chosen) in xla_cpu.CANDIDATES
  with pytest.raises(ValueError, match="batch=0"):
    evaluate.fastest_options(model, 0)
  with pytest.raises(ValueError, match="not one of the candidates"):
    xla_cpu.candidate_name({"xla_cpu_experimental_ynn_fusion_type": "x"})
  assert xla_cpu.xla_flags(xla_cpu.CANDIDATES["ynn-off"]) == \
      "--xla_cpu_experimental_ynn_fusion_type="
  assert "CPUs" in xla_cpu.cpu_description()


def test_ratio_spread_is_per_round():
  # rounds: reference 2, 4, 6 s; other 1, 1, 4 s -> ratios 2, 4, 1.5
  assert evaluate.ratio_spread([2.0, 4.0, 6.0], [1.0, 1.0, 4.0]) == (1.5, 2.0, 4.0)


def test_compare_reports_every_round_and_the_chosen_options():
  a, b = noisy(TINY), noisy(TINY, seed=1)
  images = np.random.default_rng(3).integers(0, 256, (32, 16, 16, 1)).astype(np.uint8)
  split = Split(images, np.zeros(32, np.int32))
  off = xla_cpu.CANDIDATES["ynn-off"]
  reports = evaluate.compare({"a": a, "b": b}, split, timing_batch=8, rounds=3,
                             choose_options=lambda m, batch: off if batch == 1 else {})
  for r in reports.values():
    assert len(r.latency_rounds_ms) == 3 and len(r.throughput_rounds) == 3
    assert r.latency_ms == pytest.approx(float(np.median(r.latency_rounds_ms)))
    assert r.options == "ynn-off (b=1), xla-default (b=8)"
  assert reports["a"].accuracy == pytest.approx(evaluate.accuracy(a, split))


def test_precompile_fills_the_jit_cache_that_later_calls_use():
  a, b = noisy(TINY), noisy(TINY.replace(dim=TINY.dim * 2), seed=1)  # two structures
  opts = list(xla_cpu.CANDIDATES.values())
  sizes = {i: evaluate.predictor(o)._cache_size() for i, o in enumerate(opts)}
  # Batch sizes no other test compiles: each job is a new executable.
  assert evaluate.precompile({"a": a, "b": b}, (5, 7), opts) == 8
  for i, o in enumerate(opts):  # 2 structures x 2 batch sizes per options
    assert evaluate.predictor(o)._cache_size() == sizes[i] + 4
  evaluate.round_times({"a": a, "b": b}, 7, rounds=1, calls=1,
                       options={"a": opts[1], "b": opts[1]}, warmup=0)
  assert evaluate.predictor(opts[1])._cache_size() == sizes[1] + 4  # nothing new
  with pytest.raises(ValueError, match="workers=0 must be >= 1"):
    evaluate.precompile({"a": a}, (1,), workers=0)
