"""The PyTorch peer of a vitjax ViT: the same function, written the way timm
writes its `VisionTransformer`, loaded from a vitjax model's weights.

`TorchViT.from_vitjax(model)` copies every tensor (Linear kernels transposed
to torch's [out, in]; the patch embedding's (p*p*C, dim) matrix reshaped to a
conv kernel (dim, C, p, p)), so the two compute the same logits
(tests/test_peer.py checks it) and a speed comparison compares the same
arithmetic. Blocks use timm's formulation: fused qkv Linear,
`F.scaled_dot_product_attention`, the config's GELU and LayerNorm epsilon.
The whole inference path matches vitjax's `evaluate` one: uint8 NHWC pixels
in, normalization, forward, argmax.

torch is a benchmark/test extra (`pip install torch==2.13.0`, the CPU build).
"""

from __future__ import annotations

import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitjax import model as model_lib


def _t(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32))


def _linear(p: dict) -> nn.Linear:
  kernel = np.asarray(p["kernel"], np.float32)
  layer = nn.Linear(*kernel.shape)
  layer.weight.data = _t(kernel.T).contiguous()
  layer.bias.data = _t(p["bias"])
  return layer


def _layernorm(p: dict, eps: float) -> nn.LayerNorm:
  norm = nn.LayerNorm(len(p["scale"]), eps=eps)
  norm.weight.data, norm.bias.data = _t(p["scale"]), _t(p["bias"])
  return norm


class Block(nn.Module):
  """timm's pre-norm block: fused qkv, SDPA, GELU MLP."""

  def __init__(self, p: dict, heads: int, eps: float, gelu: str):
    super().__init__()
    att, mlp = p["MultiHeadDotProductAttention_1"], p["MlpBlock_3"]
    self.heads, self.gelu = heads, "none" if gelu == "erf" else "tanh"
    self.norm1 = _layernorm(p["LayerNorm_0"], eps)
    self.norm2 = _layernorm(p["LayerNorm_2"], eps)
    q, k, v = (_linear(att[n]) for n in ("query", "key", "value"))
    self.qkv = nn.Linear(q.in_features, 3 * q.out_features)
    self.qkv.weight.data = torch.cat([q.weight.data, k.weight.data, v.weight.data])
    self.qkv.bias.data = torch.cat([q.bias.data, k.bias.data, v.bias.data])
    self.proj = _linear(att["out"])
    self.fc1, self.fc2 = _linear(mlp["Dense_0"]), _linear(mlp["Dense_1"])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate=self.gelu))


class TorchViT(nn.Module):
  """A ViT/DeiT with a vitjax model's weights (plain or shifted-patch
  tokenizer, class token or mean pooling, one or two heads).

  `forward(uint8 images (B, H, W, C))` returns the predicted classes, as
  vitjax's inference path does; `logits(images)` the logits.
  """

  def __init__(self, model: model_lib.Model):
    super().__init__()
    cfg, p = model.config, model.params
    if model.sites:
      raise ValueError("TorchViT copies fp32 weights only; this model has quantization sites")
    leaves = jax.tree_util.tree_leaves(p, is_leaf=lambda x: not isinstance(x, dict))
    if not all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves):
      raise ValueError("TorchViT copies fp32 weights only; this model has compressed leaves")
    if cfg.image_size % cfg.patch_size:
      raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size "
                       f"{cfg.patch_size}")
    self.config = cfg
    c_in = cfg.channels * (5 if cfg.tokenizer == "spt" else 1)
    emb = np.asarray(p["embedding"]["kernel"], np.float32)  # (p*p*c_in, dim), (row, col, ch)
    self.embed = nn.Conv2d(c_in, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
    conv = emb.reshape(cfg.patch_size, cfg.patch_size, c_in, cfg.dim).transpose(3, 2, 0, 1)
    self.embed.weight.data = _t(conv).contiguous()
    self.embed.bias.data = _t(p["embedding"]["bias"])
    self.embed_norm = (_layernorm(p["embedding_norm"], cfg.norm_eps)
                       if cfg.tokenizer == "spt" else None)
    prefix = [_t(p[n]) for n in ("cls", "dist") if n in p]
    self.prefix = nn.Parameter(torch.cat(prefix, dim=1)) if prefix else None
    self.pos = nn.Parameter(_t(p["pos_embedding"]))
    enc = p["Transformer"]
    self.blocks = nn.ModuleList(Block(enc[f"encoderblock_{i}"], cfg.heads(i), cfg.norm_eps,
                                      cfg.gelu) for i in range(cfg.depth))
    self.norm = _layernorm(enc["encoder_norm"], cfg.norm_eps)
    self.head = _linear(p["head"])
    self.head_dist = _linear(p["head_dist"]) if cfg.distilled else None
    self.register_buffer("mean", _t(cfg.pixel_mean).reshape(1, -1, 1, 1))
    self.register_buffer("std", _t(cfg.pixel_std).reshape(1, -1, 1, 1))

  def _shifted(self, x: torch.Tensor) -> torch.Tensor:
    s = self.config.patch_size // 2
    h, w = x.shape[-2:]
    padded = F.pad(x, (s, s, s, s))
    views = [x] + [padded[:, :, s + dy * s:s + dy * s + h, s + dx * s:s + dx * s + w]
                   for dy, dx in ((-1, -1), (-1, 1), (1, -1), (1, 1))]
    return torch.cat(views, dim=1)

  def logits(self, images: torch.Tensor) -> torch.Tensor:
    cfg = self.config
    x = images.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[1] == 1 and cfg.channels == 3:
      x = x.repeat(1, 3, 1, 1)
    x = (x - self.mean) / self.std
    if x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
      raise ValueError(f"images are {tuple(x.shape[-2:])}, this model takes "
                       f"{cfg.image_size}x{cfg.image_size}")
    if self.embed_norm is not None:
      x = self._shifted(x)
      b, c, h, w = x.shape
      pp = cfg.patch_size
      patches = x.reshape(b, c, h // pp, pp, w // pp, pp).permute(0, 2, 4, 3, 5, 1)
      patches = self.embed_norm(patches.reshape(b, (h // pp) * (w // pp), -1))
      # the conv kernel flattened back in (row, col, channel) order
      kernel = self.embed.weight.permute(0, 2, 3, 1).reshape(cfg.dim, -1)
      x = F.linear(patches, kernel, self.embed.bias)
    else:
      x = self.embed(x).flatten(2).transpose(1, 2)
    if self.prefix is not None:
      x = torch.cat([self.prefix.expand(x.shape[0], -1, -1), x], dim=1)
    x = x + self.pos
    for block in self.blocks:
      x = block(x)
    x = self.norm(x)
    n_prefix = cfg.num_prefix_tokens
    pooled = x[:, 0] if cfg.pool == "tok" else x[:, n_prefix:].mean(dim=1)
    out = self.head(pooled)
    if self.head_dist is not None:
      out = (out + self.head_dist(x[:, n_prefix - 1])) / 2
    return out

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    return self.logits(images).argmax(-1)
