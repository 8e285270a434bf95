"""Model checkpoints: bit-identical reload, integrity checks, atomic writes."""

import base64
import json
import zlib
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest

from helpers import TINY, noisy_model
from vitjax import export
from vitjax import model as model_lib
from vitjax.transforms import chain, prune, quantize


def _images(n=4):
  return jax.random.normal(jax.random.PRNGKey(0), (n, 8, 8, 1))


def _array_files(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in (path / export.ARRAYS_DIR).rglob("*") if p.is_file())


def _logits(m):
  return np.asarray(model_lib.apply(m, _images()))


def _compressed(seed=3):
  """A distilled model with float, masked, int8 and int4 leaves, all non-trivial."""
  m = noisy_model(TINY.replace(distilled=True), seed)
  return chain(prune.magnitude(0.5, layers=r".*/MlpBlock_3/.*"),
               quantize.weight_only(4, layers=r".*/MlpBlock_3/Dense_1"),
               quantize.dynamic_int8(layers="head", requantize=True))(m)


def _read(path):
  """A checkpoint's description with its layout expanded (as loading sees
  it), unverified."""
  meta = json.loads((path / export.META_FILE).read_text())
  if "layout" in meta:
    meta.update(json.loads(zlib.decompress(base64.b64decode(meta.pop("layout")))))
  return meta


def _write(path, meta):
  """Writes `meta` as `path`'s description as it is (no re-signing), the
  layout compressed for version 4 and later, as `save_model` does."""
  stored = {k: v for k, v in meta.items() if k not in export.LAYOUT_KEYS}
  layout = {k: meta[k] for k in export.LAYOUT_KEYS if k in meta}
  if isinstance(meta.get("version"), int) and meta["version"] >= 4:
    stored["layout"] = base64.b64encode(zlib.compress(json.dumps(layout).encode())).decode()
  else:
    stored.update(layout)
  (path / export.META_FILE).write_text(json.dumps(stored))


def _rewrite(path, edit, *, redigest=True):
  """Applies `edit(meta)` to a checkpoint's description, re-signing it unless
  `redigest` is False (a writer bug, not a hand edit, when re-signed)."""
  meta = _read(path)
  edit(meta)
  if redigest:
    meta[export.DIGEST_KEY] = export.description_digest(meta)
  _write(path, meta)


def test_roundtrip_gives_bit_identical_logits(tmp_path):
  m = noisy_model(TINY.replace(distilled=True), 3)
  assert np.abs(_logits(m)).min() > 1e-3  # the comparison below is not vacuous
  disk = export.save_model(m, tmp_path / "m", metadata={"note": "hi"})
  back = export.load_model(tmp_path / "m")
  assert back.config == m.config
  np.testing.assert_array_equal(_logits(back), _logits(m))
  assert disk == export.disk_bytes(tmp_path / "m")
  # On disk: the arrays (compressed by orbax at most a little) plus small metadata.
  assert 0.5 * model_lib.stored_bytes(m) < disk < model_lib.stored_bytes(m) + 60_000
  assert export.read_metadata(tmp_path / "m")["metadata"] == {"note": "hi"}


def test_int4_pack_unpack_identity_on_all_16_values():
  values = np.arange(-8, 8, dtype=np.int8).astype(ml_dtypes.int4)
  for arr in (values, values[::-1], values[:15], np.tile(values, 3).reshape(6, 8)):
    packed = export.pack_int4(arr)
    assert packed.dtype == np.uint8 and packed.size == (arr.size + 1) // 2
    back = export.unpack_int4(packed, arr.shape)
    assert back.dtype == ml_dtypes.int4
    np.testing.assert_array_equal(back.astype(np.int8), arr.astype(np.int8))
  # Two values share one byte, low nibble first: -8 -> 0x8, 7 -> 0x7.
  assert export.pack_int4(np.array([-8, 7], ml_dtypes.int4)).tolist() == [0x78]


