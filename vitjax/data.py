"""Datasets: Fashion-MNIST from local files, users' own `.npz` directories.

Nothing here downloads. Fashion-MNIST is looked up in the directory the caller
names, then `$VITJAX_DATA_DIR`, then the user cache
(`$XDG_CACHE_HOME/vitjax/fashion-mnist`, default `~/.cache/...`), then the
Debian package's path `/usr/share/datasets/fashion-mnist`; every file's IDX
header, counts and SHA-256 are checked.

Images stay uint8 (N, H, W, C) (or float pixels on the [0, 1] scale) in host
memory; batches are cut by a seeded permutation per epoch, so any step of any
epoch can be rebuilt exactly (that is what makes resumed training
bit-identical). Every `Dataset` carries the per-channel pixel statistics of
its training split, which `recipes.model_config` copies into the model config;
normalization (`vitjax.models.inputs.preprocess`) and augmentation (`augment`)
run on the device inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pathlib
import struct
import typing
from typing import Any, Iterator, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEBIAN_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "VITJAX_DATA_DIR"
INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
    f"or copy the four original .gz files into a directory and pass it with "
    f"--data-dir or ${ENV_DIR}")

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# name -> (IDX magic, item count, SHA-256 of the .gz file)
FASHION_FILES = {
    "train-images-idx3-ubyte.gz": (2051, 60000,
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
    "train-labels-idx1-ubyte.gz": (2049, 60000,
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
    "t10k-images-idx3-ubyte.gz": (2051, 10000,
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
    "t10k-labels-idx1-ubyte.gz": (2049, 10000,
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
}

# Fashion-MNIST's training-set pixel mean and standard deviation on the [0, 1]
# scale (the published figures); other datasets get theirs from their own
# training split (`pixel_statistics`).
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


class DatasetError(Exception):
  """A dataset file is missing, altered, truncated or of the wrong shape."""


Origin = Literal["train", "test", "mixed", "unknown"]
ORIGINS: tuple[str, ...] = typing.get_args(Origin)


@dataclasses.dataclass(frozen=True)
class Split:
  """Images (N, H, W, C) uint8 or float32, int32 labels (N,), and where the
  images come from: "train" (training images, or held out from them), "test",
  "mixed" (joined from both) or "unknown"."""

  images: np.ndarray
  labels: np.ndarray
  origin: Origin = "unknown"

  def __post_init__(self) -> None:
    if self.origin not in ORIGINS:
      raise ValueError(f"Split.origin={self.origin!r}; choose one of {ORIGINS}")

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, index: np.ndarray | slice) -> Split:
    return Split(self.images[index], self.labels[index], self.origin)

  def concat(self, other: Split) -> Split:
    """This split's examples followed by `other`'s (same image shape and dtype).

    Raises:
      ValueError: the two splits hold images of different shapes or dtypes.
    """
    if (self.images.shape[1:] != other.images.shape[1:]
        or self.images.dtype != other.images.dtype):
      raise ValueError(
          f"cannot join images of shape {self.images.shape[1:]} ({self.images.dtype}) "
          f"with images of shape {other.images.shape[1:]} ({other.images.dtype})")
    return Split(np.concatenate([self.images, other.images]),
                 np.concatenate([self.labels, other.labels]),
                 self.origin if self.origin == other.origin else "mixed")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train / validation / calibration / test splits of one dataset.

  `calibration` is drawn from the training images (never from test), for
  post-training quantization; `validation` is held out of `train`.
  `pixel_mean` and `pixel_std` are per-channel statistics of the training
  images on the [0, 1] scale.
  """

  name: str
  train: Split
  validation: Split
  calibration: Split
  test: Split
  num_classes: int
  pixel_mean: tuple[float, ...]
  pixel_std: tuple[float, ...]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train.images.shape[1:])


# ------------------------------------------------------------------ loading


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
  """Directories searched for Fashion-MNIST, in order."""
  dirs = []
  if data_dir:
    dirs.append(pathlib.Path(data_dir))
  if os.environ.get(ENV_DIR):
    dirs.append(pathlib.Path(os.environ[ENV_DIR]))
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  dirs.append(pathlib.Path(cache) / "vitjax" / "fashion-mnist")
  dirs.append(DEBIAN_DIR)
  return dirs


