"""Orbax checkpoints of (compressed) models, self-describing and pickle-free.

A model directory holds:
  vitjax.json   the config, a description of every leaf of the parameter tree
                (plain array, or a registered leaf type with its static fields)
                and of the activation quantizer at every quantization site,
                where each array lies in which buffer, its dtype and shape,
                every buffer's SHA-256, free metadata, and the SHA-256 of all
                of that (`description_sha256`);
  arrays/       one orbax checkpoint of a dict of 1-D buffers, one per dtype.

Arrays are stored in their own dtype: int8 stays int8, int4 is packed two
values per byte, boolean masks one bit per value; no float copy of a quantized
weight is written. A leaf type that names a keep-mask (`STORE_KEPT_BY`, as
`Masked` does) has the arrays it holds in the mask's shape stored as their
kept values only (the mask says where they go; the rest are zero), so a 50%
pruned weight takes half its values plus one bit per value. The bulky part of
the description (tree, site quantizers, array layout) is stored
zlib-compressed inside `vitjax.json` (`layout`), next to the readable config
and metadata. The flattened arrays are concatenated into one buffer per
stored dtype (each with a SHA-256), so a checkpoint holds a handful of arrays
and its metadata stays small next to the weights. Saving writes into a
temporary sibling directory and renames it into place, so an interrupted save
leaves nothing half-written (a replaced checkpoint is put back if the final
rename fails); loading verifies the description's digest, its layout field by
field, every buffer's checksum and the tree against the config, so a corrupt,
edited or truncated checkpoint is refused with a `CheckpointError` that names
what is wrong.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import uuid
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from vitjax import data as data_lib
from vitjax import leaves, sharding, storable
from vitjax import model as model_lib
from vitjax.model import Model
from vitjax.models.arch import Config, config_from_dict

FORMAT = "vitjax-model"
# 4: kept-values storage of masked weights ("kept_by"/"count" in the array
# layout) and the compressed layout ("layout").
# 3: activation quantizers of the quantization sites ("sites").
# 2: the description carries its own SHA-256 and the config its pixel
# statistics. Versions 1 (no description digest) and 2 are still read;
# version 1 models normalized uint8 pixels with Fashion-MNIST's statistics,
# which load_model puts into the config.
VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
LAYOUT_KEYS = ("tree", "sites", "arrays")
META_FILE = "vitjax.json"
ARRAYS_DIR = "arrays"
DIGEST_KEY = "description_sha256"
CODECS = ("raw", "int4-packed", "bits")

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


def _codec_of(dtype: str) -> str:
  """How arrays of `dtype` (its name) are stored: int4/uint4 packed two per
  byte, bool one bit per value, anything else raw."""
  if dtype in ("int4", "uint4"):
    return "int4-packed"
  return "bits" if dtype == "bool" else "raw"


def _encode_array(x: Any, kept: tuple[str, np.ndarray] | None = None
                  ) -> tuple[np.ndarray, dict[str, Any]]:
  """Flat stored form and layout of `x`; with `kept` = (mask array name,
  boolean mask), an array of the mask's shape that is zero (all bits)
  outside it is stored as its kept values only."""
  x = np.asarray(x)
  info = {"dtype": str(x.dtype), "shape": list(x.shape), "codec": _codec_of(str(x.dtype))}
  if kept is not None and storable.stores_kept_values(x, kept[1]):
    info.update(kept_by=kept[0], count=int(kept[1].sum()))
    x = x[kept[1]]
  if info["codec"] == "int4-packed":
    stored = _pack_int4(x)
  elif info["codec"] == "bits":
    stored = np.packbits(x.reshape(-1))
  else:
    stored = x
  return stored.reshape(-1), info


def _decode_array(stored: np.ndarray, info: dict[str, Any],
                  mask: np.ndarray | None = None) -> np.ndarray:
  """Inverse of `_encode_array`; `mask` is the decoded `kept_by` array."""
  shape, codec = tuple(info["shape"]), info["codec"]
  dtype = np.dtype(getattr(ml_dtypes, info["dtype"], None) or info["dtype"])
  if mask is not None:
    full = np.zeros(shape, dtype)
    full[mask] = _decode_array(stored, {**info, "shape": [info["count"]]})
    return full
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


def _is_stored(field: dataclasses.Field) -> bool:
  """False for a runtime-only field (e.g. the CPU int8 kernel's packed copy of
  a quantized weight): never written, loaded as its default."""
  return field.metadata.get("stored", True) is not False


def _is_static(field: dataclasses.Field) -> bool:
  return field.metadata.get("pytree_node", True) is False or \
      field.metadata.get("static", False)


def _encode(node: Any, key: str, arrays: dict[str, np.ndarray],
            infos: dict[str, Any], kept: tuple[str, np.ndarray] | None = None) -> Any:
  """The description of `node`, its arrays added to `arrays`/`infos`;
  `kept` is the keep-mask of an enclosing leaf type (see `_encode_array`)."""
  if node is None:
    return None
  if isinstance(node, dict):
    return {"dict": {k: _encode(v, f"{key}/{k}", arrays, infos, kept)
                     for k, v in node.items()}}
  if isinstance(node, (list, tuple)):
    return {"list": [_encode(v, f"{key}/{i}", arrays, infos, kept)
                     for i, v in enumerate(node)]}
  if isinstance(node, (np.ndarray, jax.Array, np.generic)):
    name = f"a{len(arrays)}"
    arrays[name], infos[name] = _encode_array(node, kept)
    infos[name]["path"] = key
    return {"array": name}
  cls_name = type(node).__name__
  if dataclasses.is_dataclass(node) and leaves.storable_types().get(cls_name) is type(node):
    fields, static = {}, {}
    mask_field = getattr(type(node), "STORE_KEPT_BY", None)
    ordered = sorted(filter(_is_stored, dataclasses.fields(node)),
                     key=lambda f: f.name != mask_field)
    for f in ordered:
      value = getattr(node, f.name)
      if _is_static(f):
        static[f.name] = _static_to_json(value)
      else:
        fields[f.name] = _encode(value, f"{key}/{f.name}", arrays, infos, kept)
        if f.name == mask_field and "array" in (fields[f.name] or {}):
          kept = (fields[f.name]["array"], np.asarray(value, bool))
    return {"type": cls_name, "fields": fields, "static": static}
  raise CheckpointError(f"cannot store {cls_name} at {key}: not an array, dict, list "
                        f"or registered leaf type {sorted(leaves.storable_types())}")


def _decode(desc: Any, arrays: dict[str, np.ndarray], key: str, used: set[str]) -> Any:
  """The tree a description stands for; refuses malformed nodes by path.

  Every array must be referenced once, at the path its layout names.
  """
  if desc is None:
    return None
  if not isinstance(desc, dict):
    raise CheckpointError(f"tree node {key} is a {type(desc).__name__}, not a description")
  kinds = set(desc) & {"dict", "list", "array", "type"}
  if len(kinds) != 1:
    raise CheckpointError(f"tree node {key} has keys {sorted(desc)}; expected one of "
                          "'dict', 'list', 'array' or a leaf 'type'")
  if "dict" in desc:
    if not isinstance(desc["dict"], dict):
      raise CheckpointError(f"tree node {key}: 'dict' holds a {type(desc['dict']).__name__}")
    return {k: _decode(v, arrays, f"{key}/{k}", used) for k, v in desc["dict"].items()}
  if "list" in desc:
    if not isinstance(desc["list"], list):
      raise CheckpointError(f"tree node {key}: 'list' holds a {type(desc['list']).__name__}")
    return [_decode(v, arrays, f"{key}/{i}", used) for i, v in enumerate(desc["list"])]
  if "array" in desc:
    name = desc["array"]
    if not isinstance(name, str) or name not in arrays:
      raise CheckpointError(f"tree node {key} names array {name!r}, which the array "
                            "layout does not list")
    if name in used:
      raise CheckpointError(f"tree node {key} names array {name!r} a second time")
    used.add(name)
    return arrays[name]
  cls = leaves.storable_types().get(desc["type"]) if isinstance(desc["type"], str) else None
  if cls is None:
    raise CheckpointError(f"tree node {key} holds leaf type {desc['type']!r}, which this "
                          f"vitjax does not know (known: {sorted(leaves.storable_types())})")
  fields, static = desc.get("fields"), desc.get("static")
  if not isinstance(fields, dict) or not isinstance(static, dict):
    raise CheckpointError(f"tree node {key} ({desc['type']}) lacks its 'fields' or "
                          "'static' entries")
  want = {f.name: _is_static(f) for f in dataclasses.fields(cls) if _is_stored(f)}
  got = {**{k: False for k in fields}, **{k: True for k in static}}
  if got != want or set(fields) & set(static):
    raise CheckpointError(
        f"tree node {key} ({desc['type']}) stores fields {sorted(fields)} and static "
        f"{sorted(static)}; the type has fields "
        f"{sorted(k for k, v in want.items() if not v)} and static "
        f"{sorted(k for k, v in want.items() if v)}")
  kwargs = {k: _decode(v, arrays, f"{key}/{k}", used) for k, v in fields.items()}
  try:
    kwargs.update({k: _static_from_json(v) for k, v in static.items()})
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"tree node {key} ({desc['type']}) is invalid: {e}") from e


def _stored_layout(info: dict[str, Any]) -> tuple[str, int]:
  """(buffer dtype, stored length) that an array's dtype, shape, codec (and
  kept count) imply."""
  size = info["count"] if "kept_by" in info else int(np.prod(info["shape"]))
  if info["codec"] == "int4-packed":
    return "uint8", (size + 1) // 2
  if info["codec"] == "bits":
    return "uint8", (size + 7) // 8
  return info["dtype"], size


def _check_layout(infos: Any, digests: Any, where: pathlib.Path) -> dict[str, int]:
  """Checks the array layout of a description: every field present and typed,
  dtype, codec and buffer consistent, lengths implied by the shapes, and the
  arrays of each buffer tiling it in order. Returns each buffer's length.

  Raises:
    CheckpointError: naming the array and field that are wrong.
  """
  if not isinstance(digests, dict) or not digests or not all(
      isinstance(v, str) and len(v) == 64 for v in digests.values()):
    raise CheckpointError(f"{where}: the buffer list ('buffers') must map each buffer to "
                          f"a SHA-256 hex digest, got {str(digests)[:200]}")
  if not isinstance(infos, dict):
    raise CheckpointError(f"{where}: the array layout ('arrays') is a "
                          f"{type(infos).__name__}, not a mapping")
  ends = {name: 0 for name in digests}
  for name, info in infos.items():
    kinds = {"dtype": str, "codec": str, "buffer": str, "path": str, "shape": list,
             "offset": int, "length": int}
    for field, kind in kinds.items():
      if not isinstance(info, dict) or not isinstance(info.get(field), kind) or \
          isinstance(info.get(field), bool):
        raise CheckpointError(f"{where}: array {name} has no valid {field!r} field")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
               for d in info["shape"]):
      raise CheckpointError(f"{where}: array {name} ({info['path']}) has shape "
                            f"{info['shape']}")
    if info["codec"] not in CODECS:
      raise CheckpointError(f"{where}: array {name} ({info['path']}) has unknown codec "
                            f"{info['codec']!r}; known: {CODECS}")
    if info["codec"] != _codec_of(info["dtype"]):
      raise CheckpointError(f"{where}: array {name} ({info['path']}) has dtype "
                            f"{info['dtype']!r}, which is stored with codec "
                            f"{_codec_of(info['dtype'])!r}, not {info['codec']!r}")
    try:
      np.dtype(getattr(ml_dtypes, info["dtype"], None) or info["dtype"])
    except TypeError as e:
      raise CheckpointError(f"{where}: array {name} ({info['path']}) has unknown dtype "
                            f"{info['dtype']!r}") from e
    if "kept_by" in info:
      mask = infos.get(info["kept_by"]) if isinstance(info["kept_by"], str) else None
      count = info.get("count")
      if not isinstance(mask, dict) or mask.get("dtype") != "bool" or \
          mask.get("shape") != info["shape"] or "kept_by" in mask:
        raise CheckpointError(f"{where}: array {name} ({info['path']}) is kept by "
                              f"{info['kept_by']!r}, which is not a boolean array of its "
                              f"shape {info['shape']}")
      if not isinstance(count, int) or isinstance(count, bool) or \
          not 0 <= count <= int(np.prod(info["shape"])):
        raise CheckpointError(f"{where}: array {name} ({info['path']}) has kept count "
                              f"{count!r}")
    buffer, length = _stored_layout(info)
    if info["buffer"] != buffer or buffer not in digests:
      raise CheckpointError(f"{where}: array {name} ({info['path']}) lies in buffer "
                            f"{info['buffer']!r}; its dtype and codec put it in {buffer!r} "
                            f"(buffers: {sorted(digests)})")
    if info["length"] != length:
      raise CheckpointError(f"{where}: array {name} ({info['path']}) has length "
                            f"{info['length']}; its shape and codec need {length}")
    if info["offset"] != ends[buffer]:
      raise CheckpointError(f"{where}: array {name} ({info['path']}) has offset "
                            f"{info['offset']}; the arrays before it in buffer {buffer} "
                            f"end at {ends[buffer]}")
    ends[buffer] += length
  return ends


# ------------------------------------------------------------------ save/load


def disk_bytes(path: str | os.PathLike) -> int:
  """Total size of the files under `path` (the checkpoint as it lies on disk)."""
  return sum(p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file())


def _describe(model: Model) -> tuple[Any, Any, dict[str, Any], dict[str, np.ndarray],
                                     dict[str, str]]:
  """(tree, sites, array layout, buffers, buffer digests) of a model's save."""
  arrays: dict[str, np.ndarray] = {}
  infos: dict[str, Any] = {}
  tree = _encode(jax.device_get(model.params), "params", arrays, infos)
  site_tree = _encode(jax.device_get(model.sites), "sites", arrays, infos)
  buffers, digests = _pack(arrays, infos)
  return tree, site_tree, infos, buffers, digests