def test_compressed_leaves_roundtrip_on_disk_bit_identically(tmp_path):
  m = _compressed()
  export.save_model(m, tmp_path / "m")
  meta = export.read_metadata(tmp_path / "m")
  codecs = {info["codec"] for info in meta["arrays"].values()}  # layout expanded
  assert codecs == {"raw", "int4-packed", "bits"}  # int4 packed and masks as bits on disk
  back = export.load_model(tmp_path / "m")
  for a, b in zip(jax.tree_util.tree_leaves(m.params), jax.tree_util.tree_leaves(back.params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a).astype(np.float32),
                                  np.asarray(b).astype(np.float32))
  np.testing.assert_array_equal(_logits(back), _logits(m))


def test_existing_path_needs_overwrite(tmp_path):
  m = noisy_model(TINY, 0)
  export.save_model(m, tmp_path / "m")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    export.save_model(m, tmp_path / "m")
  m2 = noisy_model(TINY, 1)
  assert not np.allclose(_logits(m), _logits(m2))
  export.save_model(m2, tmp_path / "m", overwrite=True)
  np.testing.assert_array_equal(_logits(export.load_model(tmp_path / "m")), _logits(m2))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old dirs left


def test_a_failure_mid_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
  old, new = noisy_model(TINY, 0), noisy_model(TINY, 1)
  export.save_model(old, tmp_path / "m")
  # The arrays are written into the temporary directory, then writing the
  # description fails: the old checkpoint must survive, nothing else remain.
  real = pathlib.Path.write_text
  def failing(self, *args, **kwargs):
    if self.name == export.META_FILE:
      assert (self.parent / export.ARRAYS_DIR).exists()  # the failure is mid-write
      raise OSError("disk full")
    return real(self, *args, **kwargs)
  monkeypatch.setattr(pathlib.Path, "write_text", failing)
  with pytest.raises(OSError, match="disk full"):
    export.save_model(new, tmp_path / "m", overwrite=True)
  monkeypatch.setattr(pathlib.Path, "write_text", real)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
  np.testing.assert_array_equal(_logits(export.load_model(tmp_path / "m")), _logits(old))


def test_a_failed_final_rename_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
  old, new = noisy_model(TINY, 0), noisy_model(TINY, 1)
  export.save_model(old, tmp_path / "m")
  real = pathlib.Path.rename
  def failing(self, target):
    if ".tmp-" in self.name:  # the new directory's move into place
      raise OSError("rename failed")
    return real(self, target)
  monkeypatch.setattr(pathlib.Path, "rename", failing)
  with pytest.raises(OSError, match="rename failed"):
    export.save_model(new, tmp_path / "m", overwrite=True)
  monkeypatch.setattr(pathlib.Path, "rename", real)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
  np.testing.assert_array_equal(_logits(export.load_model(tmp_path / "m")), _logits(old))


def test_an_odd_output_path_is_refused_before_any_work(tmp_path):
  (tmp_path / "file").write_text("x")
  m = noisy_model(TINY, 0)
  with pytest.raises(export.CheckpointError, match="which is a file"):
    export.save_model(m, tmp_path / "file" / "sub" / "m")
  with pytest.raises(export.CheckpointError, match="is a file, not a directory"):
    export.check_output_path(tmp_path / "file", overwrite=True)