def find_fashion_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
  """The first searched directory holding all four Fashion-MNIST files.

  Raises:
    DatasetError: none does (the message says how to install them), or one
      holds only some of them.
  """
  searched = candidate_dirs(data_dir)
  if data_dir and not any((pathlib.Path(data_dir) / f).exists() for f in FASHION_FILES):
    raise DatasetError(
        f"--data-dir {data_dir} holds none of the Fashion-MNIST files "
        f"{sorted(FASHION_FILES)}; {INSTALL_HINT}")
  for d in searched:
    present = [f for f in FASHION_FILES if (d / f).exists()]
    if len(present) == len(FASHION_FILES):
      return d
    if present:
      missing = sorted(set(FASHION_FILES) - set(present))
      raise DatasetError(f"{d} holds only part of Fashion-MNIST: {missing} missing; "
                         f"{INSTALL_HINT}")
  raise DatasetError(
      "Fashion-MNIST not found in any of " + ", ".join(map(str, searched)) +
      f"; {INSTALL_HINT}")


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def read_idx(path: pathlib.Path, magic: int, count: int) -> np.ndarray:
  """Returns the uint8 array of a gzipped IDX file after checking its header.

  Raises:
    DatasetError: bad gzip stream, wrong magic number, count, or length.
  """
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DatasetError(f"{path} is not a readable gzip file ({e}); {INSTALL_HINT}") from e
  if len(raw) < 8:
    raise DatasetError(f"{path} is truncated: {len(raw)} bytes, no IDX header")
  got_magic, got_count = struct.unpack(">II", raw[:8])
  if got_magic != magic:
    raise DatasetError(f"{path} has IDX magic number {got_magic}, expected {magic}")
  if got_count != count:
    raise DatasetError(f"{path} holds {got_count} items, expected {count}")
  ndim = magic & 0xFF
  dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
  header = 4 + 4 * ndim
  if len(raw) - header != int(np.prod(dims)):
    raise DatasetError(
        f"{path} is truncated: {len(raw) - header} data bytes for shape {dims}")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_fashion_mnist_arrays(data_dir: str | os.PathLike | None = None,
                              ) -> tuple[Split, Split]:
  """Returns the (train, test) splits of Fashion-MNIST, checked.

  Raises:
    DatasetError: files missing (with the command that installs them), or a
      file whose SHA-256, IDX header, item count or length is wrong.
  """
  root = find_fashion_dir(data_dir)
  arrays = {}
  for name, (magic, count, sha) in FASHION_FILES.items():
    path = root / name
    digest = _sha256(path)
    if digest != sha:
      raise DatasetError(
          f"{path} has SHA-256 {digest}, expected {sha}: the file is altered or "
          f"truncated; reinstall it (`sudo apt-get install --reinstall "
          f"dataset-fashion-mnist`) or copy a fresh original")
    arrays[name] = read_idx(path, magic, count)
  train = Split(arrays["train-images-idx3-ubyte.gz"][..., None],
                arrays["train-labels-idx1-ubyte.gz"].astype(np.int32))
  test = Split(arrays["t10k-images-idx3-ubyte.gz"][..., None],
               arrays["t10k-labels-idx1-ubyte.gz"].astype(np.int32))
  return train, test


def _npz_split(path: pathlib.Path) -> Split:
  try:
    with np.load(path, allow_pickle=False) as f:
      if "images" not in f or "labels" not in f:
        raise DatasetError(f"{path} must hold arrays 'images' and 'labels', has {list(f)}")
      images, labels = f["images"], f["labels"]
  except (ValueError, OSError) as e:
    raise DatasetError(f"{path} is not a readable .npz file ({e})") from e
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise DatasetError(f"{path}: images must be (N, H, W) or (N, H, W, C), got {images.shape}")
  if images.shape[-1] > 4 and images.shape[1] in (1, 3, 4):
    raise DatasetError(f"{path}: images of shape {images.shape} look channels-first "
                       "(N, C, H, W); store them as (N, H, W, C), e.g. with "
                       "np.transpose(images, (0, 2, 3, 1))")
  if images.shape[1] != images.shape[2]:
    raise DatasetError(f"{path}: images are {images.shape[1]}x{images.shape[2]}; vitjax "
                       "models take square images: crop or resize them first")
  if labels.shape != (images.shape[0],):
    raise DatasetError(f"{path}: labels shape {labels.shape} does not match "
                       f"{images.shape[0]} images")
  if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
    raise DatasetError(f"{path}: labels must be non-negative integers")
  if images.dtype != np.uint8:
    images = images.astype(np.float32)
    if not np.isfinite(images).all():
      raise DatasetError(f"{path}: images hold NaN or inf")
    lo, hi = float(images.min(initial=0.0)), float(images.max(initial=0.0))
    if lo < 0 or hi > 1:
      raise DatasetError(
          f"{path}: float images must be pixel values on the [0, 1] scale, got values "
          f"in [{lo:.4g}, {hi:.4g}]; store uint8 pixels (0..255), or divide by 255 (do "
          "not normalize: the model config holds the statistics)")
  return Split(images, labels.astype(np.int32))


