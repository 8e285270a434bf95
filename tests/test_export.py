"""Model checkpoints: bit-identical reload, integrity checks, atomic writes."""

import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest

from helpers import TINY
from vitjax import export
from vitjax import model as model_lib


def _images(n=4):
  return jax.random.normal(jax.random.PRNGKey(0), (n, 8, 8, 1))


def _array_files(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in (path / export.ARRAYS_DIR).rglob("*") if p.is_file())


def test_roundtrip_gives_bit_identical_logits(tmp_path):
  m = model_lib.init(TINY.replace(distilled=True), 3)
  disk = export.save_model(m, tmp_path / "m", metadata={"note": "hi"})
  back = export.load_model(tmp_path / "m")
  assert back.config == m.config
  np.testing.assert_array_equal(model_lib.apply(back, _images()), model_lib.apply(m, _images()))
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


def test_existing_path_needs_overwrite(tmp_path):
  m = model_lib.init(TINY, 0)
  export.save_model(m, tmp_path / "m")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    export.save_model(m, tmp_path / "m")
  m2 = model_lib.init(TINY, 1)
  export.save_model(m2, tmp_path / "m", overwrite=True)
  np.testing.assert_array_equal(model_lib.apply(export.load_model(tmp_path / "m"), _images()),
                                model_lib.apply(m2, _images()))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old dirs left


def test_failed_save_leaves_nothing(tmp_path):
  m = model_lib.init(TINY, 0)
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
  m = model_lib.init(TINY, 0)
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
  export.save_model(model_lib.init(TINY, 0), tmp_path / "m")
  with pytest.raises(export.CheckpointError, match=r"different model config .*'dim': \(16, 32\)"):
    export.load_model(tmp_path / "m", expect_config=TINY.replace(dim=32))
  meta_path = tmp_path / "m" / export.META_FILE
  text = meta_path.read_text()
  meta_path.write_text(text[: len(text) // 2])
  with pytest.raises(export.CheckpointError, match="corrupt or truncated"):
    export.load_model(tmp_path / "m")
  meta = json.loads(text)
  meta["config"]["mlp_dim"] = 64  # tree no longer fits the config
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="has shape"):
    export.load_model(tmp_path / "m")
