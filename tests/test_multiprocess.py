"""Two local processes x two CPU devices each: distill with FSDP, get killed,
resume, export; and `vitjax train` across two processes from its flags. The
result equals one process's run, and the export is written once, by process 0."""

import os
import pathlib
import socket
import subprocess
import sys

import argparse

import jax
import numpy as np
import pytest

from helpers import TINY, multiprocess_run_setup, synthetic_split
from vitjax import cli, data, distill, export, recipes, sharding, train
from vitjax import model as model_lib
from vitjax.models import config as config_lib

WORKER = pathlib.Path(__file__).with_name("multiprocess_run_worker.py")
CLI_WORKER = pathlib.Path(__file__).with_name("multiprocess_cli_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_both(worker: pathlib.Path, *args: str, timeout: float = 300
              ) -> list[tuple[int, str]]:
  """Runs `worker PROCESS_ID PORT *args` as processes 0 and 1; (rc, output) of each."""
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, str(worker), str(i), port, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  return [(p.wait(timeout=timeout), p.stdout.read().decode(errors="replace"))
          for p in procs]


def _launch(workdir: pathlib.Path, stop_at: int) -> list[tuple[int, str]]:
  return _run_both(WORKER, str(workdir), str(stop_at))


def test_two_processes_killed_resume_and_export_once(tmp_path):
  killed = _launch(tmp_path, stop_at=3)
  for rc, log in killed:
    assert rc == 17 and "killed after step 3" in log, log[-3000:]
  assert not (tmp_path / "model").exists()
  saved = sorted(int(p.name) for p in (tmp_path / "train" / "train_state").iterdir()
                 if p.name.isdigit())
  assert saved and max(saved) <= 3, saved  # the resume starts from a real checkpoint

  finished = _launch(tmp_path, stop_at=0)
  for rc, log in finished:
    assert rc == 0, log[-3000:]
  writes = [int(log.split("model writes: ")[1].split()[0]) for _, log in finished]
  assert writes == [1, 0]  # process 0 wrote the export, process 1 did not
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model")] == []

  # Every process returned the whole (all-gathered) student ...
  a, b = (np.load(tmp_path / f"params-{i}.npz") for i in range(2))
  for key in a.files:
    np.testing.assert_array_equal(a[key], b[key])
  # ... which is what the export holds ...
  exported = export.load_model(tmp_path / "model")
  flat = jax.tree_util.tree_leaves(exported.params)
  for key, leaf in zip(a.files, flat):
    np.testing.assert_array_equal(a[key], np.asarray(leaf))
  # ... and what one uninterrupted process on one device trains.
  teacher, student, split, cfg, dcfg = multiprocess_run_setup()
  one = distill.fit_student(teacher, student, split, cfg, dcfg,
                            mesh=sharding.make_mesh(jax.devices()[:1]), progress=False)
  for key, (path, leaf) in zip(a.files, jax.tree_util.tree_flatten_with_path(one.params)[0]):
    np.testing.assert_allclose(a[key], leaf, atol=2e-5,
                               err_msg=model_lib.path_str(path))


def test_train_cli_joins_two_processes_and_exports_once(tmp_path, monkeypatch):
  for name, n, seed in (("train.npz", 96, 0), ("test.npz", 32, 1)):
    split = synthetic_split(n, TINY, seed)
    np.savez(tmp_path / name, images=split.images, labels=split.labels)
  args = ["--dataset", "npz", "--data-dir", str(tmp_path), "--steps", "5", "--batch-size",
          "16", "--fsdp"]
  runs = _run_both(CLI_WORKER, *args, "--out", str(tmp_path / "two"))
  for rc, log in runs:
    assert rc == 0, log[-3000:]
  (_, log0), (_, log1) = runs
  assert "model writes: 1" in log0 and "model writes: 0" in log1
  # Process 0 alone draws the progress bar, scores the model and prints the report.
  assert "teacher: 100%" in log0 and "teacher:" not in log1
  assert "teacher [test]" in log0 and "teacher [test]" not in log1
  assert [p.name for p in (tmp_path / "two").iterdir() if p.name.startswith(".model")] == []

  # A refusal stops both processes alike (none is left waiting at a barrier):
  # --overwrite of a directory holding someone else's file deletes nothing.
  (tmp_path / "two" / "notes.txt").write_text("not a vitjax file")
  for rc, log in _run_both(CLI_WORKER, *args, "--out", str(tmp_path / "two"), "--overwrite",
                           timeout=120):
    assert rc == 2 and "--overwrite would delete" in log and "notes.txt" in log, log[-3000:]
  assert (tmp_path / "two" / "model").is_dir()

  # One process on one device, through the library, trains the same model
  # from the run's recorded settings and the recipe's images.
  two = export.load_model(tmp_path / "two" / "model")
  cfg = train.TrainConfig.from_dict(export.read_metadata(tmp_path / "two" / "model")
                                    ["metadata"]["train"])
  assert (cfg.steps, cfg.batch_size, cfg.fsdp) == (5, 16, True)
  monkeypatch.setitem(config_lib.PRESETS, "tiny", TINY)
  images = recipes.teacher_images("tiny", data.load("npz", tmp_path))
  one = train.fit(model_lib.init(two.config, 0), images, cfg,
                  mesh=sharding.make_mesh(jax.devices()[:1]), progress=False)
  assert np.abs(np.asarray(two.params["head"]["kernel"])).max() > 1e-3  # it trained
  # The five steps move most weights by about 1.5e-3 from their init; the runs
  # agree to 1e-4 (most weights to 1e-5). The head bias is left out: its first
  # gradient is mean(softmax - smoothed labels) at a zero head, exactly 0 for a
  # class with a quarter of the batch, and Adam's normalized step turns the
  # rounding left there into differences up to 5e-4.
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(one.params)[0],
                          jax.tree_util.tree_leaves(two.params)):
    if model_lib.path_str(path) != "head/bias":
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4,
                                 err_msg=model_lib.path_str(path))


@pytest.mark.parametrize("flags, message", [
    (dict(process_id=2, num_processes=2), "--process-id 2 is outside 0..1"),
    (dict(process_id=0), "--process-id 0 needs --num-processes"),
])
def test_process_flags_that_name_no_run_are_refused(flags, message):
  args = argparse.Namespace(**{"coordinator": "localhost:1", "num_processes": None,
                               "process_id": None, **flags})
  with pytest.raises(ValueError, match=message):
    cli.join_processes(args)
