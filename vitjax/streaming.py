"""Streaming training data for datasets that do not fit in RAM.

`scan_folder` indexes an image folder (`root/<class>/<image>.png|jpg|jpeg`,
classes sorted by name) without decoding it; `ImageFolder` is a grain random-
access source that decodes one image per read (PIL). `Stream` is what
`train.fit` takes in place of an in-memory `data.Split`: a grain `MapDataset`
pipeline that shuffles the indices with a new permutation every epoch
(`MapDataset.shuffle(seed).repeat()`: a pure function of seed and position),
groups them into the same global batches as `data.train_batches`, and lets each
process of a `jax.distributed` run decode only its own rows of every batch.
Its grain iterator state (`get_state` / `set_state`) is saved with every
training checkpoint, so a resumed run reads exactly the batches an
uninterrupted one would.

`folder_statistics` computes a folder's per-channel mean and standard
deviation in one streaming pass over its training images: the model config
keeps them, and no other dataset's constants are ever applied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Iterator, Literal

import grain
import numpy as np
from PIL import Image

from vitjax.data import DatasetError, padded

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# grain decoding threads unless told otherwise (benchmarks/streaming.py: 1 is
# fastest for small PNGs; threads pay for large JPEGs, decoded without the GIL).
READ_THREADS = 4
OnUnreadable = Literal["error", "skip"]
ON_UNREADABLE = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class ImageFolder:
  """An indexed image folder: grain's `RandomAccessDataSource` protocol.

  Attributes:
    root: the folder.
    files: image paths relative to `root`, class by class, sorted.
    labels: (N,) int32 class of each file.
    classes: class (subdirectory) names; label k is `classes[k]`.
    image_size: side every image is resized to (bilinear), or None when all
      images already share one square size.
    channels: 1 (grayscale) or 3 (RGB); images are converted to it.
    skipped: unreadable files left out (`on_unreadable="skip"`).
  """

  root: pathlib.Path
  files: tuple[str, ...]
  labels: np.ndarray
  classes: tuple[str, ...]
  image_size: int
  channels: int
  resize: bool
  skipped: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.files)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    """{"image": (H, W, C) uint8, "label": int32, "index": int32} of file `index`.

    Raises:
      DatasetError: the file cannot be decoded any more (named).
    """
    path = self.root / self.files[index]
    try:
      with Image.open(path) as im:
        im = im.convert("L" if self.channels == 1 else "RGB")
        if self.resize and im.size != (self.image_size, self.image_size):
          im = im.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        image = np.asarray(im, np.uint8)
    except (OSError, ValueError) as e:
      raise DatasetError(f"image {path} cannot be decoded: {e}") from e
    if image.shape[:2] != (self.image_size, self.image_size):
      raise DatasetError(f"image {path} is {image.shape[1]}x{image.shape[0]}, the folder's "
                         f"images {self.image_size}x{self.image_size}; pass image_size= "
                         "to scan_folder to resize them all")
    return {"image": image.reshape(self.image_shape), "label": self.labels[index],
            "index": np.int32(index)}

  def fingerprint(self) -> str:
    """SHA-256 of what defines the data: files, their sizes, labels and the
    decoding settings (not the pixels: reading them all would defeat streaming)."""
    digest = hashlib.sha256(json.dumps(
        {"classes": self.classes, "size": self.image_size, "channels": self.channels,
         "resize": self.resize}).encode())
    for name, label in zip(self.files, self.labels):
      digest.update(f"{name}\0{int(label)}\0{os.path.getsize(self.root / name)}\n".encode())
    return digest.hexdigest()


def scan_folder(root: str | os.PathLike, *, image_size: int | None = None,
                channels: int | None = None,
                on_unreadable: OnUnreadable = "error") -> ImageFolder:
  """Indexes `root/<class>/*.{png,jpg,jpeg}`, checking each file's header and
  integrity (PIL `verify`, no decoding).

  Args:
    image_size: resize every image to this square side; None: the images
      must all have one square size.
    channels: 1 or 3; None: 1 if the first image is grayscale, else 3.
    on_unreadable: "error" refuses a folder with a file that is not a
      readable image; "skip" leaves such files out (listed in `skipped`).

  Raises:
    DatasetError: no class directories, an empty class directory, an
      unreadable file (with "error"), or mixed / non-square sizes without
      `image_size` (each names the files).
    ValueError: bad `image_size`, `channels` or `on_unreadable`.
  """
  if on_unreadable not in ON_UNREADABLE:
    raise ValueError(f"on_unreadable={on_unreadable!r}; choose one of {ON_UNREADABLE}")
  if image_size is not None and (isinstance(image_size, bool) or not isinstance(
      image_size, int) or image_size < 1):
    raise ValueError(f"image_size={image_size!r} must be a positive int or None")
  if channels not in (None, 1, 3):
    raise ValueError(f"channels={channels!r} must be 1, 3 or None")
  root = pathlib.Path(root)
  if not root.is_dir():
    raise DatasetError(f"image folder {root} does not exist or is not a directory")
  classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not classes:
    raise DatasetError(f"image folder {root} has no class subdirectories; expected "
                       "root/<class>/<image>.png|jpg|jpeg")
  files, labels, skipped, sizes = [], [], [], {}
  modes = set()
  for label, name in enumerate(classes):
    entries = sorted(p for p in (root / name).iterdir()
                     if p.is_file() and not p.name.startswith("."))
    if not entries:
      raise DatasetError(f"class directory {root / name} is empty; every class needs at "
                         "least one image (remove the directory or add images)")
    kept = 0
    for path in entries:
      problem, size, mode = _inspect(path)
      if problem is not None:
        if on_unreadable == "error":
          raise DatasetError(f"{path} is not a readable image ({problem}); remove it or "
                             "pass on_unreadable='skip'")
        skipped.append(str(path.relative_to(root)))
        continue
      rel = str(path.relative_to(root))
      files.append(rel)
      labels.append(label)
      sizes.setdefault(size, rel)
      modes.add(mode)
      kept += 1
    if not kept:
      raise DatasetError(f"class directory {root / name} has no readable image")
  if channels is None:
    channels = 1 if modes <= {"L", "1", "I;16", "I", "F"} else 3
  if image_size is None:
    if len(sizes) > 1:
      (a, fa), (b, fb) = list(sizes.items())[:2]
      raise DatasetError(f"the images of {root} have mixed sizes: {fa} is {a[0]}x{a[1]}, "
                         f"{fb} is {b[0]}x{b[1]}; pass image_size= "
                         "to resize them all")
    (w, h), first = next(iter(sizes.items()))
    if w != h:
      raise DatasetError(f"the images of {root} are {w}x{h} ({first}), not square; pass "
                         "image_size= to resize them")
    image_size, resize = w, False
  else:
    resize = True
  return ImageFolder(root, tuple(files), np.asarray(labels, np.int32), tuple(classes),
                     image_size, channels, resize, tuple(skipped))


def _inspect(path: pathlib.Path) -> tuple[str | None, tuple[int, int], str]:
  """(why `path` is not a readable image or None, its size, its mode), from
  one open: the header, then PIL's integrity check (no decoding)."""
  if path.suffix.lower() not in IMAGE_SUFFIXES:
    return f"not a {'/'.join(IMAGE_SUFFIXES)} file", (0, 0), ""
  try:
    with Image.open(path) as im:
      size, mode = im.size, im.mode
      im.verify()
  except Exception as e:  # PIL raises many types for broken files
    return f"{type(e).__name__}: {e}", (0, 0), ""
  return None, size, mode


