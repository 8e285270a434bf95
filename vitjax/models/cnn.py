"""A small ResNet: the convolutional teacher of DeiT-style distillation.

DeiT found that a convnet teacher hands its student the inductive bias a ViT
lacks, and gains it more than a transformer teacher of similar accuracy. This
is that teacher for small images: a 3x3 stem, then stages of pre-activation
residual blocks (GroupNorm, so there are no batch statistics to carry), each
stage after the first halving the resolution and widening, global average
pooling and a linear head.

`CNNConfig` shares the input fields of `ViTConfig` (image size, channels,
classes, pixel statistics), so data checks, preprocessing, training, export
and `distill.check_pair` treat both alike. It is a teacher: vitjax's
compression transforms and quantization sites target ViTs only and refuse it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitjax.models.config import from_fields, set_pixel_statistics

ARCH = "cnn"


@dataclasses.dataclass(frozen=True)
class CNNConfig:
  """Shape of the ResNet.

  Attributes:
    image_size, channels, num_classes, pixel_mean, pixel_std: as in `ViTConfig`.
    widths: channels of each stage; stage i > 0 starts with a stride-2 block.
    stem_stride: stride of the 3x3 stem (2 halves the resolution before the
      first stage: 4x cheaper, which XLA's CPU convolutions need).
    blocks: residual blocks per stage (one entry per stage).
    groups: GroupNorm groups (must divide every width).
    dtype: compute dtype ('float32' or 'bfloat16').
  """

  image_size: int = 28
  channels: int = 1
  num_classes: int = 10
  widths: tuple[int, ...] = (32, 64, 128)
  blocks: tuple[int, ...] = (1, 1, 1)
  stem_stride: int = 2
  groups: int = 8
  dtype: str = "float32"
  pixel_mean: tuple[float, ...] = (0.0,)
  pixel_std: tuple[float, ...] = (1.0,)

  # A CNN has no distillation token, patches or prefix tokens.
  distilled = False
  num_prefix_tokens = 0

  def __post_init__(self) -> None:
    for name in ("image_size", "channels", "num_classes", "groups", "stem_stride"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"CNNConfig.{name} must be a positive int, got {value!r}")
    object.__setattr__(self, "widths", tuple(self.widths))
    object.__setattr__(self, "blocks", tuple(self.blocks))
    if not self.widths or len(self.widths) != len(self.blocks):
      raise ValueError(f"CNNConfig.widths {self.widths} and blocks {self.blocks} need one "
                       "entry per stage each (at least one stage)")
    for name in ("widths", "blocks"):
      for i, v in enumerate(getattr(self, name)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
          raise ValueError(f"CNNConfig.{name}[{i}] must be a positive int, got {v!r}")
    bad = [w for w in self.widths if w % self.groups]
    if bad:
      raise ValueError(f"CNNConfig.groups={self.groups} does not divide the widths {bad}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"CNNConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    set_pixel_statistics(self)

  def replace(self, **changes: Any) -> CNNConfig:
    """Returns a copy with `changes` applied (validated again)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict with `"arch": "cnn"`; `CNNConfig.from_dict` inverts it."""
    out = {k: list(v) if isinstance(v, tuple) else v
           for k, v in dataclasses.asdict(self).items()}
    return {"arch": ARCH, **out}

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> CNNConfig:
    """Builds a config from `to_dict` output; refuses unknown keys."""
    return from_fields(cls, {k: v for k, v in values.items() if k != "arch"})


CNN_PRESETS: dict[str, CNNConfig] = {
    # The convolutional teacher of the "tiny" preset (28x28 grayscale): stem
    # to 14x14, stages at 14, 7 and 4 pixels; 0.31 M parameters, 20 MFLOPs.
    "tiny-cnn": CNNConfig(image_size=28, channels=1, num_classes=10,
                          widths=(32, 64, 128), blocks=(1, 1, 1), groups=8),
}


class ResidualBlock(nn.Module):
  """Pre-activation residual block: GN-ReLU-conv3x3(stride)-GN-ReLU-conv3x3,
  plus the input (through a strided 1x1 conv when the shape changes)."""

  width: int
  stride: int
  groups: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(nn.GroupNorm(self.groups, dtype=self.dtype, name="norm_0")(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.width:
      shortcut = nn.Conv(self.width, (1, 1), (self.stride, self.stride), use_bias=False,
                         dtype=self.dtype, name="shortcut")(y)
    y = nn.Conv(self.width, (3, 3), (self.stride, self.stride), padding=1, use_bias=False,
                dtype=self.dtype, name="conv_0")(y)
    y = nn.relu(nn.GroupNorm(self.groups, dtype=self.dtype, name="norm_1")(y))
    y = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                name="conv_1", kernel_init=nn.initializers.zeros)(y)
    return shortcut + y


class ResNet(nn.Module):
  """(B, H, W, C) preprocessed images -> (B, num_classes) logits."""

  config: CNNConfig

  @nn.compact
  def __call__(self, images: jax.Array, heads: Literal["mean"] = "mean",
               keep: jax.Array | None = None) -> jax.Array:
    if heads != "mean":
      raise ValueError(f"a CNN has one head: heads must be 'mean', got {heads!r}")
    if keep is not None:
      raise ValueError("a CNN has no patch tokens to drop (keep must be None; train it "
                       "with patch_dropout=0)")
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    x = nn.Conv(cfg.widths[0], (3, 3), (cfg.stem_stride, cfg.stem_stride), padding=1,
                use_bias=False, dtype=dtype, name="stem")(jnp.asarray(images, dtype))
    for s, (width, count) in enumerate(zip(cfg.widths, cfg.blocks)):
      for b in range(count):
        stride = 2 if s > 0 and b == 0 else 1
        x = ResidualBlock(width, stride, cfg.groups, dtype, name=f"stage_{s}_block_{b}")(x)
    x = nn.relu(nn.GroupNorm(cfg.groups, dtype=dtype, name="final_norm")(x))
    pooled = x.mean(axis=(1, 2))
    return nn.Dense(cfg.num_classes, dtype=dtype, name="head")(pooled).astype(jnp.float32)