def test_failed_save_leaves_nothing(tmp_path):
  m = noisy_model(TINY, 0)
  params = jax.tree_util.tree_map(lambda a: a, m.params)
  params["head"]["bias"] = params["head"]["bias"].at[0].set(np.nan)
  with pytest.raises(ValueError, match="NaN"):
    export.save_model(m.replace(params=params), tmp_path / "bad")
  params["head"]["bias"] = object()
  with pytest.raises((export.CheckpointError, ValueError)):
    export.save_model(m.replace(params=params), tmp_path / "bad")
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_files_never_load_wrong_weights(tmp_path, damage):
  """Damage each file of the array store in turn: every load either fails with
  CheckpointError or returns exactly the saved weights (orbax leaves some files
  it never reads again); at least one damaged file must be caught."""
  m = noisy_model(TINY, 0)
  export.save_model(m, tmp_path / "m")
  want = [np.asarray(a) for a in jax.tree_util.tree_leaves(m.params)]
  caught = 0
  for path in _array_files(tmp_path / "m"):
    original = path.read_bytes()
    raw = bytearray(original)
    if damage == "flip":
      raw[len(raw) // 2] ^= 0x55
    else:
      raw = raw[: len(raw) // 3]
    path.write_bytes(bytes(raw))
    try:
      back = export.load_model(tmp_path / "m")
    except export.CheckpointError as e:
      assert "corrupt" in str(e)
      caught += 1
    else:
      for a, b in zip(want, jax.tree_util.tree_leaves(back.params)):
        np.testing.assert_array_equal(a, b)
    path.write_bytes(original)
  assert caught >= 1


def test_bad_metadata_and_other_config_are_refused(tmp_path):
  with pytest.raises(export.CheckpointError, match="vitjax.json is missing"):
    export.load_model(tmp_path)
  export.save_model(noisy_model(TINY, 0), tmp_path / "m")
  with pytest.raises(export.CheckpointError, match=r"different model config .*'dim': \(16, 32\)"):
    export.load_model(tmp_path / "m", expect_config=TINY.replace(dim=32))
  meta_path = tmp_path / "m" / export.META_FILE
  text = meta_path.read_text()
  meta_path.write_text(text[: len(text) // 2])
  with pytest.raises(export.CheckpointError, match="corrupt or truncated"):
    export.load_model(tmp_path / "m")
  meta_path.write_text(text)
  _rewrite(tmp_path / "m", lambda meta: meta["config"].update(mlp_dim=64))
  with pytest.raises(export.CheckpointError, match="does not fit its config.*has shape"):
    export.load_model(tmp_path / "m")


def _set(path, value):
  """An edit that sets meta[path[0]][path[1]]... to value."""
  def edit(meta):
    node = meta
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value(node[path[-1]]) if callable(value) else value
  return edit


def _first_leaf_node(meta):
  """The description node of the first compressed leaf of the tree."""
  def walk(node):
    if isinstance(node, dict) and "type" in node:
      return node
    children = (node.get("dict") or {}).values() if isinstance(node, dict) else []
    for child in children:
      found = walk(child)
      if found:
        return found
    return None
  return walk(meta["tree"])


def _edit_leaf(edit):
  return lambda meta: edit(_first_leaf_node(meta))


# Each integrity field in turn, re-signed so that the field's own check (not
# the description digest) must catch it.
TAMPERING = {
    "buffer digest": (_set(["buffers", "float32"], "0" * 64), "float32 buffer fails its SHA-256"),
    "buffer list": (lambda m: m["buffers"].pop("int8"), "array a.* lies in buffer 'int8'"),
    "extra buffer": (_set(["buffers", "int16"], "0" * 64), r"buffers \['int16'\] are missing"),
    "offset": (_set(["arrays", "a1", "offset"], lambda v: v + 1), "has offset"),
    "length": (_set(["arrays", "a1", "length"], lambda v: v - 1), "has length"),
    "dtype": (_set(["arrays", "a0", "dtype"], "float16"), "lies in buffer 'float32'"),
    "codec": (_set(["arrays", "a0", "codec"], "zip"), "unknown codec 'zip'"),
    "codec for the dtype": (_set(["arrays", "a0", "codec"], "bits"),
                            "stored with codec 'raw', not 'bits'"),
    "shape": (_set(["arrays", "a0", "shape"], lambda v: v[::-1] + [1]), "has length|has shape"),
    "version": (_set(["version"], 99), "version 99"),
    "format": (_set(["format"], "other"), "format 'other'"),
    "leaf type": (_edit_leaf(_set(["type"], "Bogus")), "leaf type 'Bogus'"),
    "leaf static field": (_edit_leaf(_set(["static", "mode"], "x")), "static"),
    "static value": (lambda m: _set_static(m, "activations", "sometimes"),
                     "activations='sometimes'"),
    "array reference": (lambda m: _retarget_first_array(m), "a second time|not in the tree"),
    "config": (_set(["config", "dim"], -1), "invalid config"),
}


def _set_static(meta, name, value):
  def walk(node):
    if isinstance(node, dict):
      if name in node.get("static", {}):
        node["static"][name] = value
        return True
      return any(walk(v) for v in node.values() if isinstance(v, (dict, list)))
    if isinstance(node, list):
      return any(walk(v) for v in node)
    return False
  assert walk(meta["tree"])


def _retarget_first_array(meta):
  refs = []
  def walk(node):
    if isinstance(node, dict):
      if "array" in node:
        refs.append(node)
      for v in node.values():
        walk(v)
    elif isinstance(node, list):
      for v in node:
        walk(v)
  walk(meta["tree"])
  refs[1]["array"] = refs[0]["array"]


@pytest.mark.parametrize("field", sorted(TAMPERING))
def test_each_tampered_integrity_field_is_named(tmp_path, field):
  export.save_model(_compressed(), tmp_path / "m")
  edit, message = TAMPERING[field]
  _rewrite(tmp_path / "m", edit)
  with pytest.raises(export.CheckpointError, match=message):
    export.load_model(tmp_path / "m")


def test_a_hand_edit_fails_the_description_digest(tmp_path):
  export.save_model(_compressed(), tmp_path / "m")
  _rewrite(tmp_path / "m", _set(["metadata"], {"note": "edited"}), redigest=False)
  with pytest.raises(export.CheckpointError, match="description_sha256 check"):
    export.load_model(tmp_path / "m")
  _rewrite(tmp_path / "m", lambda meta: meta.pop(export.DIGEST_KEY), redigest=False)
  with pytest.raises(export.CheckpointError, match="description_sha256 is missing"):
    export.load_model(tmp_path / "m")


def _all_paths(node, prefix=()):
  """Key paths of every scalar in a JSON tree."""
  if isinstance(node, dict):
    for k, v in node.items():
      yield from _all_paths(v, prefix + (k,))
  elif isinstance(node, list):
    for i, v in enumerate(node):
      yield from _all_paths(v, prefix + (i,))
  else:
    yield prefix


def _mutations(value, rng):
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + int(rng.choice([-2, -1, 1, 2, 7]))
  if isinstance(value, float):
    return value * 1.5 + 0.1
  if isinstance(value, str):
    return rng.choice([value + "x", value[:-1], "float16", "int4", "static", ""])
  return 0


@pytest.mark.parametrize("redigest", [False, True])
def test_fuzzed_descriptions_fail_clearly_or_load_the_same_model(tmp_path, redigest):
  """Random edits of the description: a CheckpointError, or exactly the saved
  logits; never another exception and never a silently different model.
  Unsigned edits must all fail the digest; re-signed ones exercise the layout
  checks (where an edit can still describe another valid model, e.g. a static
  field's other legal value, the test accepts only a CheckpointError or the
  same logits, so such an edit must have been caught)."""
  m = _compressed()
  export.save_model(m, tmp_path / "m")
  want = _logits(m)
  original = _read(tmp_path / "m")
  paths = [p for p in _all_paths(original) if p and p[0] not in ("metadata", export.DIGEST_KEY)]
  rng = np.random.default_rng(0)
  outcomes = {"error": 0, "same": 0}
  for trial in range(60):
    meta = json.loads(json.dumps(original))
    path = paths[rng.integers(len(paths))]
    node = meta
    for key in path[:-1]:
      node = node[key]
    new = _mutations(node[path[-1]], rng)
    while new == node[path[-1]]:
      new = _mutations(node[path[-1]], rng)
    node[path[-1]] = new
    if redigest:
      meta[export.DIGEST_KEY] = export.description_digest(meta)
    _write(tmp_path / "m", meta)
    try:
      back = export.load_model(tmp_path / "m")
    except export.CheckpointError:
      outcomes["error"] += 1
      continue
    np.testing.assert_array_equal(_logits(back), want, err_msg=f"edit of {path}")
    outcomes["same"] += 1
  if not redigest:
    assert outcomes == {"error": 60, "same": 0}
  assert outcomes["error"] > 30


def test_version_1_checkpoints_load_with_the_fashion_statistics(tmp_path):
  m = noisy_model(TINY, 0)
  export.save_model(m, tmp_path / "m")
  def to_v1(meta):
    meta["version"] = 1
    meta.pop(export.DIGEST_KEY)
    meta.pop("sites")
    meta["config"].pop("pixel_mean")
    meta["config"].pop("pixel_std")
  _rewrite(tmp_path / "m", to_v1, redigest=False)
  back = export.load_model(tmp_path / "m")
  assert back.config.pixel_mean == (0.2860,) and back.config.pixel_std == (0.3530,)


def test_masked_weights_store_only_their_kept_values(tmp_path):
  from vitjax import leaves
  from vitjax import model as model_lib
  m = noisy_model(TINY, 2)
  variants = {"fp32": m, "pruned": prune.magnitude(0.5)(m),
              "pruned-int8": quantize.weight_only(8)(prune.magnitude(0.5)(m)),
              "pruned-int4": quantize.weight_only(4)(prune.n_m(2, 4)(m))}
  sizes = {}
  for name, v in variants.items():
    export.save_model(v, tmp_path / name)
    meta = _read(tmp_path / name)
    kept = [i for i in meta["arrays"].values() if "kept_by" in i]
    if name != "fp32":
      # every pruned kernel (and, quantized, its codes) lies in the layout as kept values
      masks = [leaf for leaf in jax.tree_util.tree_leaves(v.params, is_leaf=leaves.is_compressed)
               if isinstance(leaf, leaves.Masked)]
      assert len(kept) == len(masks) > 0
      for info in kept:
        assert info["count"] == int(np.prod(info["shape"])) // 2
        assert meta["arrays"][info["kept_by"]]["dtype"] == "bool"
    back = export.load_model(tmp_path / name)
    for a, b in zip(jax.tree_util.tree_leaves(v.params), jax.tree_util.tree_leaves(back.params)):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    np.testing.assert_array_equal(_logits(back), _logits(v))
    sizes[name] = sum(info["length"] * np.dtype(info["buffer"]).itemsize
                      for info in meta["arrays"].values())
    assert sizes[name] == model_lib.stored_bytes(v) or name == "fp32"
  # values + 1 bit per value, against 32 bits: about 0.53 of the kernels' bytes
  assert sizes["pruned"] < 0.6 * sizes["fp32"]
  assert sizes["pruned-int8"] < 0.6 * sizes["pruned"]


def test_masked_values_that_are_not_zero_outside_the_mask_are_stored_dense(tmp_path):
  from vitjax import leaves
  m = prune.magnitude(0.5)(noisy_model(TINY, 2))
  # a hand-built leaf whose pruned entries still hold values: stored whole,
  # so the tree reloads bit-identically
  params = jax.tree_util.tree_map(
      lambda x: leaves.Masked(x.w + 1.0, x.mask) if isinstance(x, leaves.Masked) else x,
      m.params, is_leaf=leaves.is_compressed)
  m = m.replace(params=params)
  export.save_model(m, tmp_path / "m")
  assert not any("kept_by" in i for i in _read(tmp_path / "m")["arrays"].values())
  back = export.load_model(tmp_path / "m")
  for a, b in zip(jax.tree_util.tree_leaves(m.params), jax.tree_util.tree_leaves(back.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("edit, message", [
    (lambda i: i.update(count=i["count"] + 1), "has length|keeps"),
    (lambda i: i.update(kept_by="a0"), "not a boolean array"),
    (lambda i: i.update(count=-1), "kept count"),
])
def test_a_tampered_kept_layout_is_named(tmp_path, edit, message):
  export.save_model(prune.magnitude(0.5)(noisy_model(TINY, 2)), tmp_path / "m")
  def change(meta):
    edit(next(i for i in meta["arrays"].values() if "kept_by" in i))
  _rewrite(tmp_path / "m", change)
  with pytest.raises(export.CheckpointError, match=message):
    export.load_model(tmp_path / "m")
