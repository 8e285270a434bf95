"""The architectures a `Model` can hold: a ViT/DeiT or the ResNet teacher.

`module_of` builds the Flax module of a config, `config_from_dict` reads a
saved config of either kind (a ViT config has no "arch" key, as before the
CNN existed), and `require_vit` is the one refusal every ViT-only path uses.
"""

from __future__ import annotations

from typing import Any, Union

import flax.linen as nn

from vitjax.models import cnn
from vitjax.models.cnn import CNNConfig, ResNet
from vitjax.models.config import ViTConfig
from vitjax.models.vit import VisionTransformer

Config = Union[ViTConfig, CNNConfig]
ARCHS = ("vit", cnn.ARCH)


def module_of(config: Config) -> nn.Module:
  """The Flax module of `config`."""
  if isinstance(config, CNNConfig):
    return ResNet(config)
  if isinstance(config, ViTConfig):
    return VisionTransformer(config)
  raise TypeError(f"config must be a ViTConfig or CNNConfig, got {type(config).__name__}")


def arch_of(config: Config) -> str:
  """"vit" or "cnn"."""
  return cnn.ARCH if isinstance(config, CNNConfig) else "vit"


def config_from_dict(values: dict[str, Any]) -> Config:
  """A config from `to_dict` output of either kind.

  Raises:
    ValueError: an unknown "arch", or fields the config does not have.
  """
  arch = values.get("arch", "vit")
  if arch == cnn.ARCH:
    return CNNConfig.from_dict(values)
  if arch != "vit":
    raise ValueError(f"unknown model arch {arch!r}; known: {list(ARCHS)}")
  return ViTConfig.from_dict({k: v for k, v in values.items() if k != "arch"})


def require_vit(config: Config, what: str) -> ViTConfig:
  """Returns `config` if it is a ViT's.

  Raises:
    ValueError: naming `what` needs a ViT and that the model is a CNN.
  """
  if not isinstance(config, ViTConfig):
    raise ValueError(f"{what} needs a ViT/DeiT; this model is a {arch_of(config)} "
                     f"({type(config).__name__}). CNNs are teachers in vitjax: train and "
                     "distill from them, export them, but compress the ViT student")
  return config
