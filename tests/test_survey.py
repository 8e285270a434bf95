"""The main job end to end on a miniature config and synthetic data."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from helpers import MINI_STUDENT, MINI_TEACHER
from vitjax import data, evaluate, export, recipes, survey, train
from vitjax import model as model_lib


def hand_flops(c) -> int:
  """2 x the multiply-adds of one image through a plain-patch ViT/DeiT of config
  `c`, by hand: patch embedding, per block q/k/v, q.k^T, probs.v, output and
  MLP (at each block's kept widths), and the head(s)."""
  tokens = c.num_patches + c.num_prefix_tokens
  macs = c.num_patches * c.patch_size ** 2 * c.channels * c.dim
  for i in range(c.depth):
    width = c.heads(i) * c.head_dim
    macs += 3 * tokens * c.dim * width + 2 * tokens * tokens * width
    macs += tokens * width * c.dim + 2 * tokens * c.dim * c.mlp_width(i)
  macs += c.dim * c.num_classes * (2 if c.distilled else 1)
  return 2 * macs


def test_hand_flops_of_the_miniature_teacher():
  # 4 patches of 16 values -> 16; 5 tokens; 2 blocks; a 16 -> 4 head.
  assert hand_flops(MINI_TEACHER) == 2 * (4 * 16 * 16 + 2 * (3 * 5 * 16 * 16 + 2 * 25 * 16 +
                                                            5 * 16 * 16 + 2 * 5 * 16 * 32)
                                          + 16 * 4)


def test_survey_writes_every_method_with_consistent_figures(tmp_path):
  script = pathlib.Path(__file__).with_name("miniature_survey.py")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = tmp_path / "survey"
  done = subprocess.run([sys.executable, str(script), str(out)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| student+int8 |" in done.stdout  # the CLI printed the table
  tmp_path = out
  dataset = data.load("npz", out.parent / "data")
  test = dataset.test.take(slice(0, 500))
  results = json.loads((tmp_path / "results.json").read_text())
  rows = results["rows"]
  assert set(rows) == {"teacher", survey.CNN_TEACHER} | {m.name for m in survey.METHODS}
  assert (tmp_path / "results.md").read_text().count("\n| ") == len(rows) + 1
  # Rows whose figures need a sentence (an infeasible tuned policy) get it below.
  assert set(results["notes"]) <= set(rows)
  for name, note in results["notes"].items():
    assert f"**Note on {name}:** {note}." in (tmp_path / "results.md").read_text()
  assert rows["teacher"]["build_seconds"] > 0 and rows[survey.CNN_TEACHER]["build_seconds"] > 0
  # The teacher and the students trained on the training images alone: the
  # tuned row chooses on the validation images, which the recipes' final fits
  # would have seen.
  assert len(dataset.validation) > 0
  teacher_meta = export.read_metadata(out / "teacher" / recipes.MODEL_DIR)["metadata"]
  assert teacher_meta["data"] == train.data_fingerprint(dataset.train)
  for name in ("student", survey.NO_TEACHER):
    meta = json.loads((out / name / recipes.TRAIN_DIR / "train_meta.json").read_text())
    assert meta["data"] == train.data_fingerprint(dataset.train), name
  assert (tmp_path / "pareto.png").stat().st_size > 10_000
  teacher_disk = export.disk_bytes(tmp_path / "teacher" / recipes.MODEL_DIR)
  assert rows["teacher"]["disk_bytes"] == teacher_disk
  assert rows["teacher"]["throughput_ratio_spread"] == [1.0, 1.0, 1.0]
  for name, row in rows.items():
    model_dir = tmp_path / name / recipes.MODEL_DIR
    model = export.load_model(model_dir)
    assert row["disk_bytes"] == export.disk_bytes(model_dir), name
    assert row["size_ratio"] == pytest.approx(row["disk_bytes"] / teacher_disk)
    assert row["raw_fp32_ratio"] == pytest.approx(
        row["disk_bytes"] / (4 * rows["teacher"]["params"]))
    assert row["params"] == model_lib.param_count(model), name
    assert row["flops"] == model_lib.flops_per_image(model), name
    # Each row's accuracy is its own saved model's, measured again here.
    assert row["accuracy"] == pytest.approx(evaluate.accuracy(model, test) * 100, abs=1e-6), name
    assert row["throughput_ratio"] > 0 and row["speedup"] > 0
    for key in ("speedup_spread", "throughput_ratio_spread"):
      lo, med, hi = row[key]
      assert 0 < lo <= med <= hi, (name, key)
    assert row["compile_options"] == "xla-default (b=1), xla-default (b=256)"  # quick run
  # Sizes and FLOPs against figures not derived by the functions under test.
  for name in ("teacher", "student", "structured", "dynamic-int8", "prune-50%"):
    cfg = export.load_model(tmp_path / name / recipes.MODEL_DIR).config
    assert rows[name]["flops"] == hand_flops(cfg), name
  assert rows["student"]["flops"] == hand_flops(MINI_STUDENT)
  # The student without a teacher: the same architecture, trained otherwise.
  assert rows[survey.NO_TEACHER]["flops"] == rows["student"]["flops"]
  assert rows[survey.NO_TEACHER]["params"] == rows["student"]["params"]
  cnn = export.load_model(tmp_path / survey.CNN_TEACHER / recipes.MODEL_DIR)
  assert type(cnn.config).__name__ == "CNNConfig"
  assert rows[survey.CNN_TEACHER]["disk_bytes"] == export.disk_bytes(
      tmp_path / survey.CNN_TEACHER / recipes.MODEL_DIR)
  student_run = json.loads((tmp_path / "student" / recipes.TRAIN_DIR /
                            "train_meta.json").read_text())
  assert '"arch": "cnn"' in student_run["run"]  # taught by the CNN teacher
  files = [p for p in (tmp_path / "teacher" / recipes.MODEL_DIR).rglob("*") if p.is_file()]
  assert rows["teacher"]["disk_bytes"] == sum(os.path.getsize(p) for p in files)
  # Weights of an int8 model take a quarter of float32; int4 an eighth.
  n_teacher = rows["teacher"]["params"]
  assert n_teacher == sum(int(np.prod(s)) for s in (
      (16, 16), (16,), (1, 1, 16), (1, 5, 16), (16,), (16,), (4,), (16, 4))) + 2 * (
          4 * 16 + 4 * (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16))
  # Accuracy of every compressed model against its own source: quantizing or
  # pruning this learnable task lightly keeps it within a few points.
  for name, source in (("dynamic-int8", "teacher"), ("static-int8", "teacher"),
                       ("w8a8-all-sites", "teacher"), ("w6a6", "teacher"),
                       ("prune-50%+int8", "prune-50%"), ("student+int8", "student")):
    assert abs(rows[name]["accuracy"] - rows[source]["accuracy"]) < 8, name
  # The direction the survey reports, which no wrong size accounting would give:
  assert rows["weight-int4"]["size_ratio"] < rows["dynamic-int8"]["size_ratio"]
  assert rows["student"]["flops"] < rows["teacher"]["flops"] / 2
  assert rows["structured"]["params"] < rows["teacher"]["params"]
  assert rows["student+structured+int4"]["size_ratio"] < rows["student+int8"]["size_ratio"]
  assert rows["teacher"]["accuracy"] > 60  # the synthetic task is learnable


def test_methods_are_ordered_by_their_sources():
  order = [m.name for m in survey._order(list(reversed(survey.METHODS)))]
  for m in survey.METHODS:
    for source in m.sources:
      if source != "teacher":
        assert order.index(source) < order.index(m.name)
  with pytest.raises(ValueError, match="missing sources"):
    survey._order([survey.Method("x", "f", lambda c, s: None, ("nothing",))])


@pytest.mark.parametrize("field", ["train_images", "test_images"])
def test_settings_refuse_an_empty_or_negative_subset(field):
  with pytest.raises(ValueError, match=f"Settings.{field} must be None .* or >= 1, got -5"):
    survey.Settings(**{field: -5})
  assert getattr(survey.Settings(**{field: 7}), field) == 7

