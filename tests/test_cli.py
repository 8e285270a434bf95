"""The `vitjax` command line, end to end on a small npz dataset."""

import os
import re

import numpy as np
import pytest

from helpers import synthetic_split
from vitjax import cli
from vitjax.models import config as config_lib


@pytest.fixture
def npz_dir(tmp_path):
  for name, n, seed in (("train.npz", 1200, 0), ("test.npz", 256, 1)):
    split = synthetic_split(n, config_lib.preset("tiny"), seed)
    np.savez(tmp_path / name, images=split.images, labels=split.labels)
  return tmp_path


@pytest.fixture
def small_tiny(monkeypatch):
  """The tiny preset shrunk so a few training steps take seconds."""
  monkeypatch.setitem(config_lib.PRESETS, "tiny",
                      config_lib.PRESETS["tiny"].replace(dim=32, depth=1, mlp_dim=32,
                                                         num_classes=4, patch_size=7))


def _accuracy(text: str) -> str:
  return re.search(r"top-1 ([0-9.]+)%", text).group(1)


def test_train_then_eval_reprints_the_accuracy(npz_dir, tmp_path, capsys, small_tiny):
  out = tmp_path / "run"
  assert cli.main(["train", "--dataset", "npz", "--data-dir", str(npz_dir),
                   "--steps", "16", "--batch-size", "64", "--out", str(out)]) == 0
  trained = capsys.readouterr().out
  # The tiny recipe trains on the 120 validation images of the 1,200 too.
  assert "on 1200 images" in trained
  assert (out / "model" / "vitjax.json").exists()
  assert cli.main(["eval", str(out), "--dataset", "npz", "--data-dir", str(npz_dir)]) == 0
  evaluated = capsys.readouterr().out
  assert _accuracy(trained) == _accuracy(evaluated)
  assert "on disk" in evaluated
  # A second `train` reuses the finished run instead of training again.
  assert cli.main(["train", "--dataset", "npz", "--data-dir", str(npz_dir),
                   "--steps", "16", "--batch-size", "64", "--out", str(out)]) == 0
  assert "reusing" in capsys.readouterr().out


def test_train_can_hold_out_the_validation_images(npz_dir, tmp_path, capsys, small_tiny):
  out = tmp_path / "run"
  assert cli.main(["train", "--dataset", "npz", "--data-dir", str(npz_dir), "--steps", "2",
                   "--batch-size", "64", "--hold-out-validation", "--out", str(out)]) == 0
  assert "on 1080 images" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(tmp_path, capsys):
  assert cli.main(["eval", str(tmp_path)]) == 2
  assert "vitjax.json is missing" in capsys.readouterr().err
  assert cli.main(["train", "--dataset", "npz", "--data-dir", str(tmp_path)]) == 2
  assert "has no train.npz" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["train", "--preset", "huge"])
  assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_eval_on_data_with_other_channel_count(npz_dir, tmp_path, capsys, small_tiny):
  out = tmp_path / "run"
  assert cli.main(["train", "--dataset", "npz", "--data-dir", str(npz_dir),
                   "--steps", "2", "--batch-size", "64", "--out", str(out)]) == 0
  rgb_dir = tmp_path / "rgb"
  rgb_dir.mkdir()
  for name in ("train.npz", "test.npz"):
    np.savez(rgb_dir / name, images=np.zeros((200, 28, 28, 3), np.uint8),
             labels=np.arange(200) % 4)
  capsys.readouterr()
  assert cli.main(["eval", str(out), "--dataset", "npz", "--data-dir", str(rgb_dir)]) == 2
  assert "data has 3 channel(s) but the model expects channels=1" in capsys.readouterr().err


def test_survey_overwrite_rebuilds_every_stage_but_the_teacher(npz_dir, tmp_path, monkeypatch):
  from vitjax import survey
  out = tmp_path / "survey"
  for run, part in (("teacher", "model"), ("prune-50%", "model"),
                    ("student+structured", "train"), ("student", "train")):
    (out / run / part).mkdir(parents=True)
  (out / "notes").mkdir()  # not a run: left alone
  (out / "results.md").write_text("old")

  def stop(*args, **kwargs):
    raise RuntimeError("stopped before building")
  monkeypatch.setattr(survey, "run", stop)
  with pytest.raises(RuntimeError, match="stopped"):
    cli.main(["survey", "--overwrite", "--out", str(out), "--dataset", "npz",
              "--data-dir", str(npz_dir)])
  assert sorted(p.name for p in out.iterdir()) == ["notes", "results.md", "teacher"]


def test_entry_point_turns_on_the_compile_cache_unless_told_otherwise():
  from vitjax import entry
  env = entry.compile_cache_env({})
  assert env["JAX_COMPILATION_CACHE_DIR"].endswith(os.path.join(".cache", "vitjax", "xla"))
  assert int(env["JAX_COMPILATION_CACHE_MAX_SIZE"]) == 2 * 1024**3
  assert entry.compile_cache_env({"VITJAX_COMPILE_CACHE": "off"}) == {}
  assert entry.compile_cache_env({"JAX_COMPILATION_CACHE_DIR": "/x"}) == {}
  # A bound the user set is theirs; the directory still comes from vitjax.
  assert entry.compile_cache_env({"JAX_COMPILATION_CACHE_MAX_SIZE": "5"}) == {
      "JAX_COMPILATION_CACHE_DIR": env["JAX_COMPILATION_CACHE_DIR"]}
  with pytest.raises(ValueError, match="VITJAX_COMPILE_CACHE='yes'; choose 'on' or 'off'"):
    entry.compile_cache_env({"VITJAX_COMPILE_CACHE": "yes"})


def test_entry_point_splits_the_cpu_into_devices_unless_the_flags_already_do():
  from vitjax import entry
  assert entry.cpu_device_flag(6) == "--xla_force_host_platform_device_count=4"
  assert entry.cpu_device_flag(64) == "--xla_force_host_platform_device_count=8"
  assert entry.cpu_device_flag(None) == "--xla_force_host_platform_device_count=1"
  assert entry.with_cpu_devices("", 2) == "--xla_force_host_platform_device_count=2"
  assert entry.with_cpu_devices("--xla_cpu_enable_fast_math=false", 3) == (
      "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2")
  mine = "--xla_force_host_platform_device_count=1 --xla_dump_to=/tmp/x"
  assert entry.with_cpu_devices(mine, 8) == mine


def test_the_entry_points_compile_cache_stores_programs(tmp_path):
  """The cache as the entry point sets it up (a directory and a size bound)
  writes a compiled program and reads it back. JAX honours the size bound only
  with filelock, which vitjax declares: the main job's install once lacked it
  (torch brought it to the tests'), and every cache read failed there."""
  import importlib.metadata
  import subprocess
  import sys

  from vitjax import entry
  assert any(re.match(r"filelock\b", r) for r in importlib.metadata.requires("vitjax"))
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(entry.compile_cache_env(env), JAX_COMPILATION_CACHE_DIR=str(tmp_path),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  program = "import jax; print(jax.jit(lambda x: x * 3)(2.0))"
  for _ in range(2):
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "6.0"
    assert "cache" not in done.stderr.lower(), done.stderr
    assert [p for p in tmp_path.iterdir() if not p.name.endswith("-atime")]