def load_npz_dir(path: str | os.PathLike) -> tuple[Split, Split]:
  """Returns (train, test) from `path/train.npz` and `path/test.npz`.

  Each file holds `images` (uint8 0..255, or float pixels in [0, 1], shape
  (N, H, W) or (N, H, W, C)) and integer `labels` (N,). Files are read with
  `allow_pickle=False`.

  Raises:
    DatasetError: a file is missing, unreadable, or its arrays disagree.
  """
  root = pathlib.Path(path)
  splits = []
  for name in ("train.npz", "test.npz"):
    if not (root / name).exists():
      raise DatasetError(f"{root} has no {name}; an npz dataset directory needs "
                         "train.npz and test.npz with arrays 'images' and 'labels'")
    splits.append(_npz_split(root / name))
  train, test = splits
  if train.images.shape[1:] != test.images.shape[1:]:
    raise DatasetError(f"train images {train.images.shape[1:]} and test images "
                       f"{test.images.shape[1:]} differ in shape")
  return train, test


def pixel_statistics(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel (mean, std) of (N, H, W, C) pixels on the [0, 1] scale.

  A channel of constant value has no spread to scale by: its std is given as
  1, so normalization only shifts it.

  Raises:
    ValueError: no images.
  """
  if len(images) == 0:
    raise ValueError("pixel statistics need at least one image")
  scale = 255.0 if images.dtype == np.uint8 else 1.0
  total = np.zeros(images.shape[-1])
  total_sq = np.zeros(images.shape[-1])
  for start in range(0, len(images), 4096):
    part = images[start:start + 4096].astype(np.float64) / scale
    total += part.sum(axis=(0, 1, 2))
    total_sq += (part ** 2).sum(axis=(0, 1, 2))
  count = images.size / images.shape[-1]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
  std = np.where(std > 1e-12, std, 1.0)
  return tuple(float(m) for m in mean), tuple(float(v) for v in std)


def infer_num_classes(labels: np.ndarray) -> int:
  """max(labels) + 1, once every class 0..max has a training example.

  Raises:
    DatasetError: some class below the largest label has no example: a stray
      label would otherwise build a head of that size silently.
  """
  present = np.unique(labels)
  k = int(present[-1]) + 1
  if len(present) != k:
    missing = sorted(set(range(k)) - set(present.tolist()))
    raise DatasetError(
        f"the training labels reach {k - 1} but classes {missing[:10]}"
        f"{'...' if len(missing) > 10 else ''} ({len(missing)} of {k}) have no example; "
        "a stray label? Fix the labels or give the class count (num_classes=, CLI "
        "--num-classes)")
  return k


def make_dataset(train: Split, test: Split, name: str, *, validation: int | None = None,
                 calibration: int | None = None, seed: int = 0,
                 num_classes: int | None = None,
                 pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None
                 ) -> Dataset:
  """Holds out `validation` training images and draws `calibration` from the rest.

  By default validation is min(5000, N/10) and calibration min(1024, N/10) of
  the N training images. `num_classes` defaults to `infer_num_classes` of the
  training labels; `pixel_stats` (mean, std) to `pixel_statistics` of the
  training images (after the validation images are held out).

  Raises:
    ValueError: the training split is too small for the held-out sizes, or
      num_classes < 1.
    DatasetError: a label outside 0..num_classes-1, or classes without
      examples when num_classes is inferred.
  """
  n = len(train)
  validation = min(5000, n // 10) if validation is None else validation
  calibration = min(1024, max(1, n // 10)) if calibration is None else calibration
  if validation < 0 or calibration < 1 or validation + calibration >= n:
    raise ValueError(
        f"validation={validation} and calibration={calibration} need fewer than "
        f"{n} training images together (validation >= 0, calibration >= 1)")
  if num_classes is None:
    num_classes = infer_num_classes(train.labels)
  elif num_classes < 1:
    raise ValueError(f"num_classes={num_classes} must be >= 1")
  for split_name, split in (("training", train), ("test", test)):
    if len(split) and int(split.labels.max()) >= num_classes:
      raise DatasetError(f"the {split_name} labels reach {int(split.labels.max())}, outside "
                         f"0..{num_classes - 1} (num_classes={num_classes})")
  train = dataclasses.replace(train, origin="train")
  test = dataclasses.replace(test, origin="test")
  order = np.random.default_rng(seed).permutation(n)
  val_idx, train_idx = np.sort(order[:validation]), np.sort(order[validation:])
  kept = train.take(train_idx)
  calib_idx = np.sort(np.random.default_rng(seed + 1).permutation(len(kept))[:calibration])
  mean, std = pixel_stats if pixel_stats is not None else pixel_statistics(kept.images)
  return Dataset(name, kept, train.take(val_idx), kept.take(calib_idx), test,
                 num_classes, tuple(float(m) for m in mean), tuple(float(s) for s in std))


def load(name: str = "fashion_mnist", data_dir: str | os.PathLike | None = None,
         **options: Any) -> Dataset:
  """Loads a dataset by name: 'fashion_mnist', or 'npz' (needs `data_dir`).

  `options` go to `make_dataset` (split sizes, seed, num_classes,
  pixel_stats); Fashion-MNIST uses its published training-set statistics.

  Raises:
    ValueError: unknown name, or 'npz' without `data_dir`.
    DatasetError: see `load_fashion_mnist_arrays`, `load_npz_dir` and
      `make_dataset`.
  """
  if name == "fashion_mnist":
    train, test = load_fashion_mnist_arrays(data_dir)
    options.setdefault("pixel_stats", ((FASHION_MEAN,), (FASHION_STD,)))
  elif name == "npz":
    if not data_dir:
      raise ValueError("dataset 'npz' needs a data_dir holding train.npz and test.npz")
    train, test = load_npz_dir(data_dir)
  else:
    raise ValueError(f"unknown dataset {name!r}; choose 'fashion_mnist' or 'npz'")
  return make_dataset(train, test, name, **options)


def check_compatible(image_shape: tuple[int, ...], num_classes: int,
                     config) -> None:
  """Raises ValueError if data of this shape cannot feed a model of `config`.

  Square images of another size are resized to `config.image_size` (the CLI
  prints so); a single channel may be repeated to 3, but other channel counts
  must match exactly.
  """
  channels = image_shape[-1]
  if len(image_shape) != 3 or image_shape[0] != image_shape[1]:
    raise ValueError(f"images of shape {tuple(image_shape)} are not square (H, W, C); "
                     "crop or resize them first")
  if channels != config.channels and not (channels == 1 and config.channels == 3):
    raise ValueError(
        f"data has {channels} channel(s) but the model expects channels="
        f"{config.channels}; use a model with channels={channels}")
  if num_classes > config.num_classes:
    raise ValueError(
        f"data has {num_classes} classes but the model has num_classes="
        f"{config.num_classes}")


# ---------------------------------------------------------------- batching


def steps_per_epoch(n: int, batch_size: int) -> int:
  """Full batches per epoch (the last partial batch is dropped in training)."""
  if batch_size < 1 or batch_size > n:
    raise ValueError(f"batch_size={batch_size} must be in 1..{n} (the split size)")
  return n // batch_size


def train_batches(split: Split, batch_size: int, seed: int, start_step: int = 0
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Endless training batches `(images, labels, image indices)` from `start_step`.

  Epoch e uses permutation `default_rng([seed, e])`, so the batch of step s is
  the same whether the run started at 0 or resumed at s.
  """
  per_epoch = steps_per_epoch(len(split), batch_size)
  step = start_step
  while True:
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(split))
    for i in range(offset, per_epoch):
      idx = np.sort(order[i * batch_size:(i + 1) * batch_size])
      yield split.images[idx], split.labels[idx], idx.astype(np.int32)
    step = (epoch + 1) * per_epoch


