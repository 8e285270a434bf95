"""Every `vitjax` subcommand on a tiny synthetic npz dataset: the figures it
prints are checked against the library's own calls on the model it saved, and
re-runs never reuse stale state."""

import json
import pathlib
import re
import shutil

import numpy as np
import pytest

from helpers import synthetic_split
from vitjax import cli, data, evaluate, export, recipes
from vitjax import model as model_lib
from vitjax.models import cnn as cnn_lib
from vitjax.models import config as config_lib
from vitjax.transforms import prune

SMALL_TINY = config_lib.PRESETS["tiny"].replace(dim=32, depth=1, mlp_dim=32, num_classes=4)
SMALL_STUDENT = config_lib.PRESETS["tiny-student"].replace(dim=16, depth=1, mlp_dim=16,
                                                           num_classes=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """An npz dataset, and a teacher trained on it through `vitjax train`."""
  root = tmp_path_factory.mktemp("cli")
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(config_lib.PRESETS, "tiny", SMALL_TINY)
    for name, n, seed in (("train.npz", 1200, 0), ("test.npz", 256, 1)):
      split = synthetic_split(n, config_lib.PRESETS["tiny"], seed)
      np.savez(root / name, images=split.images, labels=split.labels)
    assert cli.main(["train", "--dataset", "npz", "--data-dir", str(root), "--steps", "60",
                     "--batch-size", "64", "--out", str(root / "teacher")]) == 0
  return root


@pytest.fixture
def presets(monkeypatch):
  monkeypatch.setitem(config_lib.PRESETS, "tiny", SMALL_TINY)
  monkeypatch.setitem(config_lib.PRESETS, "tiny-student", SMALL_STUDENT)


def _data(world):
  return ["--dataset", "npz", "--data-dir", str(world)]


def _row(text: str, name: str) -> dict:
  """The figures of one row of the comparison table a command prints."""
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if cells[0] == name:
      return {"top1": float(cells[1]), "params": int(cells[3].replace(",", "")),
              "bytes": int(cells[4].replace(",", ""))}
  raise AssertionError(f"no row {name!r} in:\n{text}")


def _check_row(text: str, name: str, model_dir: pathlib.Path, world) -> model_lib.Model:
  """The printed row of `name` equals what the library measures on the saved model."""
  model = export.load_model(model_dir)
  test = data.load("npz", world).test
  row = _row(text, name)
  assert row["top1"] == pytest.approx(evaluate.accuracy(model, test) * 100, abs=0.005)
  assert row["params"] == model_lib.param_count(model)
  assert row["bytes"] == sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
  return model


def test_train_prints_what_eval_measures(world, capsys):
  assert cli.main(["eval", str(world / "teacher"), "--json", *_data(world)]) == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  model = export.load_model(world / "teacher" / "model")
  assert report["accuracy"] == pytest.approx(evaluate.accuracy(model, data.load("npz", world).test))
  assert report["accuracy"] > 0.6  # the synthetic task is learnt: the figures are not vacuous


@pytest.mark.parametrize("method", ["weight-int8", "static-int8"])
def test_quantize_prints_the_saved_models_figures(world, tmp_path, capsys, method):
  out = tmp_path / "q"
  assert cli.main(["quantize", str(world / "teacher"), "--method", method, "--calib", "32",
                   "--out", str(out), *_data(world)]) == 0
  text = capsys.readouterr().out
  model = _check_row(text, method, out, world)
  assert _row(text, method)["bytes"] < 0.6 * _row(text, "fp32")["bytes"]
  kinds = {type(leaf).__name__ for _, leaf in model_lib.weight_leaves(model.params)}
  assert "QuantizedWeight" in kinds
  # An existing output is refused before any work, and --overwrite replaces it.
  assert cli.main(["quantize", str(world / "teacher"), "--method", method,
                   "--out", str(out), *_data(world)]) == 2
  assert "exists; pass overwrite=True (CLI: --overwrite)" in capsys.readouterr().err


def test_quantize_recipe_and_policy_quantize_every_matmul(world, tmp_path, capsys):
  out = tmp_path / "r"
  assert cli.main(["quantize", str(world / "teacher"), "--recipe", "repqvit+gptq",
                   "--w-bits", "4", "--a-bits", "6", "--calib", "32", "--out", str(out),
                   *_data(world)]) == 0
  text = capsys.readouterr().out
  model = _check_row(text, "repqvit+gptq-w4a6", out, world)
  # Every site but the LayerNorm inputs and the softmax and GELU outputs
  # (probs.v's left operand and Dense_1's input quantize those tensors).
  assert set(model.sites) == {a for a in model_lib.site_addresses(model)
                              if not re.search(r"(norm|LayerNorm_\d)/input$|/gelu$|/softmax$",
                                               a)}
  assert {type(q).__name__ for q in model.sites.values()} == {"Uniform", "Operands"}
  assert {type(q.lhs).__name__ for a, q in model.sites.items()
          if a.endswith("/pv")} == {"Logarithmic"}
  policy = tmp_path / "mix.json"
  policy.write_text(json.dumps({"recipe": "minmax", "a_bits": 4, "w_bits": 4, "rules": [
      {"pattern": ".*/softmax", "quantizer": {"kind": "twin", "bits": 4}},
      {"pattern": ".*/pv", "quantizer": {"kind": "operands", "rhs": {"kind": "uniform",
                                                                     "bits": 4}}}]}))
  assert cli.main(["quantize", str(world / "teacher"), "--policy", str(policy), "--calib",
                   "32", "--out", str(tmp_path / "p"), *_data(world)]) == 0
  model = _check_row(capsys.readouterr().out, "mix", tmp_path / "p", world)
  assert type(model.sites[
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/softmax"]).__name__ == \
      "TwinUniform"
  for bad, message in (
      (["--recipe", "minmax+fqvit"], "names two site recipes"),
      (["--recipe", "kl"], "recipe='kl': parts must be distinct names"),
      (["--recipe", "minmax", "--a-bits", "9"], "--a-bits: 9 is outside"),
      (["--method", "weight-int8", "--w-bits", "4"], "go with --recipe, not --method"),
      (["--policy", str(policy), "--a-bits", "4"], "a --policy file sets its own bits")):
    code = None
    try:
      code = cli.main(["quantize", str(world / "teacher"), *bad, "--out",
                       str(tmp_path / "bad"), *_data(world)])
    except SystemExit as e:  # argparse refuses a bad number itself
      code = e.code
    assert code == 2 and message in capsys.readouterr().err, bad
    assert not (tmp_path / "bad").exists()


def test_prune_rerun_with_another_sparsity_never_resumes_the_old_run(world, tmp_path, capsys,
                                                                      presets):
  out = tmp_path / "p"
  args = ["prune", str(world / "teacher"), "--method", "magnitude", "--finetune-steps", "3",
          "--lr", "1e-4", "--out", str(out), *_data(world)]
  assert cli.main(args + ["--sparsity", "0.5"]) == 0
  text = capsys.readouterr().out
  model = _check_row(text, "prune-magnitude", out / "model", world)
  assert set(np.round(list(prune.sparsity_report(model).values()), 2)) == {0.5}
  # Without --overwrite a finished run is not silently replaced ...
  assert cli.main(args + ["--sparsity", "0.9"]) == 2
  assert "holds a finished model; pass --overwrite" in capsys.readouterr().err
  # ... an unfinished one with other settings is not resumed ...
  shutil.rmtree(out / "model")
  assert cli.main(args + ["--sparsity", "0.9"]) == 2
  err = capsys.readouterr().err
  assert "written for a different run" in err and "initial_weights" in err
  # ... and --overwrite starts clean: the model is 90% sparse, as its metadata says.
  assert cli.main(args + ["--sparsity", "0.9", "--overwrite"]) == 0
  model = _check_row(capsys.readouterr().out, "prune-magnitude", out / "model", world)
  assert set(np.round(list(prune.sparsity_report(model).values()), 2)) == {0.9}
  assert export.read_metadata(out / "model")["metadata"]["transform"]["sparsity"] == 0.9


def test_prune_structured_and_lowrank_print_the_saved_models_figures(world, tmp_path, capsys,
                                                                     presets):
  out = tmp_path / "s"
  assert cli.main(["prune", str(world / "teacher"), "--method", "structured",
                   "--head-keep", "0.5", "--mlp-keep", "0.5", "--finetune-steps", "2",
                   "--out", str(out), *_data(world)]) == 0
  model = _check_row(capsys.readouterr().out, "prune-structured", out / "model", world)
  assert model.config.block_heads == (2,) and model.config.block_mlp_dims == (16,)
  out = tmp_path / "l"
  assert cli.main(["lowrank", str(world / "teacher"), "--rank", "4", "--finetune-steps", "0",
                   "--out", str(out), *_data(world)]) == 0
  model = _check_row(capsys.readouterr().out, "lowrank", out / "model", world)
  kinds = [type(leaf).__name__ for _, leaf in model_lib.weight_leaves(model.params)]
  assert "LowRank" in kinds
  # A rank that would not shrink a layer is an error, not a silently dense layer.
  assert cli.main(["lowrank", str(world / "teacher"), "--rank", "30", "--finetune-steps", "0",
                   "--out", str(tmp_path / "l2"), *_data(world)]) == 2
  assert "does not shrink layer" in capsys.readouterr().err


def test_distill_prints_the_saved_students_figures(world, tmp_path, capsys, presets):
  out = tmp_path / "d"
  assert cli.main(["distill", "--teacher", str(world / "teacher"), "--steps", "4",
                   "--batch-size", "32", "--offline", "4", "--out", str(out),
                   *_data(world)]) == 0
  text = capsys.readouterr().out
  student = _check_row(text, "student (distilled)", out / "model", world)
  assert student.config.distilled and student.config.dim == 16
  teacher = export.load_model(world / "teacher" / "model")
  assert (student.config.pixel_mean, student.config.pixel_std) == (
      teacher.config.pixel_mean, teacher.config.pixel_std)
  # Another teacher's weights are not resumed from this run's state.
  shutil.rmtree(out / "model")
  other = tmp_path / "other-teacher"
  noisy = teacher.replace(params={**teacher.params, "cls": teacher.params["cls"] + 1.0})
  export.save_model(noisy, other / "model")
  assert cli.main(["distill", "--teacher", str(other), "--steps", "4", "--batch-size", "32",
                   "--offline", "4", "--out", str(out), *_data(world)]) == 2
  assert "written for a different run" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "0"], "argument --steps: 0 is outside [1, inf]"),
    (["train", "--lr", "-1"], "argument --lr: -1 is outside (0, inf]"),
    (["train", "--patch-dropout", "1"], "argument --patch-dropout: 1 is outside [0, 1)"),
    (["train", "--batch-size", "x"], "argument --batch-size: 'x' is not an int"),
    (["prune", "c", "--method", "magnitude", "--sparsity", "1.5"], "outside [0, 1)"),
    (["prune", "c", "--method", "structured", "--head-keep", "0"], "outside (0, 1]"),
    (["lowrank", "c", "--budget", "1"], "argument --budget: 1 is outside (0, 1)"),
    (["lowrank", "c", "--rank", "-2"], "argument --rank: -2 is outside [1, inf]"),
    (["distill", "--teacher", "t", "--T", "0"], "argument --T: 0 is outside (0, inf]"),
    (["distill", "--teacher", "t", "--hard", "-0.5"], "argument --hard: -0.5 is outside"),
    (["quantize", "c", "--method", "static-int8", "--calib", "0"], "argument --calib: 0"),
    (["survey", "--finetune-steps", "-1"], "argument --finetune-steps: -1 is outside"),
    (["eval", "c", "--num-classes", "0"], "argument --num-classes: 0 is outside"),
])
def test_numeric_arguments_are_range_checked(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_unwritable_or_odd_out_paths_fail_before_any_work(world, tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  for argv in (["quantize", str(world / "teacher"), "--method", "weight-int8"],
               ["prune", str(world / "teacher"), "--method", "magnitude"],
               ["lowrank", str(world / "teacher"), "--rank", "2"],
               ["distill", "--teacher", str(world / "teacher")]):
    assert cli.main(argv + ["--out", str(tmp_path / "file" / "run"), *_data(world)]) == 2
    assert "which is a file" in capsys.readouterr().err, argv
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  assert cli.main(["prune", str(world / "teacher"), "--method", "magnitude", "--overwrite",
                   "--out", str(tmp_path / "mine"), *_data(world)]) == 2
  assert "would delete" in capsys.readouterr().err
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_stray_label_is_refused_and_num_classes_overrides(world, tmp_path, capsys, presets):
  for name in ("train.npz", "test.npz"):
    with np.load(world / name) as f:
      images, labels = f["images"], f["labels"].copy()
    if name == "train.npz":
      labels[3] = 500
    np.savez(tmp_path / name, images=images, labels=labels)
  assert cli.main(["train", "--steps", "1", "--batch-size", "64", "--out",
                   str(tmp_path / "r"), "--dataset", "npz", "--data-dir", str(tmp_path)]) == 2
  assert "reach 500 but classes [4, 5, 6" in capsys.readouterr().err


def test_train_reuses_a_finished_run_only_with_the_same_settings(world, tmp_path, capsys,
                                                                 presets):
  run = tmp_path / "t"
  base = ["train", "--batch-size", "64", "--out", str(run), *_data(world)]
  assert cli.main(base + ["--steps", "2"]) == 0
  capsys.readouterr()
  assert cli.main(base + ["--steps", "2"]) == 0
  assert "reusing the finished run" in capsys.readouterr().out
  assert cli.main(base + ["--steps", "3"]) == 2
  err = capsys.readouterr().err
  assert "trained with other train" in err and f"delete {run} " in err
  assert cli.main(base + ["--steps", "3", "--overwrite"]) == 0
  saved = export.read_metadata(run / recipes.MODEL_DIR)["metadata"]
  assert saved["train"]["steps"] == 3
  assert re.search(r"on \d+ images for 3 steps", capsys.readouterr().out)


def test_survey_refuses_an_odd_out_path_before_any_work(tmp_path, capsys):
  (tmp_path / "file").write_text("x")
  assert cli.main(["survey", "--quick", "--out", str(tmp_path / "file" / "s")]) == 2
  assert "which is a file" in capsys.readouterr().err


def test_a_resize_is_said_not_silent(world, tmp_path, capsys):
  for name in ("train.npz", "test.npz"):
    with np.load(world / name) as f:
      images, labels = f["images"], f["labels"]
    np.savez(tmp_path / name, images=images[:, ::2, ::2], labels=labels)
  assert cli.main(["eval", str(world / "teacher"), "--dataset", "npz",
                   "--data-dir", str(tmp_path)]) == 0
  assert "the 14x14 images are resized (bilinear) to the model's 28x28" in \
      capsys.readouterr().out


def test_import_finetune_quantize_export_from_a_timm_file(world, tmp_path, capsys):
  import timm_reference
  import torch
  torch.manual_seed(0)
  source = timm_reference.TimmViT(img_size=32, patch_size=8, embed_dim=48, depth=1,
                                  num_heads=3, num_classes=1000, distilled=True)
  timm_reference.save(source, tmp_path / "src", "deit_tiny_distilled_patch8_32")
  imported = tmp_path / "imported"
  assert cli.main(["import", str(tmp_path / "src"), "--out", str(imported), "--image-size",
                   "28"]) == 2
  assert "image_size=28 cannot be used" in capsys.readouterr().err
  assert not imported.exists()
  assert cli.main(["import", str(tmp_path / "src"), "--out", str(imported), "--num-classes",
                   "4", "--image-size", "16", "--channels", "1"]) == 0
  out = capsys.readouterr().out
  assert "read" in out and "as timm" in out and "adapted to 16x16x1 images" in out
  model = export.load_model(imported)
  assert (model.config.num_classes, model.config.image_size, model.config.channels,
          model.config.gelu) == (4, 16, 1, "erf")
  assert cli.main(["train", "--init", str(imported), *_data(world), "--steps", "8",
                   "--out", str(tmp_path / "ft")]) == 0
  assert "top-1" in capsys.readouterr().out
  assert cli.main(["quantize", str(tmp_path / "ft"), "--method", "dynamic-int8", *_data(world),
                   "--out", str(tmp_path / "q")]) == 0
  capsys.readouterr()
  assert cli.main(["export", str(tmp_path / "q"), "--out", str(tmp_path / "art")]) == 0
  out = capsys.readouterr().out
  assert re.search(r"[1-9]\d* integer dot_general ops", out), out
  assert "max |logit difference| 0.00e+00" in out
  # Without --out the artifact goes beside the run: <run dir>-stablehlo.
  assert cli.main(["export", str(tmp_path / "ft" / "model")]) == 0
  assert f"wrote {tmp_path / 'ft'}-stablehlo " in capsys.readouterr().out
  assert (tmp_path / "ft-stablehlo").is_dir()
  (tmp_path / "w.pth").write_bytes(b"\x80")
  assert cli.main(["import", str(tmp_path / "w.pth"), "--out", str(tmp_path / "x")]) == 2
  assert "pickle" in capsys.readouterr().err


def test_cnn_teacher_trains_teaches_an_ensemble_and_refuses_compression(world, tmp_path,
                                                                        capsys, presets):
  small_cnn = cnn_lib.CNNConfig(image_size=28, channels=1, num_classes=4, widths=(8, 16),
                                blocks=(1, 1), groups=4)
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(cnn_lib.CNN_PRESETS, "tiny-cnn", small_cnn)
    assert cli.main(["train", "--arch", "cnn", "--steps", "30", "--batch-size", "64",
                     "--out", str(tmp_path / "cnn"), *_data(world)]) == 0
  text = capsys.readouterr().out
  assert "training tiny-cnn CNN (stage widths [8, 16], blocks [1, 1])" in text
  cnn = export.load_model(tmp_path / "cnn" / "model")
  top1 = float(re.search(r"teacher \[test\]: top-1 ([\d.]+)%", text).group(1))
  assert top1 == pytest.approx(evaluate.accuracy(cnn, data.load("npz", world).test) * 100,
                               abs=0.005)
  assert cnn.config == small_cnn.replace(pixel_mean=cnn.config.pixel_mean,
                                         pixel_std=cnn.config.pixel_std)
  out = tmp_path / "d"
  assert cli.main(["distill", "--teacher", str(tmp_path / "cnn"), str(world / "teacher"),
                   "--steps", "4", "--batch-size", "32", "--offline", "4", "--out", str(out),
                   *_data(world)]) == 0
  _check_row(capsys.readouterr().out, "student (distilled)", out / "model", world)
  assert cli.main(["distill", "--teacher", str(tmp_path / "cnn"), "--feature", "1",
                   "--steps", "2", "--out", str(tmp_path / "f"), *_data(world)]) == 2
  assert "needs a single ViT teacher" in capsys.readouterr().err
  assert cli.main(["quantize", str(tmp_path / "cnn"), "--method", "weight-int8",
                   "--out", str(tmp_path / "q"), *_data(world)]) == 2
  assert "needs a ViT/DeiT; this model is a cnn" in capsys.readouterr().err
  assert cli.main(["train", "--arch", "cnn", "--steps", "2", "--patch-dropout", "0.5",
                   "--out", str(tmp_path / "pd"), *_data(world)]) == 2
  assert "patch_dropout=0.5 drops patch tokens" in capsys.readouterr().err
