"""timm's `VisionTransformer`, in plain torch, with timm's module names.

timm 1.0.31 cannot be imported next to torch 2.13 here (its torchvision build
does not match), so the parity tests build the same modules timm builds for
`vit_*` / `deit_*distilled*` (PatchEmbed conv, class/distillation tokens,
position embedding over all tokens, pre-norm blocks with fused qkv and exact
GELU, final norm, `head` + `head_dist` averaged at inference) and save their
`state_dict` with safetensors, which is exactly what a timm checkpoint holds.
"""

from __future__ import annotations

import json
import pathlib

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

ARCHS = {
    "vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "deit_tiny_distilled_patch16_224": dict(embed_dim=192, depth=12, num_heads=3,
                                            distilled=True),
}


class PatchEmbed(nn.Module):
  def __init__(self, patch: int, in_chans: int, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, d = x.shape
    q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
    y = attn.softmax(-1) @ v
    return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim: int, heads: int, hidden: int):
    super().__init__()
    self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
    self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, hidden)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
  """`forward(normalized NCHW images)` -> logits, as timm's model in eval mode."""

  def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
               num_classes: int = 1000, embed_dim: int = 192, depth: int = 12,
               num_heads: int = 3, mlp_ratio: float = 4.0, distilled: bool = False):
    super().__init__()
    self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
    self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.5)
    self.dist_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.5) if distilled else None
    tokens = (img_size // patch_size) ** 2 + 1 + distilled
    self.pos_embed = nn.Parameter(torch.randn(1, tokens, embed_dim) * 0.5)
    self.blocks = nn.ModuleList(Block(embed_dim, num_heads, int(embed_dim * mlp_ratio))
                                for _ in range(depth))
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.head = nn.Linear(embed_dim, num_classes)
    self.head_dist = nn.Linear(embed_dim, num_classes) if distilled else None
    with torch.no_grad():  # LayerNorm affines too, so every tensor matters
      for p in self.parameters():
        p.add_(torch.randn_like(p) * 0.05)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.patch_embed(x)
    prefix = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
    x = torch.cat([p.expand(x.shape[0], -1, -1) for p in prefix] + [x], dim=1)
    x = x + self.pos_embed
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    if self.head_dist is None:
      return self.head(x[:, 0])
    return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


def save(model: TimmViT, directory: pathlib.Path, architecture: str,
         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> pathlib.Path:
  """Writes `model.safetensors` and a timm hub `config.json`; returns the dir."""
  directory.mkdir(parents=True, exist_ok=True)
  safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                              directory / "model.safetensors")
  (directory / "config.json").write_text(json.dumps({
      "architecture": architecture, "num_classes": model.head.out_features,
      "pretrained_cfg": {"mean": list(mean), "std": list(std)}}))
  return directory


def timm_init(model: TimmViT, seed: int = 0) -> TimmViT:
  """Re-initializes `model` as timm's `VisionTransformer.init_weights` does
  (default mode): Linear weights truncated-normal std 0.02 and zero biases,
  LayerNorms 1 and 0, position embedding and distillation token std 0.02, class
  token std 1e-6; the conv patch embedding keeps torch's default init."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
      elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.normal_(model.cls_token, std=1e-6)
    if model.dist_token is not None:
      nn.init.trunc_normal_(model.dist_token, std=0.02)
  return model
