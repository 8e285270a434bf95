"""ViTs trained elsewhere into vitjax: timm, Hugging Face and big_vision.

`load(path)` reads a checkpoint file (or a Hugging Face / timm model
directory), infers the config from the tensor names and shapes, converts every
weight layout explicitly, and returns a vitjax `Model` computing the same
function (tests/test_convert.py: logits within 1e-4 of the source model).

| source | file | names |
|---|---|---|
| timm `vit_*`, `deit_*` (distilled too) | `.safetensors` | `blocks.{i}.attn.qkv`, `head_dist`, ... |
| Hugging Face `ViTForImageClassification`, `DeiTForImageClassificationWithTeacher` | `model.safetensors` (+ `config.json`) | `vit.encoder.layer.{i}...`, or transformers 5's in-memory `vit.layers.{i}...` |
| big_vision / google-research ViT | `.npz` | `Transformer/encoderblock_{i}/...`, stacked `encoderblock` (scan), and the old `posembed_input` names |

Layouts: a torch Linear weight [out, in] becomes a kernel [in, out]; a conv
patch embedding OIHW (or big_vision's HWIO) becomes the (p*p*C, dim) matrix of
vitjax's (row, column, channel) patch order; timm's fused qkv is split into
query/key/value; big_vision's per-head attention kernels are flattened. A
position embedding without an entry for the class token (big_vision) gets a
zero one; an old big_vision checkpoint whose position embedding covers the
class token has that entry folded into the class token, as big_vision does.

What the tensors do not say (attention heads for timm, LayerNorm epsilon,
GELU form, pixel statistics) comes from the model directory's `config.json`
(and `preprocessor_config.json`) when there is one, from the known defaults of
the source library otherwise, and from `overrides` above both; every such
assumption is listed in `Imported.notes`.

Files that need unpickling (`.bin`, `.pth`, `.pt`, `.ckpt`, `.pkl`) are
refused with a message saying how to convert them to safetensors; `.npz` is
read with `allow_pickle=False`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import typing
import zipfile
from typing import Any, Callable, Literal

import ml_dtypes
import numpy as np

from vitjax import model as model_lib
from vitjax.models.config import ViTConfig

Format = Literal["timm", "hf", "big_vision"]
FORMATS: tuple[str, ...] = typing.get_args(Format)
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")
# timm's and Hugging Face's default ImageNet statistics.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
# timm architecture size names -> attention heads (vision_transformer.py).
TIMM_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16,
              "giant": 16, "gigantic": 16}


class ConversionError(ValueError):
  """A source checkpoint cannot be converted; the message names the file and
  the offending tensor."""


@dataclasses.dataclass(frozen=True)
class Imported:
  """A converted model, the format it came from, and what was assumed."""

  model: model_lib.Model
  format: str
  notes: tuple[str, ...]


# ------------------------------------------------------------------ reading


def read_tensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Name -> numpy array of a `.safetensors` or `.npz` file (float16 and
  bfloat16 are widened to float32).

  Raises:
    ConversionError: a pickle-based file, an unknown suffix, a truncated or
      malformed file.
  """
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  if suffix in PICKLE_SUFFIXES:
    raise ConversionError(
        f"{path}: {suffix} checkpoints are Python pickles, which vitjax never loads (a "
        "pickle can run arbitrary code). Convert it once where you trust it: "
        "`import torch, safetensors.torch; sd = torch.load(path, weights_only=True); "
        "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "
        "'model.safetensors')` (timm: `model.state_dict()`; Hugging Face: "
        "`model.save_pretrained(dir, safe_serialization=True)`)")
  if not path.is_file():
    raise ConversionError(f"{path} does not exist or is not a file")
  if suffix == ".safetensors":
    return _read_safetensors(path)
  if suffix == ".npz":
    return _read_npz(path)
  raise ConversionError(f"{path}: unknown checkpoint suffix {suffix!r}; vitjax reads "
                        ".safetensors (timm, Hugging Face) and .npz (big_vision)")


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """safetensors' own header format (8-byte length, JSON, raw little-endian
  data), read so that a truncated file names the tensor it cuts."""
  dtypes = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16,
            "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  data = path.read_bytes()
  if len(data) < 8:
    raise ConversionError(f"{path} is truncated: {len(data)} bytes, not even a header")
  size = int.from_bytes(data[:8], "little")
  if size > len(data) - 8:
    raise ConversionError(f"{path} is truncated or not a safetensors file: its header "
                          f"says {size} bytes of metadata, the file has {len(data) - 8}")
  try:
    header = json.loads(data[8:8 + size])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path} is not a safetensors file: bad header ({e})") from e
  if not isinstance(header, dict):
    raise ConversionError(f"{path} is not a safetensors file: its header is not a mapping")
  body = memoryview(data)[8 + size:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = np.dtype(dtypes[info["dtype"]])
      start, end = (int(v) for v in info["data_offsets"])
      shape = tuple(int(d) for d in info["shape"])
    except (KeyError, TypeError, ValueError) as e:
      raise ConversionError(f"{path}: tensor {name!r} has a malformed header entry "
                            f"{info!r} (dtypes read: {sorted(dtypes)})") from e
    if end > len(body):
      raise ConversionError(f"{path} is truncated: tensor {name!r} ends at byte {end} "
                            f"of the data, the file holds {len(body)}")
    if end - start != dtype.itemsize * math.prod(shape):
      raise ConversionError(f"{path}: tensor {name!r} spans {end - start} bytes, its "
                            f"shape {shape} and dtype {info['dtype']} need "
                            f"{dtype.itemsize * math.prod(shape)}")
    array = np.frombuffer(body[start:end], dtype.newbyteorder("<")).reshape(shape)
    out[name] = array.astype(np.float32) if dtype.kind == "f" or dtype == \
        ml_dtypes.bfloat16 else array.copy()
  return out


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as npz:
      return {k: np.asarray(npz[k]) for k in npz.files}
  except ValueError as e:  # object arrays need pickle
    raise ConversionError(f"{path} holds object arrays, which need unpickling; save "
                          "plain numeric arrays (np.savez of a flat name -> array dict)"
                          ) from e
  except (zipfile.BadZipFile, EOFError, OSError) as e:
    raise ConversionError(f"{path} is truncated or not an .npz file ({e})") from e


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path} is not valid JSON ({e})") from e
  return value if isinstance(value, dict) else {}


