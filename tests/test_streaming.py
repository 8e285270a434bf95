"""The streaming image-folder loader (grain): indexing, decoding, per-epoch
shuffling, per-process rows, iterator-state resume, training with it, its
statistics, and its refusals of bad folders."""

import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from helpers import MINI_STUDENT, TINY, synthetic_split
from vitjax import cli, evaluate, export, sharding, streaming, train
from vitjax import model as model_lib
from vitjax.data import DatasetError, Split
from vitjax.models import config as config_lib


def write_folder(root: pathlib.Path, n: int = 48, size: int = 8,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Writes synthetic images as PNGs in root/class_k/; returns (images, labels)
  in the folder's sorted file order."""
  split = synthetic_split(n, seed=seed)
  order = []
  for i, (img, label) in enumerate(zip(split.images, split.labels)):
    d = root / f"class_{label}"
    d.mkdir(parents=True, exist_ok=True)
    name = f"img_{i:04d}.png"
    Image.fromarray(img[..., 0]).resize((size, size)).save(d / name)
    order.append((f"class_{label}/{name}", i))
  order.sort()
  idx = np.asarray([i for _, i in order])
  return split.images[idx], split.labels[idx]


def test_folder_decodes_the_written_pixels(tmp_path):
  images, labels = write_folder(tmp_path)
  folder = streaming.scan_folder(tmp_path)
  assert folder.classes == ("class_0", "class_1", "class_2", "class_3")
  assert folder.image_shape == (8, 8, 1) and len(folder) == 48
  np.testing.assert_array_equal(folder.labels, labels)
  for i in (0, 17, 47):
    rec = folder[i]
    np.testing.assert_array_equal(rec["image"], images[i])
    assert rec["label"] == labels[i] and rec["index"] == i
  # Statistics from the training images themselves, not another dataset's.
  mean, std = streaming.folder_statistics(folder)
  x = images.astype(np.float64) / 255
  np.testing.assert_allclose(mean, [x.mean()], rtol=1e-9)
  np.testing.assert_allclose(std, [x.std()], rtol=1e-6)


def test_eval_batches_read_every_image_in_order_and_pad_the_last(tmp_path):
  images, labels = write_folder(tmp_path, n=23)
  folder = streaming.scan_folder(tmp_path)
  batches = list(streaming.eval_batches(folder, 10, num_threads=2))
  assert [n for _, _, n in batches] == [10, 10, 3]
  assert all(b[0].shape == (10, 8, 8, 1) and len(b[1]) == 10 for b in batches)
  np.testing.assert_array_equal(np.concatenate([b[0][:n] for b in batches for n in [b[2]]]),
                                images)
  np.testing.assert_array_equal(np.concatenate([b[1][:n] for b in batches for n in [b[2]]]),
                                labels)
  # The padding repeats the last image, as the in-RAM eval_batches does.
  np.testing.assert_array_equal(batches[-1][0][3:], np.repeat(images[-1:], 7, 0))
  for kwargs in ({"batch_size": 0}, {"batch_size": 4, "num_threads": 0}):
    with pytest.raises(ValueError, match="must be >= 1"):
      list(streaming.eval_batches(folder, **kwargs))


def test_epochs_are_permutations_processes_split_rows_and_resume_is_exact(tmp_path):
  write_folder(tmp_path)
  stream = streaming.Stream(streaming.scan_folder(tmp_path), num_threads=2)
  straight = [tuple(b) for b in stream.iterator(10, seed=3, steps=12)]
  # 48 images, batches of 10: 4 per epoch, 8 images dropped per epoch.
  for e in range(3):
    seen = np.concatenate([b[2] for b in straight[4 * e:4 * e + 4]])
    assert len(set(seen.tolist())) == 40
  assert not np.array_equal(straight[0][2], straight[4][2])  # a new order each epoch
  # Two processes read the two halves of each global batch.
  halves = [list(stream.iterator(10, seed=3, rows=slice(lo, lo + 5), steps=12))
            for lo in (0, 5)]
  for s in range(12):
    np.testing.assert_array_equal(np.concatenate([halves[0][s][2], halves[1][s][2]]),
                                  straight[s][2])
  # Stop after 5 batches, keep the grain state, resume: the same batches follow.
  it = stream.iterator(10, seed=3, steps=12)
  for _ in range(5):
    next(it)
  resumed = list(stream.iterator(10, seed=3, steps=12, state=it.get_state()))
  assert len(resumed) == 7
  for a, b in zip(resumed, straight[5:]):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)


