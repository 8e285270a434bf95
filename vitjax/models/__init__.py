"""ViT / DeiT definitions, their config and presets, and input preprocessing."""

from vitjax.models.config import PRESETS, ViTConfig, preset
from vitjax.models.vit import VisionTransformer

__all__ = ["PRESETS", "ViTConfig", "VisionTransformer", "preset"]