# ------------------------------------------------------------- tensor tools


class _Tensors:
  """The source tensors, handing each out once, so that what is left at the
  end is reported as unexpected."""

  def __init__(self, tensors: dict[str, np.ndarray], where: pathlib.Path):
    self.tensors, self.where, self.used = tensors, where, set()
    self.sources: dict[str, str] = {}  # vitjax path -> source tensor name

  def has(self, name: str) -> bool:
    return name in self.tensors

  def take(self, name: str, ndim: int | None = None) -> np.ndarray:
    if name not in self.tensors:
      raise ConversionError(f"{self.where}: tensor {name!r} is missing")
    value = np.asarray(self.tensors[name], np.float32)
    if ndim is not None and value.ndim != ndim:
      raise ConversionError(f"{self.where}: tensor {name!r} has shape {value.shape}; "
                            f"expected {ndim} dimensions")
    self.used.add(name)
    return value

  def check_all_used(self) -> None:
    extra = sorted(set(self.tensors) - self.used)
    if extra:
      raise ConversionError(
          f"{self.where}: unexpected tensors {extra[:6]}{' ...' if len(extra) > 6 else ''}"
          f" ({len(extra)} in all): this architecture has parts vitjax's ViT does not "
          "(e.g. layer scale, register tokens, a pre-logits layer, fc_norm pooling)")


def _linear(t: _Tensors, weight: str, bias: str, dest: str,
            bias_optional: bool = False) -> dict[str, np.ndarray]:
  """A torch Linear ([out, in] weight) as a vitjax kernel [in, out] + bias
  (zero when `bias_optional` and the file has none, as qkv_bias=False saves)."""
  w = t.take(weight, 2)
  b = np.zeros(w.shape[0], np.float32) if bias_optional and not t.has(bias) else \
      t.take(bias, 1)
  t.sources[f"{dest}/kernel"], t.sources[f"{dest}/bias"] = weight, bias
  return {"kernel": np.ascontiguousarray(w.T), "bias": b}