class Killed(Exception):
  pass


def test_training_from_a_stream_resumes_bit_exactly(tmp_path):
  write_folder(tmp_path / "data")
  stream = streaming.Stream(streaming.scan_folder(tmp_path / "data"), num_threads=2)
  cfg = train.TrainConfig(steps=6, batch_size=8, warmup_steps=1, checkpoint_every=2,
                          log_every=1, crop_pad=1)
  mesh = sharding.make_mesh(jax.devices()[:2])
  start = model_lib.init(TINY, 0)
  straight = train.fit(start, stream, cfg, mesh=mesh, progress=False)
  def die(step, metrics):
    if step == 3:
      raise Killed()
  with pytest.raises(Killed):
    train.fit(start, stream, cfg, workdir=tmp_path / "run", mesh=mesh, progress=False,
              on_step=die)
  assert (tmp_path / "run" / "data_iterator" / "step-2-process-0.json").exists()
  seen = []
  resumed = train.fit(start, stream, cfg, workdir=tmp_path / "run", mesh=mesh,
                      progress=False, on_step=lambda step, _: seen.append(step))
  assert seen == [3, 4, 5, 6]
  for a, b in zip(jax.tree_util.tree_leaves(straight.params),
                  jax.tree_util.tree_leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree_util.tree_leaves(start.params), jax.tree_util.tree_leaves(straight.params)))
  assert moved > 1e-4


def test_bad_folders_are_named(tmp_path):
  write_folder(tmp_path / "ok", n=16)
  broken = tmp_path / "ok" / "class_1" / "broken.png"
  broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
  with pytest.raises(DatasetError, match="broken.png is not a readable image"):
    streaming.scan_folder(tmp_path / "ok")
  folder = streaming.scan_folder(tmp_path / "ok", on_unreadable="skip")
  assert folder.skipped == ("class_1/broken.png",) and len(folder) == 16
  with pytest.raises(ValueError, match="on_unreadable='ignore'; choose one of"):
    streaming.scan_folder(tmp_path / "ok", on_unreadable="ignore")

  (tmp_path / "ok" / "class_9").mkdir()
  with pytest.raises(DatasetError, match="class directory .*class_9 is empty"):
    streaming.scan_folder(tmp_path / "ok", on_unreadable="skip")

  write_folder(tmp_path / "mixed", n=16)
  Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "mixed" / "class_0" / "z.png")
  with pytest.raises(DatasetError, match="mixed sizes: .* is 8x8, .*z.png is 12x12"):
    streaming.scan_folder(tmp_path / "mixed")
  resized = streaming.scan_folder(tmp_path / "mixed", image_size=8)
  z = resized.files.index("class_0/z.png")
  assert resized[z]["image"].shape == (8, 8, 1)

  with pytest.raises(DatasetError, match="has no class subdirectories"):
    streaming.scan_folder(tmp_path / "mixed" / "class_0")


def test_distilling_from_a_stream_with_a_cnn_teacher(tmp_path):
  from vitjax import distill
  from vitjax.models.cnn import CNNConfig
  write_folder(tmp_path)
  stream = streaming.Stream(streaming.scan_folder(tmp_path), num_threads=2)
  teacher = model_lib.init(CNNConfig(image_size=8, channels=1, num_classes=4, widths=(8,),
                                     blocks=(1,), groups=4), 0)
  student = model_lib.init(TINY.replace(distilled=True), 1)
  cfg = train.TrainConfig(steps=2, batch_size=8, warmup_steps=0)
  trained = distill.fit_student(teacher, student, stream, cfg, distill.DistillConfig(),
                                mesh=sharding.make_mesh(jax.devices()[:1]), progress=False)
  assert trained.config == student.config
  with pytest.raises(ValueError, match="offline teacher cache covers an in-memory"):
    distill.cached_teacher(teacher, stream, cfg, tmp_path / "c.npz", progress=False)


