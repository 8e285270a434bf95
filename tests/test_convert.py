"""Importing timm, Hugging Face and big_vision checkpoints: the converted
vitjax model computes the source model's logits (within 1e-4, fp32, CPU), and
bad files are refused with errors that name the problem."""

import json
import math

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

import timm_reference
from helpers import noisy_model
from vitjax import model as model_lib
from vitjax.models import adapt, convert
from vitjax.models.config import ViTConfig
from vitjax.models.inputs import preprocess


def _images(n: int, size: int, channels: int = 3, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(0, 1, (n, size, size, channels)).astype(np.float32)


def _ours(model: model_lib.Model, images: np.ndarray) -> np.ndarray:
  return np.asarray(model_lib.apply(model, images))


def _assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
  assert theirs.std(0).max() > 0.05 and np.abs(theirs).max() > 0.3  # not vacuous
  assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()


@pytest.mark.parametrize("arch", sorted(timm_reference.ARCHS))
def test_timm_checkpoint_gives_timm_logits(tmp_path, arch):
  torch.manual_seed(0)
  source = timm_reference.TimmViT(**timm_reference.ARCHS[arch]).eval()
  timm_reference.save(source, tmp_path / arch, arch)
  imported = convert.read(tmp_path / arch)
  cfg = imported.model.config
  assert imported.format == "timm"
  assert (cfg.image_size, cfg.patch_size, cfg.dim, cfg.depth, cfg.num_heads, cfg.mlp_dim,
          cfg.num_classes, cfg.gelu, cfg.distilled) == (
              224, 16, 192, 12, 3, 768, 1000, "erf", "distilled" in arch)
  assert cfg.pixel_mean == (0.485, 0.456, 0.406)
  images = _images(2, 224)
  with torch.inference_mode():
    theirs = source(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  _assert_close(_ours(imported.model, images), theirs)


def _hf_models():
  import transformers
  small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=96, image_size=32, patch_size=8, num_labels=5)
  torch.manual_seed(0)
  vit = transformers.ViTForImageClassification(transformers.ViTConfig(**small))
  deit = transformers.DeiTForImageClassificationWithTeacher(
      transformers.DeiTConfig(**small, layer_norm_eps=1e-6))
  for m in (vit, deit):
    with torch.no_grad():
      for p in m.parameters():
        p.add_(torch.randn_like(p) * 0.3)
  return {"vit": vit.eval(), "deit": deit.eval()}


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_hugging_face_checkpoint_gives_transformers_logits(tmp_path, kind):
  source = _hf_models()[kind]
  source.save_pretrained(tmp_path / kind)  # model.safetensors (hub names) + config.json
  assert (tmp_path / kind / "model.safetensors").exists()
  imported = convert.read(tmp_path / kind)
  assert imported.format == "hf"
  cfg = imported.model.config
  assert (cfg.num_heads, cfg.gelu, cfg.distilled) == (4, "erf", kind == "deit")
  assert cfg.norm_eps == (1e-12 if kind == "vit" else 1e-6)
  images = _images(3, 32)
  with torch.inference_mode():
    theirs = source(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).logits.numpy()
  _assert_close(_ours(imported.model, images), theirs)
  # transformers 5's in-memory names (a state_dict saved directly) load too
  safetensors.torch.save_file({k: v.contiguous() for k, v in source.state_dict().items()},
                              tmp_path / f"{kind}-state.safetensors")
  direct = convert.load(tmp_path / f"{kind}-state.safetensors", num_heads=4,
                        norm_eps=cfg.norm_eps)
  _assert_close(_ours(direct, images), theirs)


# ------------------------------------------------------------ big_vision


def _layernorm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def big_vision_forward(p: dict, images: np.ndarray, heads: int) -> np.ndarray:
  """big_vision's ViT (pool 'tok', posemb added before the class token) in
  NumPy float64, from its flat '/'-named parameters."""
  p = {k: v.astype(np.float64) for k, v in p.items()}
  b, h, w, c = images.shape
  ps = p["embedding/kernel"].shape[0]
  g = h // ps
  x = np.einsum("bipjqc,pqcd->bijd", images.reshape(b, g, ps, g, ps, c),
                p["embedding/kernel"]) + p["embedding/bias"]
  x = x.reshape(b, g * g, -1) + p["pos_embedding"]
  x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, x.shape[-1])), x], axis=1)
  depth = len({k.split("/")[1] for k in p if k.startswith("Transformer/encoderblock_")})
  for i in range(depth):
    blk = lambda n: p[f"Transformer/encoderblock_{i}/{n}"]  # noqa: E731
    y = _layernorm(x, blk("LayerNorm_0/scale"), blk("LayerNorm_0/bias"))
    att = "MultiHeadDotProductAttention_1"
    q, k, v = (np.einsum("btd,dhk->bthk", y, blk(f"{att}/{n}/kernel")) + blk(f"{att}/{n}/bias")
               for n in ("query", "key", "value"))
    logits = np.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("bhqt,bthk->bqhk", probs, v)
    x = x + np.einsum("bqhk,hkd->bqd", o, blk(f"{att}/out/kernel")) + blk(f"{att}/out/bias")
    y = _layernorm(x, blk("LayerNorm_2/scale"), blk("LayerNorm_2/bias"))
    y = _gelu_tanh(y @ blk("MlpBlock_3/Dense_0/kernel") + blk("MlpBlock_3/Dense_0/bias"))
    x = x + y @ blk("MlpBlock_3/Dense_1/kernel") + blk("MlpBlock_3/Dense_1/bias")
  x = _layernorm(x, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"])
  return (x[:, 0] @ p["head/kernel"] + p["head/bias"]).astype(np.float32)


def big_vision_params(dim=48, depth=2, heads=3, mlp=80, patch=4, grid=4, channels=3,
                      classes=6, seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  r = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
  hd = dim // heads
  p = {"embedding/kernel": r(patch, patch, channels, dim), "embedding/bias": r(dim),
       "cls": r(1, 1, dim), "pos_embedding": r(1, grid * grid, dim),
       "Transformer/encoder_norm/scale": 1 + r(dim), "Transformer/encoder_norm/bias": r(dim),
       "head/kernel": r(dim, classes), "head/bias": r(classes)}
  for i in range(depth):
    pre = f"Transformer/encoderblock_{i}/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      p[pre + ln + "/scale"], p[pre + ln + "/bias"] = 1 + r(dim), r(dim)
    for n in ("query", "key", "value"):
      p[pre + f"MultiHeadDotProductAttention_1/{n}/kernel"] = r(dim, heads, hd)
      p[pre + f"MultiHeadDotProductAttention_1/{n}/bias"] = r(heads, hd)
    p[pre + "MultiHeadDotProductAttention_1/out/kernel"] = r(heads, hd, dim)
    p[pre + "MultiHeadDotProductAttention_1/out/bias"] = r(dim)
    p[pre + "MlpBlock_3/Dense_0/kernel"], p[pre + "MlpBlock_3/Dense_0/bias"] = r(dim, mlp), r(mlp)
    p[pre + "MlpBlock_3/Dense_1/kernel"], p[pre + "MlpBlock_3/Dense_1/bias"] = r(mlp, dim), r(dim)
  return p


def test_big_vision_npz_gives_big_vision_logits_in_every_layout(tmp_path):
  p = big_vision_params()
  images = _images(3, 16)
  theirs = big_vision_forward(p, images, heads=3)
  np.savez(tmp_path / "today.npz", **p)
  # the scan layout: one 'encoderblock' whose arrays stack the blocks
  scan = {k: v for k, v in p.items() if "encoderblock_" not in k}
  for k in [k for k in p if k.startswith("Transformer/encoderblock_0/")]:
    rest = k[len("Transformer/encoderblock_0/"):]
    scan[f"Transformer/encoderblock/{rest}"] = np.stack(
        [p[f"Transformer/encoderblock_{i}/{rest}"] for i in range(2)])
  np.savez(tmp_path / "scan.npz", **scan)
  # the original ViT repo's layout: posemb in a module, with an entry for cls
  old = {k: v for k, v in p.items() if k not in ("pos_embedding", "cls")}
  shift = np.random.default_rng(5).normal(0, 0.3, (1, 1, 48)).astype(np.float32)
  old["cls"] = p["cls"] - shift
  old["Transformer/posembed_input/pos_embedding"] = np.concatenate(
      [shift, p["pos_embedding"]], axis=1)
  np.savez(tmp_path / "old.npz", **old)
  # block children numbered per class (LayerNorm_0/1, ..._0), as flax's
  # convert_pre_linen renames the old incrementally numbered modules
  renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
             "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
  linen = {"/".join(renames.get(part, part) for part in k.split("/")): v for k, v in old.items()}
  np.savez(tmp_path / "linen.npz", **linen)
  for name in ("today", "scan", "old", "linen"):
    imported = convert.read(tmp_path / f"{name}.npz")
    assert imported.format == "big_vision"
    cfg = imported.model.config
    assert (cfg.num_heads, cfg.gelu, cfg.image_size, cfg.patch_size) == (3, "tanh", 16, 4)
    _assert_close(_ours(imported.model, images), theirs)


# ------------------------------------------------------------ bad input


def test_pickle_files_are_refused_with_how_to_convert(tmp_path):
  for suffix in (".pth", ".bin", ".pt"):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really")
    with pytest.raises(convert.ConversionError, match="pickle.*safetensors"):
      convert.load(path)


def _small_timm(depth: int) -> timm_reference.TimmViT:
  torch.manual_seed(0)
  return timm_reference.TimmViT(img_size=32, patch_size=8, embed_dim=48, depth=depth,
                                num_heads=3, num_classes=4)


def test_truncated_safetensors_names_the_tensor_it_cuts(tmp_path):
  path = timm_reference.save(_small_timm(1), tmp_path / "m", "vit_tiny_patch8_32") / \
      "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 100])
  with pytest.raises(convert.ConversionError, match="truncated: tensor '.*' ends at byte"):
    convert.load(path)
  path.write_bytes(data[:20])
  with pytest.raises(convert.ConversionError, match="truncated or not a safetensors"):
    convert.load(path)


def test_shape_mismatch_missing_and_extra_tensors_are_named(tmp_path):
  tensors = {k: v.numpy() for k, v in _small_timm(2).state_dict().items()}
  bad = dict(tensors, **{"blocks.1.mlp.fc2.weight": np.zeros((48, 100), np.float32)})
  safetensors.numpy.save_file(bad, tmp_path / "shape.safetensors")
  with pytest.raises(convert.ConversionError, match="shape mismatch: tensor 'blocks.1.mlp.fc2"):
    convert.load(tmp_path / "shape.safetensors")
  missing = {k: v for k, v in tensors.items() if k != "blocks.1.attn.proj.bias"}
  safetensors.numpy.save_file(missing, tmp_path / "missing.safetensors")
  with pytest.raises(convert.ConversionError, match="'blocks.1.attn.proj.bias' is missing"):
    convert.load(tmp_path / "missing.safetensors")
  extra = dict(tensors, **{"blocks.0.ls1.gamma": np.ones(48, np.float32)})
  safetensors.numpy.save_file(extra, tmp_path / "extra.safetensors")
  with pytest.raises(convert.ConversionError, match="'blocks.0.ls1.gamma' means layer scale"):
    convert.load(tmp_path / "extra.safetensors")
  extra = dict(tensors, **{"some.other": np.ones(3, np.float32)})
  safetensors.numpy.save_file(extra, tmp_path / "extra2.safetensors")
  with pytest.raises(convert.ConversionError, match=r"unexpected tensors \['some.other'\]"):
    convert.load(tmp_path / "extra2.safetensors")


def test_unknown_architecture_format_and_overrides_are_refused(tmp_path):
  safetensors.numpy.save_file({"layer1.0.conv1.weight": np.zeros((4, 3, 3, 3), np.float32)},
                              tmp_path / "resnet.safetensors")
  with pytest.raises(convert.ConversionError, match="unknown architecture"):
    convert.load(tmp_path / "resnet.safetensors")
  with pytest.raises(convert.ConversionError, match="format must be one of"):
    convert.load(tmp_path / "resnet.safetensors", format="onnx")
  np.savez(tmp_path / "bv.npz", **big_vision_params())
  with pytest.raises(convert.ConversionError, match="unknown config overrides"):
    convert.load(tmp_path / "bv.npz", heads=2)
  with pytest.raises(convert.ConversionError, match="num_heads"):
    convert.load(tmp_path / "bv.npz", num_heads=5)
  (tmp_path / "w.ckpt").write_bytes(b"")
  with pytest.raises(convert.ConversionError, match="pickle"):
    convert.load(tmp_path / "w.ckpt")
  (tmp_path / "cfg.json").write_text(json.dumps({}))
  with pytest.raises(convert.ConversionError, match="unknown checkpoint suffix"):
    convert.load(tmp_path / "cfg.json")


# ------------------------------------------------------------ adapting


RGB = ViTConfig(image_size=32, patch_size=8, channels=3, num_classes=5, dim=48, depth=2,
                num_heads=3, mlp_dim=64, distilled=True, gelu="erf",
                pixel_mean=(0.5, 0.4, 0.3), pixel_std=(0.2, 0.25, 0.3))


def test_grayscale_adaptation_computes_the_rgb_model_on_gray_images():
  model = noisy_model(RGB)
  gray = adapt.set_channels(model, 1)
  assert gray.config.channels == 1 and gray.params["embedding"]["kernel"].shape == (64, 48)
  images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 1)).astype(np.uint8)
  theirs = np.asarray(model_lib.apply(model, preprocess(images, model.config)))
  ours = np.asarray(model_lib.apply(gray, preprocess(images, gray.config)))
  _assert_close(ours, theirs)
  back = adapt.set_channels(gray, 3)  # mean of three equal channels: the same function
  np.testing.assert_allclose(
      np.asarray(model_lib.apply(back, preprocess(images, back.config))), ours, atol=1e-4)
  with pytest.raises(ValueError, match="channels=2"):
    adapt.set_channels(model, 2)
  with pytest.raises(ValueError, match="tokenizer 'patch'"):
    adapt.set_channels(noisy_model(RGB.replace(tokenizer="spt", distilled=False)), 1)