def _norm(t: _Tensors, prefix: str, dest: str, scale: str = "weight") -> dict:
  t.sources[f"{dest}/scale"], t.sources[f"{dest}/bias"] = f"{prefix}.{scale}", \
      f"{prefix}.bias"
  return {"scale": t.take(f"{prefix}.{scale}", 1), "bias": t.take(f"{prefix}.bias", 1)}


def conv_to_patch_kernel(weight: np.ndarray) -> np.ndarray:
  """A torch conv patch embedding (dim, C, p, p) -> vitjax's (p*p*C, dim)
  kernel, flattened in (row, column, channel) order."""
  dim, c, p, q = weight.shape
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0).reshape(p * q * c, dim))


def _count_blocks(names: Any, pattern: str) -> int:
  found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
  if not found:
    return 0
  if found != set(range(max(found) + 1)):
    raise ConversionError(f"blocks {sorted(set(range(max(found) + 1)) - found)} are "
                          "missing (tensors of every block 0..depth-1 are needed)")
  return max(found) + 1


def _grid(tokens: int, prefix: int, name: str, where: pathlib.Path) -> int:
  side = math.isqrt(tokens - prefix) if tokens > prefix else 0
  if side < 1 or side * side != tokens - prefix:
    raise ConversionError(f"{where}: tensor {name!r} has {tokens} positions, not "
                          f"{prefix} prefix token(s) plus a square grid of patches")
  return side


# ------------------------------------------------------------------- timm