def test_cli_trains_on_a_streamed_folder_and_scores_its_test_folder(tmp_path, monkeypatch,
                                                                    capsys):
  monkeypatch.setitem(config_lib.PRESETS, "tiny", TINY)
  root, out = tmp_path / "data", tmp_path / "run"
  train_images, _ = write_folder(root / "train", n=512)
  test_images, test_labels = write_folder(root / "test", n=100, seed=1)
  run = ["train", "--image-folder", str(root), "--steps", "300", "--batch-size", "32",
         "--patch-dropout", "0", "--lr", "5e-3",
         "--read-threads", "2", "--out", str(out)]
  assert cli.main(run) == 0
  text = capsys.readouterr().out
  assert "indexed 512 training and 100 test images of 4 classes" in text
  model = export.load_model(out / "model")
  # Normalized by the folder's own training pixels, not Fashion-MNIST's constants.
  x = train_images.astype(np.float64) / 255
  np.testing.assert_allclose(model.config.pixel_mean, [x.mean()], rtol=1e-6)
  np.testing.assert_allclose(model.config.pixel_std, [x.std()], rtol=1e-5)
  # The printed top-1 is the saved model's on the test images, scored here in RAM
  # from the arrays the PNGs were written from (100 images: not one batch of 256).
  printed = float(text.split("teacher [test]: top-1 ")[1].split("%")[0])
  want = evaluate.accuracy(model, Split(test_images, test_labels), batch_size=64) * 100
  assert printed == pytest.approx(want, abs=0.005) and want > 60
  # A rerun reuses the finished run of the same folder.
  assert cli.main(run) == 0
  assert "reusing the finished run" in capsys.readouterr().out
  # A student distilled from that teacher on the same stream; its printed row
  # is the saved student's accuracy on the test images in RAM.
  monkeypatch.setitem(config_lib.PRESETS, "tiny-student", MINI_STUDENT)
  student = ["distill", "--teacher", str(out), "--image-folder", str(root), "--steps", "40",
             "--batch-size", "32", "--read-threads", "2", "--out", str(tmp_path / "student")]
  assert cli.main(student) == 0
  text = capsys.readouterr().out
  row = next(line for line in text.splitlines() if line.startswith("| student (distilled) |"))
  saved = export.load_model(tmp_path / "student" / "model")
  assert saved.config.pixel_mean == model.config.pixel_mean  # the teacher's statistics
  want = evaluate.accuracy(saved, Split(test_images, test_labels), batch_size=64) * 100
  assert float(row.split("|")[2]) == pytest.approx(want, abs=0.005)
  # The offline cache needs the images in RAM: refused by name.
  assert cli.main([*student[:-1], str(tmp_path / "offline"), "--offline", "3"]) == 2
  assert "--offline 3 caches the teacher's logits" in capsys.readouterr().err


def test_cli_image_folder_refusals_name_the_flag_or_folder(tmp_path, capsys):
  root = tmp_path / "data"
  write_folder(root / "train", n=48)
  write_folder(root / "test", n=8, seed=1)
  (root / "test" / "class_0").rename(root / "test" / "other")
  base = ["train", "--out", str(tmp_path / "run")]
  assert cli.main([*base, "--image-folder", str(root)]) == 2
  assert "both need the same class directories" in capsys.readouterr().err
  assert cli.main([*base, "--image-folder", str(root), "--dataset", "npz"]) == 2
  assert "--dataset picks in-RAM data instead" in capsys.readouterr().err
  assert cli.main([*base, "--image-size", "8"]) == 2
  assert "--image-size applies to --image-folder data only" in capsys.readouterr().err
  assert cli.main([*base, "--image-folder", str(tmp_path / "missing")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()  # nothing written by a refused run
