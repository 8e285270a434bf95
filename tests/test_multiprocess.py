"""Two local processes x two CPU devices each: distill with FSDP, get killed,
resume, export. The result equals one process's run, and the export is
written once, by process 0."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from helpers import multiprocess_run_setup
from vitjax import distill, export, sharding
from vitjax import model as model_lib

WORKER = pathlib.Path(__file__).with_name("multiprocess_run_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir: pathlib.Path, stop_at: int) -> list[tuple[int, str]]:
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), port, str(workdir),
                             str(stop_at)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(2)]
  return [(p.wait(timeout=300), p.stdout.read().decode(errors="replace")) for p in procs]


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
