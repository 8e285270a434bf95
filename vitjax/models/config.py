"""ViT / DeiT configuration: a frozen, hashable dataclass (static under jit)."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

Gelu = Literal["tanh", "erf"]
GELUS: tuple[str, ...] = typing.get_args(Gelu)


def set_pixel_statistics(config: Any) -> None:
  """Normalizes a frozen config's `pixel_mean` / `pixel_std` to tuples of
  floats in place.

  Raises:
    ValueError: not 1 or `config.channels` finite numbers, or a std <= 0
      (naming the config class and the field).
  """
  kind = type(config).__name__
  for name in ("pixel_mean", "pixel_std"):
    values = getattr(config, name)
    if isinstance(values, (int, float)):
      values = (values,)
    values = tuple(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                   else v for v in values)
    object.__setattr__(config, name, values)
    if len(values) not in (1, config.channels) or not all(
        isinstance(v, float) and math.isfinite(v) for v in values):
      raise ValueError(f"{kind}.{name} must be 1 or channels={config.channels} finite "
                       f"numbers, got {values!r}")
  if not all(v > 0 for v in config.pixel_std):
    raise ValueError(f"{kind}.pixel_std must be > 0, got {config.pixel_std!r}")


def from_fields(cls: type, values: dict[str, Any]) -> Any:
  """`cls(**values)` for a config dataclass.

  Raises:
    ValueError: keys that are not fields of `cls` (named, with the known ones).
  """
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
  return cls(**values)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape of a ViT or DeiT.

  Attributes:
    image_size: side of the square input image, in pixels.
    patch_size: side of a square patch; must divide `image_size`.
    channels: input channels (1 for Fashion-MNIST, 3 for ImageNet).
    num_classes: classifier outputs.
    dim: token width.
    depth: number of encoder blocks.
    num_heads: attention heads of an unpruned block; `dim` must divide by it.
    mlp_dim: hidden width of an unpruned block's MLP.
    pool: how the class head reads the tokens: "tok" (a class token) or "gap"
      (the mean of the patch tokens, no class token).
    tokenizer: "patch" (ViT: linear map of each flattened patch) or "spt"
      (shifted patch tokenization, Lee et al. 2021: the image and four copies
      shifted diagonally by half a patch, stacked, patchified, layer-normed,
      then the same linear map; for small datasets).
    distilled: DeiT: add a distillation token and a second head.
    block_heads: per-block head counts after structured pruning (empty: all
      blocks have `num_heads`). The width of one head stays `dim // num_heads`.
    block_mlp_dims: per-block MLP widths after structured pruning (empty: all
      blocks have `mlp_dim`).
    dtype: compute dtype of activations ('float32' or 'bfloat16').
    pixel_mean: per-channel mean of the training images on the [0, 1] pixel
      scale (one value, or one per channel), subtracted before the model;
      it belongs to the data the model was trained on, so the checkpoint
      keeps it. Default 0 (no shift).
    pixel_std: per-channel standard deviation on the same scale (> 0),
      divided out after the mean. Default 1.
    gelu: the MLP's GELU: "tanh" (the tanh approximation; flax's and
      big_vision's default) or "erf" (exact; timm's and Hugging Face's).
    norm_eps: epsilon of every LayerNorm (1e-6 in big_vision and timm, 1e-12
      in Hugging Face's ViT and DeiT).
  """

  image_size: int = 28
  patch_size: int = 4
  channels: int = 1
  num_classes: int = 10
  dim: int = 128
  depth: int = 6
  num_heads: int = 4
  mlp_dim: int = 256
  pool: str = "tok"
  tokenizer: str = "patch"
  distilled: bool = False
  block_heads: tuple[int, ...] = ()
  block_mlp_dims: tuple[int, ...] = ()
  dtype: str = "float32"
  pixel_mean: tuple[float, ...] = (0.0,)
  pixel_std: tuple[float, ...] = (1.0,)
  gelu: Gelu = "tanh"
  norm_eps: float = 1e-6

  def __post_init__(self) -> None:
    for name in ("image_size", "patch_size", "channels", "num_classes", "dim",
                 "depth", "num_heads", "mlp_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
    if self.dim % self.num_heads:
      raise ValueError(
          f"ViTConfig.dim={self.dim} is not divisible by num_heads="
          f"{self.num_heads}; pick num_heads among the divisors of dim")
    if self.image_size % self.patch_size:
      raise ValueError(
          f"ViTConfig.image_size={self.image_size} is not divisible by "
          f"patch_size={self.patch_size}")
    if self.pool not in ("tok", "gap"):
      raise ValueError(f"ViTConfig.pool must be 'tok' or 'gap', got {self.pool!r}")
    if self.tokenizer not in ("patch", "spt"):
      raise ValueError(f"ViTConfig.tokenizer must be 'patch' or 'spt', got {self.tokenizer!r}")
    if self.gelu not in GELUS:
      raise ValueError(f"ViTConfig.gelu must be one of {GELUS}, got {self.gelu!r}")
    if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or \
        not 0 < self.norm_eps < 1:
      raise ValueError(f"ViTConfig.norm_eps must be a number in (0, 1), got {self.norm_eps!r}")
    object.__setattr__(self, "norm_eps", float(self.norm_eps))
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(
          f"ViTConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    # Lists from JSON become tuples so the config stays hashable.
    object.__setattr__(self, "block_heads", tuple(self.block_heads))
    object.__setattr__(self, "block_mlp_dims", tuple(self.block_mlp_dims))
    set_pixel_statistics(self)
    for name, full in (("block_heads", self.num_heads),
                       ("block_mlp_dims", self.mlp_dim)):
      sizes = getattr(self, name)
      if sizes and len(sizes) != self.depth:
        raise ValueError(
            f"ViTConfig.{name} has {len(sizes)} entries, expected depth="
            f"{self.depth} (or none)")
      for i, size in enumerate(sizes):
        if not isinstance(size, int) or not 1 <= size <= full:
          raise ValueError(
              f"ViTConfig.{name}[{i}]={size!r} is outside 1..{full}")

  @property
  def head_dim(self) -> int:
    """Width of one attention head."""
    return self.dim // self.num_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_prefix_tokens(self) -> int:
    """Class token (pool "tok"), plus the distillation token for DeiT."""
    return int(self.pool == "tok") + int(self.distilled)

  @property
  def num_tokens(self) -> int:
    return self.num_patches + self.num_prefix_tokens

  def heads(self, block: int) -> int:
    """Attention heads of encoder block `block`."""
    return self.block_heads[block] if self.block_heads else self.num_heads

  def mlp_width(self, block: int) -> int:
    """MLP hidden width of encoder block `block`."""
    return self.block_mlp_dims[block] if self.block_mlp_dims else self.mlp_dim

  def replace(self, **changes: Any) -> ViTConfig:
    """Returns a copy with `changes` applied (validated again)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict; `ViTConfig.from_dict` inverts it."""
    out = dataclasses.asdict(self)
    out["block_heads"] = list(self.block_heads)
    out["block_mlp_dims"] = list(self.block_mlp_dims)
    out["pixel_mean"] = list(self.pixel_mean)
    out["pixel_std"] = list(self.pixel_std)
    return out

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
    """Builds a config from `to_dict` output; refuses unknown keys."""
    return from_fields(cls, values)


PRESETS: dict[str, ViTConfig] = {
    # Fits the 2-core CPU budget on 28x28 grayscale (Fashion-MNIST): 7x7
    # patches (16 tokens + class token) from shifted patch tokenization (+1.5 pt
    # top-1 over plain patches at the same budget), 0.83 M parameters, 28.6
    # MFLOPs per image.
    "tiny": ViTConfig(image_size=28, patch_size=7, channels=1, num_classes=10,
                      dim=128, depth=6, num_heads=4, mlp_dim=256, tokenizer="spt"),
    # DeiT student of "tiny": half the width, 5 blocks, distillation token,
    # 4.2x fewer FLOPs.
    "tiny-student": ViTConfig(image_size=28, patch_size=7, channels=1, num_classes=10,
                              dim=64, depth=5, num_heads=2, mlp_dim=128, tokenizer="spt",
                              distilled=True),
    # ImageNet-shaped presets for GPU/TPU (ViT-S/16 and ViT-B/16), and the
    # DeiT-Ti/16 student of both.
    "s16": ViTConfig(image_size=224, patch_size=16, channels=3, num_classes=1000,
                     dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "b16": ViTConfig(image_size=224, patch_size=16, channels=3, num_classes=1000,
                     dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "ti16-student": ViTConfig(image_size=224, patch_size=16, channels=3, num_classes=1000,
                              dim=192, depth=12, num_heads=3, mlp_dim=768, distilled=True),
}


def preset(name: str, **overrides: Any) -> ViTConfig:
  """Returns the named preset with `overrides` applied.

  Raises:
    ValueError: `name` is not one of `PRESETS`.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