def test_position_resampling_keeps_prefix_entries_and_interpolates_the_grid():
  model = noisy_model(RGB)
  big = adapt.resample_positions(model, 64)
  pos, new = np.asarray(model.params["pos_embedding"]), big.params["pos_embedding"]
  assert big.config.image_size == 64 and new.shape == (1, 2 + 64, 48)
  np.testing.assert_array_equal(new[:, :2], pos[:, :2])
  grid = pos[0, 2:].reshape(4, 4, 48)
  np.testing.assert_allclose(new[0, 2:].reshape(8, 8, 48)[0, 0], grid[0, 0], atol=1e-6)
  np.testing.assert_allclose(new[0, 2:].reshape(8, 8, 48)[-1, -1], grid[-1, -1], atol=1e-6)
  same = adapt.resample_positions(model, 32)
  np.testing.assert_array_equal(same.params["pos_embedding"], pos)
  assert np.asarray(model_lib.apply(big, _images(2, 64))).shape == (2, 5)
  with pytest.raises(ValueError, match="image_size=28 cannot be used.*multiple of patch_size=8"):
    adapt.resample_positions(model, 28)


def test_new_head_and_adapt_refuse_what_they_cannot_do():
  model = noisy_model(RGB)
  ten = adapt.adapt(model, num_classes=10, image_size=16, channels=1)
  assert (ten.config.num_classes, ten.config.image_size, ten.config.channels) == (10, 16, 1)
  assert ten.params["head"]["kernel"].shape == (48, 10) and \
      ten.params["head_dist"]["kernel"].shape == (48, 10)
  assert not np.any(ten.params["head"]["kernel"])
  with pytest.raises(ValueError, match="num_classes must be a positive int"):
    adapt.new_head(model, 0)
  with pytest.raises(ValueError, match="needs num_classes, image_size or channels"):
    adapt.adapt(model)
  from vitjax.transforms import quantize
  with pytest.raises(ValueError, match="compressed"):
    adapt.new_head(quantize.weight_only(8)(model), 3)
