"""Orbax checkpoints of (compressed) models, self-describing and pickle-free.

A model directory holds:
  vitjax.json   the config, a description of every leaf of the parameter tree
                (plain array, or a registered leaf type with its static fields),
                where each array lies in which buffer, its dtype and shape,
                every buffer's SHA-256, and free metadata;
  arrays/       one orbax checkpoint of a dict of 1-D buffers, one per dtype.

Arrays are stored in their own dtype: int8 stays int8, int4 is packed two
values per byte, boolean masks one bit per value; no float copy of a quantized
weight is written. The flattened arrays are concatenated into one buffer per
stored dtype (each with a SHA-256), so a checkpoint holds a handful of arrays
and its metadata stays small next to the weights. Saving writes into a
temporary sibling directory and renames it into place, so an interrupted save
leaves nothing half-written; loading verifies every checksum and the tree
against the config, so a corrupt or truncated checkpoint is refused with a
clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from vitjax import leaves
from vitjax import model as model_lib
from vitjax.model import Model
from vitjax.models.config import ViTConfig

FORMAT = "vitjax-model"
VERSION = 1
META_FILE = "vitjax.json"
ARRAYS_DIR = "arrays"

class CheckpointError(Exception):
  """A checkpoint is missing, corrupt, truncated or of an unknown format."""


# -------------------------------------------------------------- array codecs


def _pack_int4(x: np.ndarray) -> np.ndarray:
  flat = x.astype(np.int8).reshape(-1)
  if flat.size % 2:
    flat = np.concatenate([flat, np.zeros(1, np.int8)])
  lo, hi = flat[0::2] & 0x0F, flat[1::2] & 0x0F
  return (lo | (hi << 4)).astype(np.uint8)


def _unpack_int4(packed: np.ndarray, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  lo = (packed & 0x0F).astype(np.int8)
  hi = (packed >> 4).astype(np.int8)
  if np.dtype(dtype) == np.dtype(ml_dtypes.int4):
    lo = np.where(lo > 7, lo - 16, lo)
    hi = np.where(hi > 7, hi - 16, hi)
  flat = np.empty(lo.size * 2, np.int8)
  flat[0::2], flat[1::2] = lo, hi
  return flat[:int(np.prod(shape))].reshape(shape).astype(dtype)


def pack_int4(x: np.ndarray) -> np.ndarray:
  """int4/uint4 array -> uint8 array of ceil(size/2) bytes, low nibble first."""
  return _pack_int4(np.asarray(x))


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...], dtype: Any = ml_dtypes.int4
                ) -> np.ndarray:
  """Inverse of `pack_int4`."""
  return _unpack_int4(np.asarray(packed), tuple(shape), dtype)


def _encode_array(x: Any) -> tuple[np.ndarray, dict[str, Any]]:
  x = np.asarray(x)
  info = {"dtype": str(x.dtype), "shape": list(x.shape)}
  if x.dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)):
    stored, info["codec"] = _pack_int4(x), "int4-packed"
  elif x.dtype == np.bool_:
    stored, info["codec"] = np.packbits(x.reshape(-1)), "bits"
  else:
    stored, info["codec"] = x, "raw"
  return stored.reshape(-1), info


def _decode_array(stored: np.ndarray, info: dict[str, Any]) -> np.ndarray:
  shape, codec = tuple(info["shape"]), info["codec"]
  dtype = np.dtype(getattr(ml_dtypes, info["dtype"], None) or info["dtype"])
  if codec == "int4-packed":
    return _unpack_int4(stored, shape, dtype)
  if codec == "bits":
    return np.unpackbits(stored, count=int(np.prod(shape))).astype(bool).reshape(shape)
  if codec == "raw":
    return stored.reshape(shape).astype(dtype)
  raise CheckpointError(f"unknown array codec {codec!r}")


def _pack(arrays: dict[str, np.ndarray], infos: dict[str, Any]
          ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Concatenates the flat stored arrays into one buffer per dtype.

  Records each array's buffer, offset and length in `infos`; returns the
  buffers and each buffer's SHA-256.
  """
  parts: dict[str, list[np.ndarray]] = {}
  ends: dict[str, int] = {}
  for name, flat in arrays.items():
    buffer = str(flat.dtype)
    offset = ends.get(buffer, 0)
    ends[buffer] = offset + len(flat)
    parts.setdefault(buffer, []).append(flat)
    infos[name].update(buffer=buffer, offset=offset, length=len(flat))
  buffers = {k: np.concatenate(v) for k, v in parts.items()}
  digests = {k: hashlib.sha256(np.ascontiguousarray(b).tobytes()).hexdigest()
             for k, b in buffers.items()}
  return buffers, digests


