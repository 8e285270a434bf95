"""The CNN teacher: forward against an independent plain-torch ResNet with the
same (non-trivial) weights, FLOPs by hand, training, export round trip, and
the clear refusals of ViT-only paths."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import with_noise, synthetic_split
from vitjax import export, train
from vitjax import model as model_lib
from vitjax.models.arch import config_from_dict
from vitjax.models.cnn import CNNConfig
from vitjax.transforms import prune, quantize, structured

CFG = CNNConfig(image_size=8, channels=1, num_classes=4, widths=(8, 16), blocks=(1, 2),
                groups=4, stem_stride=1)


def _noisy(cfg=CFG, seed=0):
  m = model_lib.init(cfg, seed)
  return m.replace(params=with_noise(m.params, seed + 7))


def _torch_forward(params, cfg, images):
  """The ResNet written again in plain torch from the parameter arrays."""
  t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
  conv = lambda x, k, stride, pad: torch.nn.functional.conv2d(  # noqa: E731
      x, t(k).permute(3, 2, 0, 1), stride=stride, padding=pad)
  gn = lambda x, p: torch.nn.functional.group_norm(  # noqa: E731
      x, cfg.groups, t(p["scale"]), t(p["bias"]), eps=1e-6)
  x = t(images).permute(0, 3, 1, 2)
  x = conv(x, params["stem"]["kernel"], cfg.stem_stride, 1)
  for s, count in enumerate(cfg.blocks):
    for b in range(count):
      p = params[f"stage_{s}_block_{b}"]
      stride = 2 if s > 0 and b == 0 else 1
      y = torch.relu(gn(x, p["norm_0"]))
      shortcut = conv(y, p["shortcut"]["kernel"], stride, 0) if "shortcut" in p else x
      y = conv(y, p["conv_0"]["kernel"], stride, 1)
      y = conv(torch.relu(gn(y, p["norm_1"])), p["conv_1"]["kernel"], 1, 1)
      x = shortcut + y
  x = torch.relu(gn(x, params["final_norm"])).mean(dim=(2, 3))
  return (x @ t(params["head"]["kernel"]) + t(params["head"]["bias"])).numpy()


def test_forward_matches_a_plain_torch_resnet():
  m = _noisy()
  images = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
  got = np.asarray(model_lib.apply(m, images))
  want = _torch_forward(m.params, CFG, images)
  assert np.abs(want).max() > 0.1  # non-trivial logits
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_flops_count_the_convolutions_by_hand():
  m = model_lib.init(CFG, 0)
  macs = (8 * 8 * 9 * 1 * 8          # stem at 8x8
          + 2 * 8 * 8 * 9 * 8 * 8    # stage 0 block: two 3x3 convs at 8x8
          + 4 * 4 * 8 * 16           # stage 1 first block: 1x1 shortcut, stride 2
          + 4 * 4 * 9 * 8 * 16 + 4 * 4 * 9 * 16 * 16  # its convs at 4x4
          + 2 * 4 * 4 * 9 * 16 * 16  # stage 1 second block
          + 16 * 4)                  # head
  assert model_lib.flops_per_image(m) == 2 * macs


def test_trains_exports_and_reloads_bit_identical(tmp_path):
  split = synthetic_split(64)
  m0 = model_lib.init(CFG, 0)
  cfg = train.TrainConfig(steps=30, batch_size=16, warmup_steps=2, learning_rate=3e-3,
                          crop_pad=1)
  m = train.fit(m0, split, cfg, progress=False)
  images = jnp.asarray(split.images[:32], jnp.float32) / 255.0
  before = (model_lib.apply(m0, images).argmax(-1) == split.labels[:32]).mean()
  after = (model_lib.apply(m, images).argmax(-1) == split.labels[:32]).mean()
  assert after > max(before, 0.5)
  export.save_model(m, tmp_path / "cnn")
  again = export.load_model(tmp_path / "cnn")
  assert again.config == CFG
  np.testing.assert_array_equal(model_lib.apply(again, images), model_lib.apply(m, images))


def test_config_round_trip_and_errors():
  assert config_from_dict(CFG.to_dict()) == CFG
  with pytest.raises(ValueError, match="unknown model arch 'rnn'"):
    config_from_dict({**CFG.to_dict(), "arch": "rnn"})
  with pytest.raises(ValueError, match="groups=3 does not divide the widths"):
    CNNConfig(widths=(8, 16), blocks=(1, 1), groups=3)
  with pytest.raises(ValueError, match="one entry per stage"):
    CNNConfig(widths=(8, 16), blocks=(1,), groups=4)
  with pytest.raises(ValueError, match="patch_dropout=0.5 drops patch tokens"):
    train.fit(model_lib.init(CFG, 0), synthetic_split(32),
              train.TrainConfig(steps=1, batch_size=8, warmup_steps=0, patch_dropout=0.5),
              progress=False)


@pytest.mark.parametrize("transform", [
    quantize.weight_only(8), prune.magnitude(0.5),
    structured.heads_and_neurons(head_keep=0.5, mlp_keep=0.5)])
def test_compression_transforms_refuse_a_cnn(transform):
  with pytest.raises(ValueError, match="needs a ViT/DeiT; this model is a cnn"):
    transform(model_lib.init(CFG, 0))


def test_quantization_sites_refuse_a_cnn():
  with pytest.raises(ValueError, match="quantization sites needs a ViT/DeiT"):
    model_lib.site_addresses(model_lib.init(CFG, 0))