def stored_buffers(model: Model) -> dict[str, np.ndarray]:
  """The 1-D buffers (one per stored dtype) that `save_model` hands to orbax
  for `model`, before orbax's own zstd compression."""
  return _describe(model)[3]


def save_model(model: Model, path: str | os.PathLike, *,
               metadata: dict[str, Any] | None = None, overwrite: bool = False) -> int:
  """Writes `model` to directory `path`; returns its bytes on disk.

  In a multi-process run every process calls it with the same (host-gathered,
  see `sharding.to_host`) model; process 0 alone writes, the others wait for
  it, so the directory is written exactly once.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False.
    ValueError: the params do not fit the config or hold NaN/inf.
    CheckpointError: the tree holds something that cannot be stored.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
  check_output_path(path, overwrite)
  model_lib.check_params(model.config, model.params)
  check_sites(model)
  if sharding.is_writer():
    _write_model(model, path, metadata)
  sharding.barrier(f"save_model:{path}")
  return disk_bytes(path)


def _local_checkpointer() -> ocp.Checkpointer:
  """An orbax checkpointer this process uses alone (host numpy arrays): no
  barriers with the other processes of a multi-process run."""
  me = jax.process_index()
  return ocp.Checkpointer(ocp.StandardCheckpointHandler(),
                          multiprocessing_options=ocp.options.MultiprocessingOptions(
                              primary_host=me, active_processes={me}))


def _write_model(model: Model, path: pathlib.Path, metadata: dict[str, Any] | None) -> None:
  """Writes the model into a temporary sibling directory, then renames it to
  `path` (nothing half-written is ever at `path`)."""
  tree, site_tree, infos, buffers, digests = _describe(model)
  meta = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
          "tree": tree, "sites": site_tree, "arrays": infos, "buffers": digests,
          "metadata": metadata or {}}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    checkpointer = _local_checkpointer()
    checkpointer.save(tmp / ARRAYS_DIR, args=ocp.args.StandardSave(buffers))
    checkpointer.close()
    write_description(tmp, meta)
    _replace_dir(tmp, path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


def _replace_dir(new: pathlib.Path, path: pathlib.Path) -> None:
  """Renames directory `new` to `path`; an existing `path` is replaced, and
  put back if the rename fails."""
  if not path.exists():
    new.rename(path)
    return
  old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
  path.rename(old)
  try:
    new.rename(path)
  except BaseException:
    old.rename(path)
    raise
  shutil.rmtree(old)


def check_output_path(path: str | os.PathLike, overwrite: bool) -> None:
  """Checks, before any work, that a directory can be written at `path`.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False.
    CheckpointError: `path` is an existing file, or its nearest existing
      ancestor is not a writable directory.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to "
                          "replace it")
  check_writable_directory(path)


