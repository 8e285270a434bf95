"""The main job end to end on a miniature config and synthetic data."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from vitjax import export, recipes, survey
from vitjax import model as model_lib


def test_survey_writes_every_method_with_consistent_figures(tmp_path):
  script = pathlib.Path(__file__).with_name("miniature_survey.py")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  rows = results["rows"]
  assert set(rows) == {"teacher"} | {m.name for m in survey.METHODS}
  assert (tmp_path / "results.md").read_text().count("\n| ") == len(rows) + 1
  assert (tmp_path / "pareto.png").stat().st_size > 10_000
  teacher_disk = export.disk_bytes(tmp_path / "teacher" / recipes.MODEL_DIR)
  assert rows["teacher"]["disk_bytes"] == teacher_disk
  for name, row in rows.items():
    model_dir = tmp_path / name / recipes.MODEL_DIR
    model = export.load_model(model_dir)
    assert row["disk_bytes"] == export.disk_bytes(model_dir), name
    assert row["size_ratio"] == pytest.approx(row["disk_bytes"] / teacher_disk)
    assert row["params"] == model_lib.param_count(model), name
    assert row["flops"] == model_lib.flops_per_image(model), name
    assert 0 <= row["accuracy"] <= 100
    assert row["throughput_ratio"] > 0 and row["speedup"] > 0
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