def folder_statistics(source: ImageFolder, *, max_images: int | None = None
                      ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel (mean, std) of the source's pixels on the [0, 1] scale, in
  one streaming pass (float64 sums) over the first `max_images` (all: None)."""
  n = len(source) if max_images is None else min(max_images, len(source))
  if n < 1:
    raise ValueError(f"max_images={max_images} must be >= 1")
  total = np.zeros(source.channels)
  squares = np.zeros(source.channels)
  for i in range(n):
    x = source[i]["image"].reshape(-1, source.channels).astype(np.float64) / 255.0
    total += x.sum(0)
    squares += (x ** 2).sum(0)
  count = n * source.image_size ** 2
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
  return tuple(float(v) for v in mean), tuple(float(max(v, 1e-6)) for v in std)


@dataclasses.dataclass(frozen=True)
class Stream:
  """Training images streamed from a random-access source through grain.

  Attributes:
    source: an `ImageFolder` (or any grain random-access source whose records
      hold "image", "label" and "index" and which has `image_shape`,
      `classes` and `fingerprint()`).
    num_threads: grain read threads per process.
    prefetch: batches grain decodes ahead (at least `num_threads`).
  """

  source: Any
  num_threads: int = READ_THREADS
  prefetch: int = 2

  def __len__(self) -> int:
    return len(self.source)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.source.image_shape)

  @property
  def num_classes(self) -> int:
    return len(self.source.classes)

  def fingerprint(self) -> str:
    return self.source.fingerprint()

  def batches(self, batch_size: int, seed: int, *, rows: slice = slice(None),
              steps: int | None = None) -> grain.MapDataset:
    """Step s -> this process's `rows` of global batch s: (images, labels, index).

    Batch s holds positions [b * batch_size, (b + 1) * batch_size) of epoch
    e = s // per_epoch's permutation (b = s % per_epoch; the incomplete last
    batch of an epoch is dropped), the same rule as `data.train_batches`.
    """
    n = len(self.source)
    per_epoch = n // batch_size
    if per_epoch < 1:
      raise ValueError(f"batch_size={batch_size} exceeds the {n} training images")
    order = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
    local = range(batch_size)[rows]

    def read(step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
      epoch, b = divmod(step, per_epoch)
      start = epoch * n + b * batch_size
      records = [self.source[int(order[start + j])] for j in local]
      return (np.stack([r["image"] for r in records]),
              np.asarray([r["label"] for r in records], np.int32),
              np.asarray([r["index"] for r in records], np.int32))

    return grain.MapDataset.range(steps if steps is not None else 2 ** 62).map(read)

  def iterator(self, batch_size: int, seed: int, *, rows: slice = slice(None),
               steps: int | None = None, state: dict | None = None
               ) -> grain.DatasetIterator:
    """A grain iterator over `batches`, resumed from `state` (`get_state()`)."""
    it = iter(self.batches(batch_size, seed, rows=rows, steps=steps).to_iter_dataset(
        grain.ReadOptions(num_threads=self.num_threads,
                          prefetch_buffer_size=max(self.prefetch, self.num_threads))))
    if state is not None:
      it.set_state(state)
    return it


def eval_batches(source: ImageFolder, batch_size: int, *,
                 num_threads: int = READ_THREADS
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """In-order batches of every image of `source`, decoded by `num_threads`
  grain threads and padded to `batch_size` (one executable for all): yields
  (images, labels, n_valid), as `data.eval_batches` does for a split in RAM.

  Raises:
    ValueError: `batch_size` or `num_threads` below 1.
  """
  for name, value in (("batch_size", batch_size), ("num_threads", num_threads)):
    if value < 1:
      raise ValueError(f"{name}={value} must be >= 1")
  batches = grain.MapDataset.source(source).batch(batch_size).to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads))
  for batch in batches:
    yield padded(batch["image"], batch["label"], batch_size)