def eval_batches(split: Split, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """In-order batches padded to `batch_size`; yields (images, labels, n_valid)."""
  for start in range(0, len(split), batch_size):
    yield padded(split.images[start:start + batch_size],
                 split.labels[start:start + batch_size], batch_size)


def padded(images: np.ndarray, labels: np.ndarray, batch_size: int
           ) -> tuple[np.ndarray, np.ndarray, int]:
  """(images, labels, n_valid): a batch of n_valid <= batch_size examples with its
  last example repeated up to `batch_size` (one executable for every batch)."""
  n = len(labels)
  if n < batch_size:
    pad = batch_size - n
    images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
    labels = np.concatenate([labels, np.repeat(labels[-1:], pad, 0)])
  return images, labels, n


# ----------------------------------------------------- on-device transforms


def augment(keys: jax.Array, images: jax.Array, pad: int = 2,
            flip: bool = True) -> jax.Array:
  """Random crop (after `pad` pixels of edge padding) and horizontal flip,
  drawn for each image from its own key (`keys`: one PRNG key per image)."""
  _, h, w, c = images.shape

  def one(key: jax.Array, img: jax.Array) -> jax.Array:
    crop_key, flip_key = jax.random.split(key)
    if pad:
      padded = jnp.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
      off = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)
      img = jax.lax.dynamic_slice(padded, (off[0], off[1], 0), (h, w, c))
    if flip:
      img = jnp.where(jax.random.bernoulli(flip_key), img[:, ::-1, :], img)
    return img

  return jax.vmap(one)(keys, images)