# ---------------------------------------------------------------- tree codec


def _static_to_json(value: Any) -> Any:
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (tuple, list)):
    return [_static_to_json(v) for v in value]
  try:
    return {"dtype": jnp.dtype(value).name}
  except TypeError as e:
    raise CheckpointError(f"cannot store static field value {value!r}") from e


def _static_from_json(value: Any) -> Any:
  if isinstance(value, dict) and set(value) == {"dtype"}:
    return jnp.dtype(value["dtype"])
  if isinstance(value, list):
    return tuple(_static_from_json(v) for v in value)
  return value


def _is_static(field: dataclasses.Field) -> bool:
  return field.metadata.get("pytree_node", True) is False or \
      field.metadata.get("static", False)


def _encode(node: Any, key: str, arrays: dict[str, np.ndarray],
            infos: dict[str, Any]) -> Any:
  if node is None:
    return None
  if isinstance(node, dict):
    return {"dict": {k: _encode(v, f"{key}/{k}", arrays, infos) for k, v in node.items()}}
  if isinstance(node, (list, tuple)):
    return {"list": [_encode(v, f"{key}/{i}", arrays, infos) for i, v in enumerate(node)]}
  if isinstance(node, (np.ndarray, jax.Array, np.generic)):
    name = f"a{len(arrays)}"
    arrays[name], infos[name] = _encode_array(node)
    infos[name]["path"] = key
    return {"array": name}
  cls_name = type(node).__name__
  if dataclasses.is_dataclass(node) and leaves.storable_types().get(cls_name) is type(node):
    fields, static = {}, {}
    for f in dataclasses.fields(node):
      value = getattr(node, f.name)
      if _is_static(f):
        static[f.name] = _static_to_json(value)
      else:
        fields[f.name] = _encode(value, f"{key}/{f.name}", arrays, infos)
    return {"type": cls_name, "fields": fields, "static": static}
  raise CheckpointError(f"cannot store {cls_name} at {key}: not an array, dict, list "
                        f"or registered leaf type {sorted(leaves.storable_types())}")


def _decode(desc: Any, arrays: dict[str, np.ndarray]) -> Any:
  if desc is None:
    return None
  if "dict" in desc:
    return {k: _decode(v, arrays) for k, v in desc["dict"].items()}
  if "list" in desc:
    return [_decode(v, arrays) for v in desc["list"]]
  if "array" in desc:
    return arrays[desc["array"]]
  cls = leaves.storable_types().get(desc.get("type"))
  if cls is None:
    raise CheckpointError(f"checkpoint holds leaf type {desc.get('type')!r}, which this "
                          f"vitjax does not know (known: {sorted(leaves.storable_types())})")
  kwargs = {k: _decode(v, arrays) for k, v in desc["fields"].items()}
  kwargs.update({k: _static_from_json(v) for k, v in desc["static"].items()})
  return cls(**kwargs)


# ------------------------------------------------------------------ save/load


def disk_bytes(path: str | os.PathLike) -> int:
  """Total size of the files under `path` (the checkpoint as it lies on disk)."""
  return sum(p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file())


