"""ViT and DeiT in flax.linen, in one readable file.

Parameter names follow big_vision's `vit.py` (`embedding`, `cls`, `dist`,
`pos_embedding`, `Transformer/encoderblock_{i}`, `encoder_norm`, `head`,
`head_dist`), so its checkpoints load with little renaming
(`vitjax.models.convert` also reads timm and Hugging Face ones). Every linear layer
(patch embedding, q/k/v/out, MLP, heads) is a `Linear`, which calls the one
polymorphic `vitjax.leaves.linear`: a kernel may be a plain array or any
compressed leaf, and nothing here changes.

Sown intermediates support distillation: each block's output tokens
(`features`) and attention probabilities (`attention`) in the `intermediates`
collection, recorded only when `apply` is called with it mutable. Every place
where a quantized ViT needs a quantizer (linear inputs, q.kT, softmax, probs.v,
GELU, LayerNorm inputs) is a quantization site (`vitjax.models.sites`), which
also records its input for calibration.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import normalization

from vitjax.models import sites
from vitjax.models.config import ViTConfig

Initializer = Callable[..., jax.Array]


class Linear(nn.Module):
  """`x @ kernel + bias` where `kernel` may be any weight leaf.

  The kernel is declared as an ordinary (in, out) array at init; at apply time
  it is read as it is, so a compressed leaf of another structure (low-rank
  factors, int8 values and scales) passes Flax's shape check untouched.
  """

  features: int
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.is_initializing():
      self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
      self.param("bias", self.bias_init, (self.features,))
    return sites.linear(self, x, self.get_variable("params", "kernel"),
                        self.get_variable("params", "bias"))


class LayerNorm(nn.Module):
  """flax's LayerNorm (same parameters, bit-identical outputs) with a
  quantization site at its input.

  It calls the two functions `nn.LayerNorm` itself calls (flax pinned in
  constraints.txt): a hand-written copy of the same formula ran the training
  step's backward pass 2x slower under XLA CPU.
  """

  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = sites.value(self, "input", x)
    mean, var = normalization._compute_stats(x, (-1,), None)
    return normalization._normalize(self, x, mean, var, (-1,), (-1,), x.dtype, jnp.float32,
                                    self.epsilon, True, True, nn.initializers.zeros,
                                    nn.initializers.ones)


class Attention(nn.Module):
  """Multi-head self-attention with `heads` heads of width `head_dim`."""

  heads: int
  head_dim: int
  dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    width = self.heads * self.head_dim
    split = lambda y: y.reshape(b, t, self.heads, self.head_dim)
    q = split(Linear(width, name="query")(x))
    k = split(Linear(width, name="key")(x))
    v = split(Linear(width, name="value")(x))
    # q.kT: (b, q, h, d) x (b, k, h, d) -> (b, h, q, k)
    logits = sites.einsum(self, "qk", q, k, (((3,), (3,)), ((0, 2), (0, 2))))
    logits = logits / jnp.sqrt(jnp.asarray(self.head_dim, x.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    self.sow("intermediates", "attention", probs)
    probs = sites.value(self, "softmax", probs)
    # probs.v: (b, h, q, k) x (b, k, h, d) -> (b, h, q, d)
    out = sites.einsum(self, "pv", probs, v, (((3,), (1,)), ((0, 1), (0, 2))))
    out = out.transpose(0, 2, 1, 3).reshape(b, t, width)
    return Linear(self.dim, name="out")(out)


class MlpBlock(nn.Module):
  """Two linear layers with GELU (tanh-approximated, or exact) between them."""

  hidden: int
  dim: int
  exact_gelu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Linear(self.hidden, bias_init=nn.initializers.normal(1e-6), name="Dense_0")(x)
    x = sites.value(self, "gelu", nn.gelu(x, approximate=not self.exact_gelu))
    return Linear(self.dim, bias_init=nn.initializers.normal(1e-6), name="Dense_1")(x)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

  heads: int
  head_dim: int
  mlp_dim: int
  norm_eps: float = 1e-6
  exact_gelu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    y = LayerNorm(self.norm_eps, name="LayerNorm_0")(x)
    x = x + Attention(self.heads, self.head_dim, dim,
                      name="MultiHeadDotProductAttention_1")(y)
    y = LayerNorm(self.norm_eps, name="LayerNorm_2")(x)
    x = x + MlpBlock(self.mlp_dim, dim, self.exact_gelu, name="MlpBlock_3")(y)
    self.sow("intermediates", "features", x)
    return x


class Encoder(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    for i in range(cfg.depth):
      x = EncoderBlock(cfg.heads(i), cfg.head_dim, cfg.mlp_width(i), cfg.norm_eps,
                       cfg.gelu == "erf", name=f"encoderblock_{i}")(x)
    return LayerNorm(cfg.norm_eps, name="encoder_norm")(x)


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """(B, H, W, C) images -> (B, H/p * W/p, p*p*C) patches, row-major.

  Each patch is flattened in (row, column, channel) order, the order of a
  big_vision conv kernel of shape (p, p, C, dim) reshaped to (p*p*C, dim).
  """
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def shifted_views(images: jax.Array, shift: int) -> jax.Array:
  """(B, H, W, C) -> (B, H, W, 5C): the image and its four diagonal shifts by
  `shift` pixels (zero-filled), stacked on channels (SPT's input)."""
  _, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
  views = [images]
  for dy, dx in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
    y0, x0 = shift + dy * shift, shift + dx * shift
    views.append(padded[:, y0:y0 + h, x0:x0 + w])
  return jnp.concatenate(views, axis=-1)


def keep_patch_tokens(tokens: jax.Array, keep: jax.Array, prefix: int) -> jax.Array:
  """(B, prefix + N, D) tokens -> (B, prefix + K, D): the prefix tokens, then
  patch tokens `keep[b]` (K indices in 0..N-1) of each image b.

  Raises:
    ValueError: `keep` is not (B, K) with 1 <= K <= N.
  """
  b, n = tokens.shape[0], tokens.shape[1] - prefix
  if keep.ndim != 2 or keep.shape[0] != b or not 1 <= keep.shape[1] <= n:
    raise ValueError(f"keep has shape {keep.shape}, expected ({b}, K) with K in 1..{n} "
                     "(indices of the patch tokens to keep)")
  patches = jnp.take_along_axis(tokens[:, prefix:], keep[:, :, None], axis=1)
  return jnp.concatenate([tokens[:, :prefix], patches], axis=1)


class VisionTransformer(nn.Module):
  """ViT (class token or mean pooling) or DeiT (plus a distillation token and
  a second head).

  Token order: [cls (pool "tok")] [dist (DeiT)] patches.

  `__call__(images, heads="mean")` returns logits of shape (B, classes); for a
  DeiT, `heads="mean"` averages the two heads (inference) and `heads="both"`
  returns `(cls_logits, dist_logits)` (training with hard distillation).
  `keep`, (B, K) indices into the patch tokens, runs the encoder on those K
  patch tokens of each image (and the prefix tokens) only: patch dropout
  (Liu et al. 2022), a training-time regularizer that also saves compute.
  """

  config: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array, heads: str = "mean",
               keep: jax.Array | None = None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    images = jnp.asarray(images, dtype)  # numpy input too (AQT needs JAX arrays)
    if cfg.tokenizer == "spt":
      patches = patchify(shifted_views(images, cfg.patch_size // 2), cfg.patch_size)
      patches = LayerNorm(cfg.norm_eps, name="embedding_norm")(patches)
    else:
      patches = patchify(images, cfg.patch_size)
    x = Linear(cfg.dim, name="embedding")(patches)
    b = x.shape[0]
    prefix = []
    if cfg.pool == "tok":
      prefix.append(self.param("cls", nn.initializers.zeros, (1, 1, cfg.dim)))
    if cfg.distilled:
      prefix.append(self.param("dist", nn.initializers.zeros, (1, 1, cfg.dim)))
    prefix = [jnp.broadcast_to(p.astype(dtype), (b, 1, cfg.dim)) for p in prefix]
    x = jnp.concatenate(prefix + [x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (1, cfg.num_tokens, cfg.dim))
    x = x + pos.astype(dtype)
    if keep is not None:
      x = keep_patch_tokens(x, keep, cfg.num_prefix_tokens)
    x = Encoder(cfg, name="Transformer")(x)
    zero = nn.initializers.zeros
    pooled = x[:, 0] if cfg.pool == "tok" else x[:, cfg.num_prefix_tokens:].mean(axis=1)
    logits = Linear(cfg.num_classes, kernel_init=zero, name="head")(pooled)
    if heads not in ("mean", "both"):
      raise ValueError(f"heads must be 'mean' or 'both', got {heads!r}")
    if not cfg.distilled:
      if heads == "both":
        raise ValueError("heads='both' needs a DeiT (distilled=True): this model has one "
                         "head")
      return logits.astype(jnp.float32)
    dist_token = x[:, cfg.num_prefix_tokens - 1]
    dist = Linear(cfg.num_classes, kernel_init=zero, name="head_dist")(dist_token)
    logits, dist = logits.astype(jnp.float32), dist.astype(jnp.float32)
    if heads == "both":
      return logits, dist
    return (logits + dist) / 2
