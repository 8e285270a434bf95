"""Data loading: IDX checks, checksums, npz directories, batching, augmentation."""

import gzip
import pathlib
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, needs_fashion, synthetic_dataset, synthetic_split
from vitjax import data as data_lib
from vitjax.models.inputs import preprocess


def _write_idx(path: pathlib.Path, array: np.ndarray, magic: int, cut: int = 0) -> None:
  header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
  raw = header + array.astype(np.uint8).tobytes()
  with gzip.open(path, "wb") as f:
    f.write(raw[:len(raw) - cut] if cut else raw)


def test_read_idx_good_file(tmp_path):
  images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
  _write_idx(tmp_path / "x.gz", images, 2051)
  np.testing.assert_array_equal(data_lib.read_idx(tmp_path / "x.gz", 2051, 3), images)


def test_read_idx_rejects_truncated_wrong_magic_and_count(tmp_path):
  images = np.zeros((3, 4, 5), np.uint8)
  _write_idx(tmp_path / "cut.gz", images, 2051, cut=7)
  with pytest.raises(data_lib.DatasetError, match="truncated: 53 data bytes"):
    data_lib.read_idx(tmp_path / "cut.gz", 2051, 3)
  _write_idx(tmp_path / "magic.gz", images, 2049)
  with pytest.raises(data_lib.DatasetError, match="magic number 2049, expected 2051"):
    data_lib.read_idx(tmp_path / "magic.gz", 2051, 3)
  with pytest.raises(data_lib.DatasetError, match="holds 3 items, expected 4"):
    data_lib.read_idx(tmp_path / "magic.gz", 2049, 4)
  (tmp_path / "notgz.gz").write_bytes(b"hello")
  with pytest.raises(data_lib.DatasetError, match="not a readable gzip"):
    data_lib.read_idx(tmp_path / "notgz.gz", 2051, 3)


def test_missing_files_name_the_install_command(tmp_path, monkeypatch):
  monkeypatch.setattr(data_lib, "DEBIAN_DIR", tmp_path / "nowhere")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  monkeypatch.delenv(data_lib.ENV_DIR, raising=False)
  with pytest.raises(data_lib.DatasetError, match="apt-get install dataset-fashion-mnist"):
    data_lib.load_fashion_mnist_arrays()
  (tmp_path / "part").mkdir()
  (tmp_path / "part" / "train-images-idx3-ubyte.gz").write_bytes(b"x")
  with pytest.raises(data_lib.DatasetError, match="only part of Fashion-MNIST"):
    data_lib.load_fashion_mnist_arrays(tmp_path / "part")
  (tmp_path / "empty").mkdir()
  with pytest.raises(data_lib.DatasetError, match="holds none of the Fashion-MNIST files"):
    data_lib.load_fashion_mnist_arrays(tmp_path / "empty")


@needs_fashion
def test_altered_or_truncated_fashion_file_is_refused(tmp_path):
  src = data_lib.find_fashion_dir(None)
  for name in data_lib.FASHION_FILES:
    shutil.copy(src / name, tmp_path / name)
  labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
  raw = bytearray(labels.read_bytes())
  raw[-3] ^= 0xFF
  labels.write_bytes(bytes(raw))
  with pytest.raises(data_lib.DatasetError, match="t10k-labels.*SHA-256.*altered or truncated"):
    data_lib.load_fashion_mnist_arrays(tmp_path)
  shutil.copy(src / labels.name, labels)
  images = tmp_path / "train-images-idx3-ubyte.gz"
  images.write_bytes(images.read_bytes()[:1000])
  with pytest.raises(data_lib.DatasetError, match="train-images.*altered or truncated"):
    data_lib.load_fashion_mnist_arrays(tmp_path)


@needs_fashion
def test_real_fashion_mnist_splits():
  ds = data_lib.load("fashion_mnist")
  assert ds.train.images.shape == (55000, 28, 28, 1) and ds.train.images.dtype == np.uint8
  assert len(ds.validation) == 5000 and len(ds.test) == 10000
  assert len(ds.calibration) == 1024 and ds.num_classes == 10
  assert set(np.unique(ds.test.labels)) == set(range(10))
  assert np.bincount(ds.test.labels).tolist() == [1000] * 10
  assert 0.25 < ds.train.images.mean() / 255 < 0.32  # the published pixel mean 0.286