def check_writable_directory(path: str | os.PathLike) -> None:
  """Checks that `path` is, or can be created as, a directory this process
  can write into.

  Raises:
    CheckpointError: `path` is a file, or its nearest existing ancestor is a
      file or not writable.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() and not path.is_dir():
    raise CheckpointError(f"output path {path} is a file, not a directory")
  parent = path
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise CheckpointError(f"output path {path} lies under {parent}, which is a file")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise CheckpointError(f"output path {path} cannot be created: {parent} is not writable")


def write_description(path: str | os.PathLike, meta: dict[str, Any]) -> None:
  """Signs `meta` (its `description_sha256`) and writes it as the
  `vitjax.json` of model directory `path`, the layout compressed (version 4)."""
  meta = {k: v for k, v in meta.items() if k != DIGEST_KEY}
  meta[DIGEST_KEY] = description_digest(meta)
  stored = {k: v for k, v in meta.items() if k not in LAYOUT_KEYS}
  if meta.get("version", VERSION) >= 4:
    layout = json.dumps({k: meta[k] for k in LAYOUT_KEYS}, separators=(",", ":"))
    stored["layout"] = base64.b64encode(zlib.compress(layout.encode(), 9)).decode()
  else:
    stored.update({k: meta[k] for k in LAYOUT_KEYS if k in meta})
  (pathlib.Path(path) / META_FILE).write_text(json.dumps(stored, separators=(",", ":")))


def description_digest(meta: dict[str, Any]) -> str:
  """SHA-256 of a checkpoint description without its own digest field (keys
  sorted, compact separators)."""
  body = {k: v for k, v in meta.items() if k != DIGEST_KEY}
  return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                        .encode()).hexdigest()


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
  if not isinstance(meta, dict):
    raise CheckpointError(f"{meta_path} is corrupt: it holds a {type(meta).__name__}, "
                          "not a checkpoint description")
  if meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
    raise CheckpointError(f"{path} has format {meta.get('format')!r} version "
                          f"{meta.get('version')!r}; expected {FORMAT!r} version "
                          f"{' or '.join(map(str, READABLE_VERSIONS))}")
  if meta["version"] == 1 and DIGEST_KEY in meta:
    raise CheckpointError(f"{meta_path} says version 1, which has no {DIGEST_KEY}, yet "
                          "carries one: its version field was edited")
  if meta["version"] >= 4:
    if any(k in meta for k in LAYOUT_KEYS) or not isinstance(meta.get("layout"), str):
      raise CheckpointError(f"{meta_path} is corrupt: a version 4 description holds its "
                            "tree, sites and arrays in a compressed 'layout' string")
    try:
      layout = json.loads(zlib.decompress(base64.b64decode(meta.pop("layout"),
                                                           validate=True)))
    except (ValueError, zlib.error) as e:
      raise CheckpointError(f"{meta_path} is corrupt: its layout cannot be decoded ({e})"
                            ) from e
    if not isinstance(layout, dict) or set(layout) != set(LAYOUT_KEYS):
      raise CheckpointError(f"{meta_path} is corrupt: its layout does not hold "
                            f"{LAYOUT_KEYS}")
    meta.update(layout)
  elif "layout" in meta:
    raise CheckpointError(f"{meta_path} says version {meta['version']}, which has no "
                          "compressed layout, yet carries one: its version field was edited")
  if meta["version"] >= 2:
    if DIGEST_KEY not in meta:
      raise CheckpointError(f"{meta_path} is corrupt: its {DIGEST_KEY} is missing")
    if meta[DIGEST_KEY] != description_digest(meta):
      raise CheckpointError(f"{meta_path} fails its {DIGEST_KEY} check: the description "
                            "(config, tree, array layout or metadata) was edited or corrupted")
  return meta


def load_model(path: str | os.PathLike, expect_config: Config | None = None) -> Model:
  """Reads a model written by `save_model`.

  Args:
    path: the model directory.
    expect_config: if given, the stored config must equal it.

  Raises:
    CheckpointError: missing files, a description that fails its digest or is
      malformed (named field by field), bad buffer checksums, truncated arrays,
      unknown leaf types, a tree that does not fit its config, or a config
      other than `expect_config`.
  """
  path = pathlib.Path(path)
  meta = read_metadata(path)
  config_dict = meta.get("config")
  if not isinstance(config_dict, dict):
    raise CheckpointError(f"{path} has no config")
  if meta["version"] == 1:
    if "pixel_mean" in config_dict or "pixel_std" in config_dict:
      raise CheckpointError(f"{path} says version 1, whose configs have no pixel "
                            "statistics, yet its config has them")
    config_dict = {**config_dict, "pixel_mean": [data_lib.FASHION_MEAN],
                   "pixel_std": [data_lib.FASHION_STD]}
  try:
    config = config_from_dict(config_dict)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{path} holds an invalid config: {e}") from e
  if expect_config is not None and config != expect_config:
    diffs = {k: (v, getattr(expect_config, k)) for k, v in config.to_dict().items()
             if expect_config.to_dict()[k] != v}
    raise CheckpointError(f"{path} was saved for a different model config "
                          f"(field: (saved, expected)) {diffs}")
  infos, digests = meta.get("arrays"), meta.get("buffers")
  ends = _check_layout(infos, digests, path)
  try:
    checkpointer = _local_checkpointer()
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
    if str(buffers[name].dtype) != name or buffers[name].ndim != 1:
      raise CheckpointError(f"{path} is corrupt: the {name} buffer holds "
                            f"{buffers[name].dtype} {buffers[name].shape}")
    if hashlib.sha256(buffers[name].tobytes()).hexdigest() != digest:
      raise CheckpointError(f"{path} is corrupt: the {name} buffer fails its SHA-256 check")
    if len(buffers[name]) != ends[name]:
      raise CheckpointError(f"{path} is corrupt: the {name} buffer holds "
                            f"{len(buffers[name])} values, its arrays {ends[name]}")
  stored_of = lambda info: buffers[info["buffer"]][  # noqa: E731
      info["offset"]:info["offset"] + info["length"]]
  arrays = {name: _decode_array(stored_of(info), info) for name, info in infos.items()
            if "kept_by" not in info}
  for name, info in infos.items():
    if "kept_by" in info:
      mask = arrays[info["kept_by"]]
      if int(mask.sum()) != info["count"]:
        raise CheckpointError(f"{path} is corrupt: array {name} ({info['path']}) keeps "
                              f"{info['count']} values, its mask {int(mask.sum())}")
      arrays[name] = _decode_array(stored_of(info), info, mask)
  used: set[str] = set()
  params = _decode(meta.get("tree"), arrays, "params", used)
  if meta["version"] >= 3:
    if "sites" not in meta:
      raise CheckpointError(f"{path} is corrupt: its 'sites' description is missing")
    site_desc = meta["sites"]
  elif "sites" in meta:
    raise CheckpointError(f"{path} says version {meta['version']}, which has no site "
                          "quantizers, yet carries some: its version field was edited")
  else:
    site_desc = {"dict": {}}
  sites = _decode(site_desc, arrays, "sites", used)
  if not isinstance(sites, dict):
    raise CheckpointError(f"{path}: its site quantizers are a {type(sites).__name__}, "
                          "not a dict")
  if used != set(arrays):
    raise CheckpointError(f"{path}: arrays {sorted(set(arrays) - used)[:5]} are in the "
                          "layout but not in the tree")
  try:
    model_lib.check_params(config, params)
  except ValueError as e:
    raise CheckpointError(f"{path}: the stored tree does not fit its config: {e}") from e
  params = jax.tree_util.tree_map(jnp.asarray, params)
  model = Model(config, params, jax.tree_util.tree_map(jnp.asarray, sites))
  try:
    check_sites(model)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from e
  return model


def check_sites(model: Model) -> None:
  """Raises ValueError naming a site address the model does not have, or a
  site holding something other than a registered quantizer."""
  if not model.sites:
    return
  known = set(model_lib.site_addresses(model.replace(sites={})))
  for address, q in model.sites.items():
    if address not in known:
      raise ValueError(f"site {address!r} does not exist in this model; sites look like "
                       f"{sorted(known)[:2]} ({len(known)} in all)")
    if not dataclasses.is_dataclass(q) or leaves.storable_types().get(
        type(q).__name__) is not type(q):
      raise ValueError(f"site {address} holds a {type(q).__name__}, not a quantizer")