def _timm(t: _Tensors, where: pathlib.Path, meta: dict, notes: list[str]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  for feature, label in (("fc_norm.weight", "fc_norm (mean pooling with a norm after it)"),
                         ("reg_token", "register tokens"), ("norm_pre.weight", "norm_pre"),
                         ("attn_pool.latent", "attention pooling"),
                         ("blocks.0.ls1.gamma", "layer scale"),
                         ("blocks.0.attn.q_norm.weight", "q/k norm"),
                         ("pre_logits.fc.weight", "a pre-logits layer")):
    if t.has(feature):
      raise ConversionError(f"{where}: unsupported timm architecture: tensor {feature!r} "
                            f"means {label}, which vitjax's ViT does not have")
  depth = _count_blocks(t.tensors, r"blocks\.(\d+)\.")
  if not depth:
    raise ConversionError(f"{where}: no tensors 'blocks.N...': not a timm ViT")
  qkv = t.take("blocks.0.attn.qkv.weight", 2)
  dim = qkv.shape[1]
  distilled = t.has("dist_token")
  cls = t.has("cls_token")
  if not cls:
    raise ConversionError(f"{where}: tensor 'cls_token' is missing: timm ViTs without a "
                          "class token pool with fc_norm, which vitjax does not have")
  pos = t.take("pos_embed", 3)
  prefix = 1 + distilled
  patch_w = t.take("patch_embed.proj.weight", 4)
  grid = _grid(pos.shape[1], prefix, "pos_embed", where)
  arch = str(meta.get("architecture", ""))
  size = next((s for s in TIMM_HEADS if f"_{s}_" in f"_{arch.split('_', 1)[-1]}_"), None)
  heads = TIMM_HEADS[size] if size else None
  if heads is None:
    heads = max(1, dim // 64)
    notes.append(f"num_heads={heads} assumed (head width 64, timm's convention for "
                 f"width {dim}); pass num_heads= to override")
  cfg = meta.get("pretrained_cfg", {}) if isinstance(meta.get("pretrained_cfg"), dict) else {}
  mean, std = cfg.get("mean"), cfg.get("std")
  if mean is None or std is None:
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if arch.startswith("deit") or distilled \
        else (INCEPTION_MEAN, INCEPTION_STD)
    notes.append(f"pixel statistics not in the checkpoint: timm's default for this "
                 f"family assumed (mean {mean}, std {std}); pass pixel_mean=/pixel_std=")
  config = dict(image_size=grid * patch_w.shape[-1], patch_size=patch_w.shape[-1],
                channels=patch_w.shape[1], num_classes=t.take("head.weight", 2).shape[0],
                dim=dim, depth=depth, num_heads=heads,
                mlp_dim=t.take("blocks.0.mlp.fc1.weight", 2).shape[0],
                pool="tok", distilled=distilled, gelu="erf", norm_eps=1e-6,
                pixel_mean=tuple(mean), pixel_std=tuple(std))
  params: dict[str, Any] = {
      "embedding": {"kernel": conv_to_patch_kernel(patch_w),
                    "bias": t.take("patch_embed.proj.bias", 1)},
      "cls": t.take("cls_token", 3), "pos_embedding": pos}
  t.sources.update({"embedding/kernel": "patch_embed.proj.weight",
                    "embedding/bias": "patch_embed.proj.bias", "cls": "cls_token",
                    "pos_embedding": "pos_embed"})
  if distilled:
    params["dist"] = t.take("dist_token", 3)
    t.sources["dist"] = "dist_token"
  blocks = {}
  for i in range(depth):
    b, dest = f"blocks.{i}", f"Transformer/encoderblock_{i}"
    w = t.take(f"{b}.attn.qkv.weight", 2)
    if w.shape[0] % 3:
      raise ConversionError(f"{where}: tensor '{b}.attn.qkv.weight' has shape {w.shape}; "
                            "a fused qkv weight has 3 x width rows")
    bias = t.take(f"{b}.attn.qkv.bias", 1) if t.has(f"{b}.attn.qkv.bias") else \
        np.zeros(w.shape[0], np.float32)
    attention = {}
    for j, name in enumerate(("query", "key", "value")):
      rows = slice(j * w.shape[0] // 3, (j + 1) * w.shape[0] // 3)
      attention[name] = {"kernel": np.ascontiguousarray(w[rows].T), "bias": bias[rows]}
      t.sources[f"{dest}/MultiHeadDotProductAttention_1/{name}/kernel"] = \
          f"{b}.attn.qkv.weight"
    attention["out"] = _linear(t, f"{b}.attn.proj.weight", f"{b}.attn.proj.bias",
                               f"{dest}/MultiHeadDotProductAttention_1/out")
    blocks[f"encoderblock_{i}"] = {
        "LayerNorm_0": _norm(t, f"{b}.norm1", f"{dest}/LayerNorm_0"),
        "MultiHeadDotProductAttention_1": attention,
        "LayerNorm_2": _norm(t, f"{b}.norm2", f"{dest}/LayerNorm_2"),
        "MlpBlock_3": {
            "Dense_0": _linear(t, f"{b}.mlp.fc1.weight", f"{b}.mlp.fc1.bias",
                               f"{dest}/MlpBlock_3/Dense_0"),
            "Dense_1": _linear(t, f"{b}.mlp.fc2.weight", f"{b}.mlp.fc2.bias",
                               f"{dest}/MlpBlock_3/Dense_1")}}
  blocks["encoder_norm"] = _norm(t, "norm", "Transformer/encoder_norm")
  params["Transformer"] = blocks
  params["head"] = _linear(t, "head.weight", "head.bias", "head")
  if distilled:
    params["head_dist"] = _linear(t, "head_dist.weight", "head_dist.bias", "head_dist")
  return config, params


# ---------------------------------------------------------- Hugging Face


_HF_BLOCK = {  # (hub name, transformers 5 in-memory name) under the layer prefix
    "query": ("attention.attention.query", "attention.q_proj"),
    "key": ("attention.attention.key", "attention.k_proj"),
    "value": ("attention.attention.value", "attention.v_proj"),
    "out": ("attention.output.dense", "attention.o_proj"),
    "Dense_0": ("intermediate.dense", "mlp.fc1"),
    "Dense_1": ("output.dense", "mlp.fc2"),
}


def _hf(t: _Tensors, where: pathlib.Path, meta: dict, pre: dict, notes: list[str]
        ) -> tuple[dict[str, Any], dict[str, Any]]:
  root = "deit" if t.has("deit.embeddings.cls_token") else "vit"
  emb = f"{root}.embeddings"
  if t.has(f"{root}.pooler.dense.weight"):
    raise ConversionError(f"{where}: unsupported: tensor '{root}.pooler.dense.weight' is a "
                          "pooler (ViTModel with add_pooling_layer=True), which vitjax's "
                          "ViT does not have; export ViTForImageClassification instead")
  if t.has(f"{emb}.mask_token"):
    t.take(f"{emb}.mask_token")  # only used for masked-image modeling, not for logits
    notes.append(f"tensor '{emb}.mask_token' dropped (masked-image modeling only)")
  hub = _count_blocks(t.tensors, rf"{root}\.encoder\.layer\.(\d+)\.")
  layer = f"{root}.encoder.layer" if hub else f"{root}.layers"
  depth = hub or _count_blocks(t.tensors, rf"{root}\.layers\.(\d+)\.")
  if not depth:
    raise ConversionError(f"{where}: no tensors '{root}.encoder.layer.N...': not a "
                          "Hugging Face ViT/DeiT")
  style = 0 if hub else 1
  distilled = t.has(f"{emb}.distillation_token")
  patch_w = t.take(f"{emb}.patch_embeddings.projection.weight", 4)
  pos = t.take(f"{emb}.position_embeddings", 3)
  prefix = 1 + distilled
  grid = _grid(pos.shape[1], prefix, f"{emb}.position_embeddings", where)
  dim = patch_w.shape[0]
  heads = meta.get("num_attention_heads")
  if heads is None:
    heads = max(1, dim // 64)
    notes.append(f"no config.json: num_attention_heads={heads} assumed (head width 64); "
                 "pass num_heads= to override")
  if not meta:
    notes.append("no config.json: Hugging Face defaults assumed (exact GELU, "
                 "layer_norm_eps 1e-12)")
  act = meta.get("hidden_act", "gelu")
  gelus = {"gelu": "erf", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}
  if act not in gelus:
    raise ConversionError(f"{where}: config.json hidden_act={act!r} is not supported; "
                          f"vitjax's MLP uses one of {sorted(gelus)}")
  mean, std = pre.get("image_mean"), pre.get("image_std")
  if mean is None or std is None:
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if root == "deit" else \
        (INCEPTION_MEAN, INCEPTION_STD)
    notes.append(f"no preprocessor_config.json: the image processor's default "
                 f"statistics assumed (mean {mean}, std {std}); pass pixel_mean=/pixel_std=")
  if distilled and t.has("classifier.weight"):
    raise ConversionError(
        f"{where}: unsupported: tensor 'classifier.weight' with a distillation token is "
        "DeiTForImageClassification (one head on the class token), which vitjax's DeiT "
        "(two heads, averaged) does not compute; save DeiTForImageClassificationWithTeacher")
  head = "cls_classifier" if distilled else "classifier"
  config = dict(image_size=grid * patch_w.shape[-1], patch_size=patch_w.shape[-1],
                channels=patch_w.shape[1],
                num_classes=t.take(f"{head}.weight", 2).shape[0],
                dim=dim, depth=depth, num_heads=int(heads),
                mlp_dim=t.take(f"{layer}.0.{_HF_BLOCK['Dense_0'][style]}.weight",
                               2).shape[0],
                pool="tok", distilled=distilled, gelu=gelus[act],
                norm_eps=float(meta.get("layer_norm_eps", 1e-12)),
                pixel_mean=tuple(mean), pixel_std=tuple(std))
  params: dict[str, Any] = {
      "embedding": {"kernel": conv_to_patch_kernel(patch_w),
                    "bias": t.take(f"{emb}.patch_embeddings.projection.bias", 1)},
      "cls": t.take(f"{emb}.cls_token", 3), "pos_embedding": pos}
  t.sources.update({"embedding/kernel": f"{emb}.patch_embeddings.projection.weight",
                    "cls": f"{emb}.cls_token", "pos_embedding": f"{emb}.position_embeddings"})
  if distilled:
    params["dist"] = t.take(f"{emb}.distillation_token", 3)
    t.sources["dist"] = f"{emb}.distillation_token"
  blocks = {}
  for i in range(depth):
    b, dest = f"{layer}.{i}", f"Transformer/encoderblock_{i}"
    lin = {k: _linear(t, f"{b}.{v[style]}.weight", f"{b}.{v[style]}.bias", f"{dest}/{k}",
                      bias_optional=k in ("query", "key", "value") and
                      not meta.get("qkv_bias", True)) for k, v in _HF_BLOCK.items()}
    blocks[f"encoderblock_{i}"] = {
        "LayerNorm_0": _norm(t, f"{b}.layernorm_before", f"{dest}/LayerNorm_0"),
        "MultiHeadDotProductAttention_1": {k: lin[k] for k in ("query", "key", "value",
                                                               "out")},
        "LayerNorm_2": _norm(t, f"{b}.layernorm_after", f"{dest}/LayerNorm_2"),
        "MlpBlock_3": {"Dense_0": lin["Dense_0"], "Dense_1": lin["Dense_1"]}}
  blocks["encoder_norm"] = _norm(t, f"{root}.layernorm", "Transformer/encoder_norm")
  params["Transformer"] = blocks
  params["head"] = _linear(t, f"{head}.weight", f"{head}.bias", "head")
  if distilled:
    params["head_dist"] = _linear(t, "distillation_classifier.weight",
                                  "distillation_classifier.bias", "head_dist")
  return config, params


# ------------------------------------------------------------- big_vision


def _big_vision(t: _Tensors, where: pathlib.Path, notes: list[str]
                ) -> tuple[dict[str, Any], dict[str, Any]]:
  for feature, label in (("pre_logits/kernel", "a pre-logits layer"),
                         ("MAPHead_0/probe", "MAP-head pooling")):
    if t.has(feature):
      raise ConversionError(f"{where}: unsupported big_vision architecture: tensor "
                            f"{feature!r} means {label}, which vitjax's ViT does not have")
  scan = any(n.startswith("Transformer/encoderblock/") for n in t.tensors)
  depth = t.tensors["Transformer/encoderblock/LayerNorm_0/scale"].shape[0] if scan and \
      t.has("Transformer/encoderblock/LayerNorm_0/scale") else \
      _count_blocks(t.tensors, r"Transformer/encoderblock_(\d+)/")
  if not depth:
    raise ConversionError(f"{where}: no tensors 'Transformer/encoderblock_N/...': not a "
                          "big_vision ViT")
  first = "Transformer/encoderblock/" if scan else "Transformer/encoderblock_0/"
  children = sorted({n[len(first):].split("/")[0] for n in t.tensors if n.startswith(first)})
  by_kind = {kind: sorted((c for c in children if c.startswith(kind + "_")),
                          key=lambda c: int(c.rsplit("_", 1)[1]))
             for kind in ("LayerNorm", "MultiHeadDotProductAttention", "MlpBlock")}
  if [len(v) for v in by_kind.values()] != [2, 1, 1]:
    raise ConversionError(f"{where}: block 0 holds modules {children}; a ViT block has "
                          "two LayerNorm_*, one MultiHeadDotProductAttention_* and one "
                          "MlpBlock_*")
  ln0, ln2 = by_kind["LayerNorm"]
  att, mlp = by_kind["MultiHeadDotProductAttention"][0], by_kind["MlpBlock"][0]
  if t.has("Transformer/posembed_input/pos_embedding"):
    pos_name = "Transformer/posembed_input/pos_embedding"
  elif t.has("Transformer/pos_embedding"):
    pos_name = "Transformer/pos_embedding"
  else:
    pos_name = "pos_embedding"
  pos = t.take(pos_name, 3)
  cls = t.take("cls", 3) if t.has("cls") else None
  patches = pos.shape[1]
  if cls is not None and math.isqrt(patches - 1) ** 2 + 1 == patches:
    # Old layout: the class token's position embedding is the first entry;
    # big_vision folds it into the class token.
    cls, pos = cls + pos[:, :1], pos[:, 1:]
    notes.append(f"{pos_name}: the class token's position entry was folded into 'cls'")
  grid = _grid(pos.shape[1], 0, pos_name, where)
  kernel = t.take("embedding/kernel", 4)  # (p, p, C, dim)
  p, _, c, dim = kernel.shape
  q_name = f"{first}{att}/query/kernel"
  if not t.has(q_name):
    raise ConversionError(f"{where}: tensor {q_name!r} is missing")
  heads = t.tensors[q_name].shape[-2]

  def take_block(name: str, i: int) -> np.ndarray:
    full = f"{first}{name}"
    value = t.take(full)
    if scan:
      if value.shape[0] != depth:
        raise ConversionError(f"{where}: tensor {full!r} has {value.shape[0]} stacked "
                              f"blocks, 'LayerNorm_0/scale' has {depth}")
      return value[i]
    return value

  params: dict[str, Any] = {
      "embedding": {"kernel": np.ascontiguousarray(kernel.reshape(p * p * c, dim)),
                    "bias": t.take("embedding/bias", 1)},
      "pos_embedding": pos if cls is None else np.concatenate(
          [np.zeros((1, 1, dim), np.float32), pos], axis=1)}
  t.sources.update({"embedding/kernel": "embedding/kernel", "pos_embedding": pos_name})
  if cls is not None:
    params["cls"] = cls
    t.sources["cls"] = "cls"
  blocks = {}
  for i in range(depth):
    if not scan:
      first = f"Transformer/encoderblock_{i}/"
    block = {}
    for dest, src in (("LayerNorm_0", ln0), ("LayerNorm_2", ln2)):
      block[dest] = {"scale": take_block(f"{src}/scale", i),
                     "bias": take_block(f"{src}/bias", i)}
    attention = {}
    for name in ("query", "key", "value"):
      k, b = take_block(f"{att}/{name}/kernel", i), take_block(f"{att}/{name}/bias", i)
      attention[name] = {"kernel": k.reshape(k.shape[0], -1), "bias": b.reshape(-1)}
    k, b = take_block(f"{att}/out/kernel", i), take_block(f"{att}/out/bias", i)
    attention["out"] = {"kernel": k.reshape(-1, k.shape[-1]), "bias": b}
    block["MultiHeadDotProductAttention_1"] = attention
    block["MlpBlock_3"] = {d: {"kernel": take_block(f"{mlp}/{d}/kernel", i),
                               "bias": take_block(f"{mlp}/{d}/bias", i)}
                           for d in ("Dense_0", "Dense_1")}
    blocks[f"encoderblock_{i}"] = block
  blocks["encoder_norm"] = {"scale": t.take("Transformer/encoder_norm/scale", 1),
                            "bias": t.take("Transformer/encoder_norm/bias", 1)}
  params["Transformer"] = blocks
  if not t.has("head/kernel"):
    raise ConversionError(f"{where}: tensor 'head/kernel' is missing (a checkpoint "
                          "without a classifier head; vitjax needs one)")
  params["head"] = {"kernel": t.take("head/kernel", 2), "bias": t.take("head/bias", 1)}
  mlp_dim = params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
  config = dict(image_size=grid * p, patch_size=p, channels=c,
                num_classes=params["head"]["kernel"].shape[1], dim=dim, depth=depth,
                num_heads=heads, mlp_dim=mlp_dim.shape[1],
                pool="tok" if cls is not None else "gap", gelu="tanh", norm_eps=1e-6)
  notes.append("pixel statistics are not in a big_vision checkpoint: mean 0.5, std 0.5 "
               "assumed (big_vision's value_range(-1, 1)); pass pixel_mean=/pixel_std=")
  config.update(pixel_mean=INCEPTION_MEAN[:c] if c == 3 else (0.5,),
                pixel_std=INCEPTION_STD[:c] if c == 3 else (0.5,))
  return config, params


# -------------------------------------------------------------------- load


def detect_format(tensors: dict[str, np.ndarray]) -> str:
  """'timm', 'hf' or 'big_vision', from the tensor names.

  Raises:
    ConversionError: the names fit none of them.
  """
  names = set(tensors)
  if any(n.startswith("blocks.") for n in names) and "pos_embed" in names:
    return "timm"
  if any(n.startswith(("vit.", "deit.")) for n in names):
    return "hf"
  if any(n.startswith("Transformer/") for n in names):
    return "big_vision"
  raise ConversionError(
      f"unknown architecture: tensor names {sorted(names)[:5]} fit neither timm "
      "('blocks.N...', 'pos_embed'), Hugging Face ('vit.'/'deit.' ...) nor big_vision "
      "('Transformer/...'); vitjax imports ViT and DeiT only")


def _source_files(path: pathlib.Path) -> tuple[pathlib.Path, dict, dict]:
  """The weights file of `path` (a file, or a model directory), and the
  directory's config.json and preprocessor_config.json (empty if absent)."""
  if path.is_dir():
    candidates = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".npz"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not candidates:
      if pickles:
        read_tensors(path / pickles[0])  # raises the pickle explanation
      raise ConversionError(f"{path} holds no .safetensors or .npz file")
    if len(candidates) > 1:
      raise ConversionError(f"{path} holds several weight files "
                            f"{[p.name for p in candidates]}; name one")
    return candidates[0], _read_json(path / "config.json"), \
        _read_json(path / "preprocessor_config.json")
  return path, _read_json(path.parent / "config.json") if path.suffix == ".safetensors" \
      else {}, {}


def read(path: str | pathlib.Path, *, format: Format | None = None,
         **overrides: Any) -> Imported:
  """Converts the checkpoint at `path` into a vitjax model.

  Args:
    path: a `.safetensors` / `.npz` file, or a model directory holding one
      (with its `config.json`, as `save_pretrained` and timm's hub folders do).
    format: 'timm', 'hf' or 'big_vision'; detected from the names if None.
    **overrides: `ViTConfig` fields that replace inferred ones (num_heads,
      pixel_mean, pixel_std, norm_eps, gelu, ...); shape-defining fields must
      agree with the tensors.

  Returns:
    `Imported(model, format, notes)`; notes list every assumption made.

  Raises:
    ConversionError: a pickle file, a truncated file, an unknown architecture
      or format, a missing, extra or mis-shaped tensor (named), or overrides
      that do not fit the tensors.
  """
  path = pathlib.Path(path)
  if format is not None and format not in FORMATS:
    raise ConversionError(f"format must be one of {FORMATS}, got {format!r}")
  weights, meta, pre = _source_files(path)
  tensors = read_tensors(weights)
  fmt = format or detect_format(tensors)
  t = _Tensors(tensors, weights)
  notes: list[str] = []
  builders: dict[str, Callable[[], tuple[dict, dict]]] = {
      "timm": lambda: _timm(t, weights, meta, notes),
      "hf": lambda: _hf(t, weights, meta, pre, notes),
      "big_vision": lambda: _big_vision(t, weights, notes)}
  try:
    fields, params = builders[fmt]()
  except KeyError as e:
    raise ConversionError(f"{weights}: tensor {e.args[0]!r} is missing (read as {fmt})") \
        from e
  t.check_all_used()
  known = {f.name for f in dataclasses.fields(ViTConfig)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ConversionError(f"unknown config overrides {unknown}; known: {sorted(known)}")
  fields.update(overrides)
  try:
    config = ViTConfig(**fields)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{weights}: the inferred config is invalid: {e}") from e
  _check_shapes(config, params, t.sources, weights)
  return Imported(model_lib.Model(config, params), fmt, tuple(notes))


def load(path: str | pathlib.Path, *, format: Format | None = None,
         **overrides: Any) -> model_lib.Model:
  """`read(path, format=..., **overrides).model`: the converted vitjax model."""
  return read(path, format=format, **overrides).model


def _check_shapes(config: ViTConfig, params: dict, sources: dict[str, str],
                  where: pathlib.Path) -> None:
  """Every converted array against the shape `config` needs, naming the
  source tensor of the first that differs."""
  want = model_lib.expected_shapes(config)
  got = dict(model_lib.weight_leaves(params))
  for dest, shape in want.items():
    if dest not in got:
      raise ConversionError(f"{where}: nothing gives vitjax parameter {dest}")
    if tuple(np.shape(got[dest])) != shape:
      src = sources.get(dest, dest)
      raise ConversionError(
          f"{where}: shape mismatch: tensor {src!r} gives {dest} of shape "
          f"{tuple(np.shape(got[dest]))}, the inferred config (dim {config.dim}, "
          f"{config.num_heads} heads, mlp {config.mlp_dim}, {config.num_classes} classes) "
          f"needs {shape}")
  try:
    model_lib.check_params(config, params)
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from e