def test_npz_directory_roundtrip_and_errors(tmp_path):
  split = synthetic_split(40)
  np.savez(tmp_path / "train.npz", images=split.images[..., 0], labels=split.labels)
  np.savez(tmp_path / "test.npz", images=split.images[:10, ..., 0], labels=split.labels[:10])
  ds = data_lib.load("npz", tmp_path, validation=4, calibration=4)
  assert ds.train.images.shape == (36, 8, 8, 1)  # 4 held out for validation
  assert len(ds.calibration) == 4 and len(ds.validation) == 4
  assert len(ds.test) == 10
  np.savez(tmp_path / "test.npz", images=split.images[:10], labels=split.labels[:9])
  with pytest.raises(data_lib.DatasetError, match="labels shape"):
    data_lib.load("npz", tmp_path)
  (tmp_path / "test.npz").unlink()
  with pytest.raises(data_lib.DatasetError, match="has no test.npz"):
    data_lib.load("npz", tmp_path)
  with pytest.raises(ValueError, match="needs a data_dir"):
    data_lib.load("npz")
  with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
    data_lib.load("cifar")


def test_teacher_images_join_validation_after_train_and_refuse_other_shapes():
  from vitjax import recipes
  ds = synthetic_dataset()
  assert recipes.TEACHER_RECIPES["tiny"]["with_validation"]
  images = recipes.teacher_images("tiny", ds)
  assert len(images) == len(ds.train) + len(ds.validation)
  np.testing.assert_array_equal(images.images[:len(ds.train)], ds.train.images)
  np.testing.assert_array_equal(images.labels[len(ds.train):], ds.validation.labels)
  assert recipes.teacher_images("s16", ds) is ds.train  # s16 keeps its validation out
  assert recipes.teacher_images("tiny", ds, hold_out_validation=True) is ds.train
  student = recipes.student_images("tiny-student", ds)
  np.testing.assert_array_equal(student.images, images.images)
  assert recipes.student_images("tiny-student", ds, hold_out_validation=True) is ds.train
  assert recipes.student_images("ti16-student", ds) is ds.train
  wide = synthetic_split(4, TINY.replace(image_size=16, patch_size=4))
  with pytest.raises(ValueError, match=r"shape \(8, 8, 1\).*shape \(16, 16, 1\)"):
    ds.train.concat(wide)


def test_npz_refuses_pickled_objects(tmp_path):
  objs = np.array([{"a": 1}], dtype=object)
  np.savez(tmp_path / "train.npz", images=objs, labels=np.zeros(1))
  np.savez(tmp_path / "test.npz", images=objs, labels=np.zeros(1))
  with pytest.raises(data_lib.DatasetError, match="not a readable .npz"):
    data_lib.load_npz_dir(tmp_path)


def test_wrong_channel_count_is_named():
  with pytest.raises(ValueError, match=r"data has 3 channel\(s\) but the model expects channels=1"):
    data_lib.check_compatible((8, 8, 3), 4, TINY)
  with pytest.raises(ValueError, match="data has 12 classes but the model has num_classes=4"):
    data_lib.check_compatible((8, 8, 1), 12, TINY)
  data_lib.check_compatible((8, 8, 1), 4, TINY.replace(channels=3))  # gray -> RGB is fine


def test_batches_resume_at_any_step():
  split = synthetic_split(50)
  full = data_lib.train_batches(split, 8, seed=3)
  first = [next(full) for _ in range(14)]  # crosses an epoch boundary (6 per epoch)
  resumed = data_lib.train_batches(split, 8, seed=3, start_step=9)
  for step in range(9, 14):
    images, labels, index = next(resumed)
    np.testing.assert_array_equal(images, first[step][0])
    np.testing.assert_array_equal(labels, first[step][1])
    np.testing.assert_array_equal(split.images[index], images)
  # One epoch visits 48 distinct images; the next epoch is reshuffled.
  epoch0 = np.concatenate([b[1] for b in first[:6]])
  assert len(epoch0) == 48
  assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first[:6], first[6:12]))


def test_eval_batches_pad_and_count():
  split = synthetic_split(10)
  batches = list(data_lib.eval_batches(split, 4))
  assert [n for _, _, n in batches] == [4, 4, 2]
  assert batches[-1][0].shape == (4, 8, 8, 1)


def test_make_dataset_rejects_oversized_holdout():
  with pytest.raises(ValueError, match="validation=40 and calibration=20 need fewer than 50"):
    data_lib.make_dataset(synthetic_split(50), synthetic_split(5), "s",
                          validation=40, calibration=20)


def test_preprocess_normalizes_with_the_config_statistics_resizes_and_repeats_channels():
  images = jnp.full((2, 8, 8, 1), 255, jnp.uint8)
  cfg = TINY.replace(pixel_mean=(0.25,), pixel_std=(0.5,))
  np.testing.assert_allclose(preprocess(images, cfg), (1.0 - 0.25) / 0.5, rtol=1e-6)
  rgb = TINY.replace(image_size=16, patch_size=4, channels=3, pixel_mean=(0.1, 0.2, 0.3),
                     pixel_std=(0.5, 0.25, 1.0))
  y = preprocess(images, rgb)
  assert y.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(y[0, 0, 0], [(1 - 0.1) / 0.5, (1 - 0.2) / 0.25, 1 - 0.3],
                             rtol=1e-5)


