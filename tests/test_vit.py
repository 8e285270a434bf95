"""ViT / DeiT model: shapes, hand-checked attention, tokens, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY
from vitjax import model as model_lib
from vitjax.models import vit
from vitjax.models.config import ViTConfig, preset


def _images(cfg, n=3, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed),
                           (n, cfg.image_size, cfg.image_size, cfg.channels))


def test_forward_shapes_and_param_names():
  m = model_lib.init(TINY, 0)
  assert model_lib.apply(m, _images(TINY)).shape == (3, TINY.num_classes)
  paths = dict(model_lib.weight_leaves(m.params))
  assert paths["embedding/kernel"].shape == (4 * 4 * 1, 16)
  assert paths["pos_embedding"].shape == (1, TINY.num_patches + 1, 16)
  assert paths["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].shape == (16, 16)
  assert paths["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].shape == (16, 32)
  assert paths["head/kernel"].shape == (16, 4)
  assert "dist" not in paths


def test_attention_matches_numpy_by_hand():
  heads, hd, dim, t = 2, 3, 6, 5
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, t, dim)).astype(np.float32)
  attn = vit.Attention(heads, hd, dim)
  params = jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32)),
      attn.init(jax.random.PRNGKey(0), x)["params"])
  got = np.asarray(attn.apply({"params": params}, x))

  p = jax.tree_util.tree_map(np.asarray, params)
  proj = lambda name: x @ p[name]["kernel"] + p[name]["bias"]
  q, k, v = (proj(n).reshape(2, t, heads, hd) for n in ("query", "key", "value"))
  want = np.zeros((2, t, heads * hd), np.float32)
  for b in range(2):
    for h in range(heads):
      logits = q[b, :, h] @ k[b, :, h].T / np.sqrt(hd)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      want[b, :, h * hd:(h + 1) * hd] = w @ v[b, :, h]
  want = want @ p["out"]["kernel"] + p["out"]["bias"]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_patch_embedding_equals_big_vision_conv():
  cfg = ViTConfig(image_size=8, patch_size=4, channels=3, dim=5, depth=1, num_heads=1,
                  mlp_dim=4)
  images = _images(cfg, 2)
  kernel = jax.random.normal(jax.random.PRNGKey(1), (4, 4, 3, 5))  # big_vision layout
  conv = jax.lax.conv_general_dilated(images, kernel, (4, 4), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  patches = vit.patchify(images, 4) @ kernel.reshape(-1, 5)
  np.testing.assert_allclose(patches, conv.reshape(2, -1, 5), rtol=1e-5, atol=1e-5)


def test_deit_tokens_and_two_heads():
  cfg = TINY.replace(distilled=True)
  m = model_lib.init(cfg, 0)
  paths = dict(model_lib.weight_leaves(m.params))
  assert paths["dist"].shape == (1, 1, 16)
  assert paths["pos_embedding"].shape == (1, cfg.num_patches + 2, 16)
  # Give each head its own non-zero weights so the two outputs differ.
  params = jax.tree_util.tree_map(lambda a: a, m.params)
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), (16, 4))
  params["head_dist"]["kernel"] = jax.random.normal(jax.random.PRNGKey(3), (16, 4))
  m = m.replace(params=params)
  images = _images(cfg)
  cls_logits, dist_logits = model_lib.apply(m, images, heads="both")
  np.testing.assert_allclose(model_lib.apply(m, images), (cls_logits + dist_logits) / 2,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="heads must be 'mean' or 'both', got 'cls'"):
    model_lib.apply(m, images, heads="cls")
  plain = model_lib.init(cfg.replace(distilled=False), 0)
  with pytest.raises(ValueError, match="heads='both' needs a DeiT"):
    model_lib.apply(plain, images, heads="both")
  with pytest.raises(ValueError, match="heads must be 'mean' or 'both'"):
    model_lib.apply(plain, images, heads="dist")
  # The class head reads token 0, the distillation head token 1 of the final norm.
  _, inter = model_lib.apply_with_intermediates(m, images)
  last = inter["features"][-1]
  ln = jax.vmap(jax.vmap(lambda t: (t - t.mean()) / jnp.sqrt(t.var() + 1e-6)))(last)
  ln = ln * params["Transformer"]["encoder_norm"]["scale"] + \
      params["Transformer"]["encoder_norm"]["bias"]
  np.testing.assert_allclose(cls_logits, ln[:, 0] @ params["head"]["kernel"] +
                             params["head"]["bias"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dist_logits, ln[:, 1] @ params["head_dist"]["kernel"] +
                             params["head_dist"]["bias"], rtol=1e-4, atol=1e-4)
  assert not np.allclose(cls_logits, dist_logits)


def _with_random_heads(m):
  params = jax.tree_util.tree_map(lambda a: a, m.params)
  for i, name in enumerate(n for n in ("head", "head_dist") if n in params):
    params[name]["kernel"] = jax.random.normal(jax.random.PRNGKey(10 + i),
                                               params[name]["kernel"].shape)
  return m.replace(params=params)


@pytest.mark.parametrize("distilled", [False, True])
def test_patch_dropout_runs_the_encoder_on_the_kept_patches_only(distilled):
  cfg = TINY.replace(image_size=16, distilled=distilled)  # 16 patches of 4x4
  m = _with_random_heads(model_lib.init(cfg, 0))
  images = _images(cfg, n=2)
  full = model_lib.apply(m, images)
  every = jnp.tile(jnp.arange(16), (2, 1))
  np.testing.assert_allclose(model_lib.apply(m, images, keep=every), full, atol=1e-5)
  # Attention is permutation-equivariant and positions are added before the
  # tokens are picked: the order of the kept indices does not matter.
  shuffled = jnp.stack([jax.random.permutation(jax.random.PRNGKey(i), 16) for i in range(2)])
  np.testing.assert_allclose(model_lib.apply(m, images, keep=shuffled), full, atol=1e-5)
  keep = jnp.array([[0, 3, 9, 14], [1, 2, 5, 15]])
  dropped = model_lib.apply(m, images, keep=keep)
  assert not np.allclose(dropped, full, atol=1e-3)
  # A dropped patch's pixels never reach the logits (patches are row-major):
  # patch 4 (rows 4..7, columns 0..3) is dropped in both images, patch 3 (rows
  # 0..3, columns 12..15) kept in the first only.
  altered = images.at[:, 4:8, 0:4].set(5.0)
  np.testing.assert_allclose(model_lib.apply(m, altered, keep=keep), dropped, atol=1e-5)
  altered = images.at[:, 0:4, 12:16].set(5.0)
  moved = model_lib.apply(m, altered, keep=keep)
  assert not np.allclose(moved[0], dropped[0], atol=1e-3)
  np.testing.assert_allclose(moved[1], dropped[1], atol=1e-5)


@pytest.mark.parametrize("keep_shape", [(3, 4), (2, 17), (2, 0), (2,)])
def test_patch_dropout_rejects_bad_keep_shapes(keep_shape):
  cfg = TINY.replace(image_size=16)
  m = model_lib.init(cfg, 0)
  with pytest.raises(ValueError, match=r"keep has shape .* expected \(2, K\) with K in 1..16"):
    model_lib.apply(m, _images(cfg, n=2), keep=jnp.zeros(keep_shape, jnp.int32))


def test_intermediates_have_block_shapes():
  m = model_lib.init(TINY, 0)
  _, inter = model_lib.apply_with_intermediates(m, _images(TINY))
  assert len(inter["features"]) == TINY.depth
  assert inter["features"][0].shape == (3, TINY.num_tokens, TINY.dim)
  probs = inter["attention"][1]
  assert probs.shape == (3, TINY.num_heads, TINY.num_tokens, TINY.num_tokens)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_shifted_views_by_hand():
  img = jnp.arange(1, 10, dtype=jnp.float32).reshape(1, 3, 3, 1)
  views = np.asarray(vit.shifted_views(img, 1))[0]
  assert views.shape == (3, 3, 5)
  np.testing.assert_array_equal(views[..., 0], np.arange(1, 10).reshape(3, 3))
  # Channel 1 shows the image moved down-right by one pixel (it reads the
  # pixel up-left of each position), zero-filled at the top and left.
  np.testing.assert_array_equal(views[..., 1], [[0, 0, 0], [0, 1, 2], [0, 4, 5]])
  np.testing.assert_array_equal(views[..., 4], [[5, 6, 0], [8, 9, 0], [0, 0, 0]])


def test_spt_tokenizer_embeds_five_views():
  cfg = TINY.replace(tokenizer="spt")
  m = model_lib.init(cfg, 0)
  paths = dict(model_lib.weight_leaves(m.params))
  assert paths["embedding/kernel"].shape == (5 * 4 * 4 * 1, 16)
  assert paths["embedding_norm/scale"].shape == (5 * 4 * 4 * 1,)
  images = _images(cfg)
  patches = vit.patchify(vit.shifted_views(images, 2), 4)
  mean = patches.mean(-1, keepdims=True)
  normed = (patches - mean) / jnp.sqrt(patches.var(-1, keepdims=True) + 1e-6)
  # The patch LayerNorm is the identity map at init, so the embedding's input
  # is each shifted patch normalized over its 80 features.
  np.testing.assert_allclose(np.asarray(model_lib.linear_inputs(m, images)["embedding"]),
                             np.asarray(normed), atol=1e-4)
  assert model_lib.apply(m, images).shape == (3, 4)


def test_per_block_widths_shrink_params():
  cfg = TINY.replace(block_heads=(1, 2), block_mlp_dims=(8, 32))
  m = model_lib.init(cfg, 0)
  paths = dict(model_lib.weight_leaves(m.params))
  assert paths["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape == (16, 8)
  assert paths["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"].shape == (8, 16)
  assert paths["Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel"].shape == (8, 16)
  assert model_lib.apply(m, _images(cfg)).shape == (3, 4)


def test_flops_match_hand_count():
  cfg = TINY
  m = model_lib.init(cfg, 0)
  t, d, n = cfg.num_tokens, cfg.dim, cfg.num_patches
  per_block = 2 * t * (4 * d * d + 2 * d * cfg.mlp_dim) + 2 * 2 * t * t * d
  want = 2 * n * 16 * d + cfg.depth * per_block + 2 * d * cfg.num_classes
  assert model_lib.flops_per_image(m) == want


def test_stored_bytes_and_param_count():
  m = model_lib.init(TINY, 0)
  n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(m.params))
  assert model_lib.param_count(m) == n
  assert model_lib.stored_bytes(m) == 4 * n


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=30, num_heads=4), "dim=30 is not divisible by num_heads=4"),
    (dict(image_size=28, patch_size=5), "image_size=28 is not divisible by patch_size=5"),
    (dict(depth=0), "depth must be a positive int"),
    (dict(tokenizer="conv"), "tokenizer must be 'patch' or 'spt', got 'conv'"),
    (dict(block_heads=(1,)), "block_heads has 1 entries, expected depth=2"),
    (dict(block_mlp_dims=(8, 64)), r"block_mlp_dims\[1\]=64 is outside 1..32"),
])
def test_config_errors_name_the_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    TINY.replace(**kwargs)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of"):
    preset("huge")
  assert preset("s16").image_size == 224


def test_check_params_rejects_other_config_and_nan():
  m = model_lib.init(TINY, 0)
  with pytest.raises(ValueError, match=r"MlpBlock_3/Dense_0/(kernel|bias) has shape \(32,?\)"):
    model_lib.check_params(TINY.replace(mlp_dim=16), m.params)
  with pytest.raises(ValueError, match="missing"):
    model_lib.check_params(TINY.replace(depth=3), m.params)
  params = jax.tree_util.tree_map(lambda a: a, m.params)
  params["head"]["bias"] = params["head"]["bias"].at[0].set(jnp.nan)
  with pytest.raises(ValueError, match="head/bias holds NaN"):
    model_lib.check_params(TINY, params)