def save_model(model: Model, path: str | os.PathLike, *,
               metadata: dict[str, Any] | None = None, overwrite: bool = False) -> int:
  """Writes `model` to directory `path`; returns its bytes on disk.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False.
    ValueError: the params do not fit the config or hold NaN/inf.
    CheckpointError: the tree holds something that cannot be stored.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
  model_lib.check_params(model.config, model.params)
  arrays: dict[str, np.ndarray] = {}
  infos: dict[str, Any] = {}
  tree = _encode(jax.device_get(model.params), "params", arrays, infos)
  buffers, digests = _pack(arrays, infos)
  meta = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
          "tree": tree, "arrays": infos, "buffers": digests, "metadata": metadata or {}}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / ARRAYS_DIR, buffers)
    checkpointer.wait_until_finished()
    checkpointer.close()
    (tmp / META_FILE).write_text(json.dumps(meta, separators=(",", ":")))
    if path.exists():
      old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
      path.rename(old)
      tmp.rename(path)
      shutil.rmtree(old)
    else:
      tmp.rename(path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return disk_bytes(path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The parsed `vitjax.json` of a model directory.

  Raises:
    CheckpointError: missing, unparsable, or not a vitjax model checkpoint.
  """
  meta_path = pathlib.Path(path) / META_FILE
  if not meta_path.exists():
    raise CheckpointError(f"{path} is not a vitjax model checkpoint: {META_FILE} is missing")
  try:
    meta = json.loads(meta_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{meta_path} is corrupt or truncated: {e}") from e
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise CheckpointError(f"{path} has format {meta.get('format')!r} version "
                          f"{meta.get('version')!r}; expected {FORMAT!r} version {VERSION}")
  return meta


def load_model(path: str | os.PathLike, expect_config: ViTConfig | None = None) -> Model:
  """Reads a model written by `save_model`.

  Args:
    path: the model directory.
    expect_config: if given, the stored config must equal it.

  Raises:
    CheckpointError: missing files, bad checksums, truncated arrays, unknown
      leaf types, or a config other than `expect_config`.
    ValueError: the stored tree does not fit its config or holds NaN/inf.
  """
  path = pathlib.Path(path)
  meta = read_metadata(path)
  try:
    config = ViTConfig.from_dict(meta["config"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{path} holds an invalid config: {e}") from e
  if expect_config is not None and config != expect_config:
    diffs = {k: (v, getattr(expect_config, k)) for k, v in config.to_dict().items()
             if expect_config.to_dict()[k] != v}
    raise CheckpointError(f"{path} was saved for a different model config "
                          f"(field: (saved, expected)) {diffs}")
  infos, digests = meta["arrays"], meta["buffers"]
  try:
    checkpointer = ocp.StandardCheckpointer()
    stored = checkpointer.restore(path.absolute() / ARRAYS_DIR)
    checkpointer.close()
  except Exception as e:  # orbax/tensorstore raise many types for bad files
    raise CheckpointError(f"{path} is corrupt or truncated: its arrays cannot be read "
                          f"({type(e).__name__}: {str(e)[:300]})") from e
  if set(stored) != set(digests):
    raise CheckpointError(f"{path} is corrupt: buffers {sorted(set(digests) ^ set(stored))} "
                          "are missing or unexpected")
  buffers = {name: np.ascontiguousarray(np.asarray(stored[name])) for name in digests}
  for name, digest in digests.items():
    if hashlib.sha256(buffers[name].tobytes()).hexdigest() != digest:
      raise CheckpointError(f"{path} is corrupt: the {name} buffer fails its SHA-256 check")
  arrays = {}
  for name, info in infos.items():
    buffer = buffers[info["buffer"]]
    if info["offset"] + info["length"] > len(buffer):
      raise CheckpointError(f"{path} is corrupt: {info['path']} lies outside its buffer")
    arrays[name] = _decode_array(buffer[info["offset"]:info["offset"] + info["length"]], info)
  params = _decode(meta["tree"], arrays)
  model_lib.check_params(config, params)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return Model(config, params)