def test_preprocess_gives_the_same_result_for_uint8_and_float_pixels():
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
  cfg = TINY.replace(pixel_mean=(0.3,), pixel_std=(0.4,))
  np.testing.assert_allclose(preprocess(jnp.asarray(images), cfg),
                             preprocess(jnp.asarray(images / 255.0, jnp.float32), cfg),
                             rtol=1e-6, atol=1e-6)


def test_dataset_statistics_come_from_its_own_training_split():
  train, test = synthetic_split(200), synthetic_split(20, seed=1)
  ds = data_lib.make_dataset(train, test, "s", validation=20, calibration=10)
  pixels = ds.train.images.astype(np.float64) / 255
  np.testing.assert_allclose(ds.pixel_mean, [pixels.mean()], rtol=1e-9)
  np.testing.assert_allclose(ds.pixel_std, [pixels.std()], rtol=1e-9)
  assert ds.pixel_mean != (data_lib.FASHION_MEAN,)
  from vitjax import recipes
  cfg = recipes.model_config("tiny", ds)
  assert (cfg.pixel_mean, cfg.pixel_std) == (ds.pixel_mean, ds.pixel_std)


def test_a_stray_label_is_an_error_not_a_huge_head():
  train = synthetic_split(200)
  labels = train.labels.copy()
  labels[7] = 999
  stray = data_lib.Split(train.images, labels)
  with pytest.raises(data_lib.DatasetError, match=r"reach 999 but classes \[4, 5, 6"):
    data_lib.make_dataset(stray, synthetic_split(20, seed=1), "s", validation=20,
                          calibration=10)
  with pytest.raises(data_lib.DatasetError, match="outside 0..9"):
    data_lib.make_dataset(stray, synthetic_split(20, seed=1), "s", validation=20,
                          calibration=10, num_classes=10)
  ds = data_lib.make_dataset(train, synthetic_split(20, seed=1), "s", validation=20,
                             calibration=10, num_classes=12)
  assert ds.num_classes == 12


def test_npz_float_images_must_be_pixels_on_the_unit_scale(tmp_path):
  images = np.random.default_rng(0).normal(size=(20, 8, 8)).astype(np.float32)
  labels = np.arange(20) % 4
  np.savez(tmp_path / "train.npz", images=images, labels=labels)
  np.savez(tmp_path / "test.npz", images=images, labels=labels)
  with pytest.raises(data_lib.DatasetError, match=r"\[0, 1\] scale"):
    data_lib.load_npz_dir(tmp_path)


def test_augment_crops_and_flips_each_image_by_its_own_key():
  x = jnp.arange(3 * 6 * 6, dtype=jnp.float32).reshape(3, 6, 6, 1)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  np.testing.assert_array_equal(data_lib.augment(keys, x, 0, False), x)
  flipped = data_lib.augment(keys, x, 0, True)
  for i in range(3):  # every image is either untouched or mirrored
    assert (np.array_equal(flipped[i], x[i]) or
            np.array_equal(flipped[i], x[i, :, ::-1]))
  # Pixels really change: over 16 images some are mirrored and some crops move.
  many = jnp.tile(x[:1], (16, 1, 1, 1))
  keys16 = jax.random.split(jax.random.PRNGKey(1), 16)
  flips = [not np.array_equal(v, many[0]) for v in data_lib.augment(keys16, many, 0, True)]
  assert 0 < sum(flips) < 16
  crops = data_lib.augment(keys16, many, 2, False)
  assert sum(not np.array_equal(v, many[0]) for v in crops) >= 8
  cropped = data_lib.augment(keys, x, 2, False)
  assert cropped.shape == x.shape
  # A crop of the edge-padded image keeps a 2-pixel-shifted window of the original.
  padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  for i in range(3):
    assert any(np.array_equal(cropped[i], padded[i, r:r + 6, c:c + 6])
               for r in range(5) for c in range(5))
  # The same key gives the same view whatever the batch around it.
  alone = data_lib.augment(keys[1:2], x[1:2], 2, True)
  np.testing.assert_array_equal(alone[0], data_lib.augment(keys, x, 2, True)[1])


@pytest.mark.parametrize("shape, message", [
    ((20, 3, 16, 16), "look channels-first"),
    ((20, 16, 12, 1), "are 16x12; vitjax models take square images"),
])
def test_npz_image_layouts_that_would_be_guessed_are_refused(tmp_path, shape, message):
  images = np.zeros(shape, np.uint8)
  for name in ("train.npz", "test.npz"):
    np.savez(tmp_path / name, images=images, labels=np.arange(20) % 4)
  with pytest.raises(data_lib.DatasetError, match=message):
    data_lib.load_npz_dir(tmp_path)
