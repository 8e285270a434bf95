"""ViT / DeiT definitions, presets and weight converters."""

from vitjax.models.config import PRESETS, ViTConfig, preset
from vitjax.models.vit import VisionTransformer

__all__ = ["PRESETS", "ViTConfig", "VisionTransformer", "preset"]
