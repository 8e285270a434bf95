"""StableHLO artifacts: a fresh process that imports only jax reproduces the
logits of fp32 and compressed models at any batch size, and the W8A8
artifact's module holds integer dot_general ops."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import TINY, noisy_model
from vitjax import model as model_lib
from vitjax import stablehlo
from vitjax.models.inputs import preprocess
from vitjax.transforms import prune, quantize

CFG = TINY.replace(pixel_mean=(0.3,), pixel_std=(0.4,), num_classes=5)

FRESH = """
import sys, json, numpy as np, jax
from jax import export
data = np.load(sys.argv[1])
out = {}
for path in sys.argv[2:]:
  call = export.deserialize(bytearray(open(path + '/forward.jaxexport', 'rb').read())).call
  out[path] = {k: np.asarray(call(data[k])).tolist() for k in data.files}
assert not any(m == 'vitjax' or m.startswith('vitjax.') for m in sys.modules), 'vitjax imported'
print(json.dumps(out))
"""


def _variants():
  model = noisy_model(CFG)
  return {"fp32": model, "w8a8": quantize.dynamic_int8()(model),
          "int4": quantize.weight_only(4)(model),
          "prune-int8": quantize.weight_only(8)(prune.magnitude(0.5)(model))}


def test_artifacts_reproduce_logits_in_a_process_without_vitjax(tmp_path):
  rng = np.random.default_rng(0)
  inputs = {f"b{n}": rng.integers(0, 256, (n, 8, 8, 1)).astype(np.uint8) for n in (1, 3, 5)}
  np.savez(tmp_path / "inputs.npz", **inputs)
  variants = _variants()
  for name, model in variants.items():
    signature = stablehlo.save(model, tmp_path / name)
    assert signature["input"]["shape"] == [None, 8, 8, 1]
  run = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "inputs.npz"),
                        *[str(tmp_path / name) for name in variants]],
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  got = json.loads(run.stdout.strip().splitlines()[-1])
  for name, model in variants.items():
    forward = jax.jit(lambda x, m=model: model_lib.apply(m, preprocess(x, m.config)))
    for key, images in inputs.items():
      want = np.asarray(forward(images))
      assert np.abs(want).max() > 0.1  # not a vacuous comparison
      np.testing.assert_allclose(np.asarray(got[str(tmp_path / name)][key]), want, atol=1e-5,
                                 rtol=0, err_msg=f"{name} {key}")


def test_w8a8_artifact_holds_integer_dots_and_fp32_none(tmp_path):
  variants = _variants()
  linear_layers = 4 * CFG.depth + 2 + 2 * CFG.depth  # q k v out, 2 MLP, embedding, head
  texts = {n: stablehlo.exported(variants[n]).mlir_module() for n in ("fp32", "w8a8")}
  assert stablehlo.integer_dots(texts["w8a8"]) == linear_layers
  assert stablehlo.integer_dots(texts["fp32"]) == 0
  assert any("xi8>" in line and "-> tensor<?x" in line and "xi32>" in line
             for line in texts["w8a8"].splitlines() if "stablehlo.dot_general" in line)
  stablehlo.save(variants["w8a8"], tmp_path / "a")
  readable = (tmp_path / "a" / stablehlo.MLIR).read_text()
  assert stablehlo.integer_dots(readable) == linear_layers and "elided" in readable


def test_fixed_batch_input_shape_and_bad_arguments(tmp_path):
  model = noisy_model(CFG)
  signature = stablehlo.save(model, tmp_path / "fixed", batch=2, input_shape=(16, 16, 1),
                             input_dtype="float32")
  assert signature["input"] == {"shape": [2, 16, 16, 1], "dtype": "float32", "scale": "0..1"}
  forward = stablehlo.load(tmp_path / "fixed")
  images = np.random.default_rng(1).random((2, 16, 16, 1), dtype=np.float32)
  np.testing.assert_allclose(
      np.asarray(forward(images)),
      np.asarray(jax.jit(lambda x: model_lib.apply(model, preprocess(x, CFG)))(images)),
      atol=1e-5)
  with pytest.raises(FileExistsError, match="exists"):
    stablehlo.save(model, tmp_path / "fixed")
  with pytest.raises(ValueError, match="batch must be a positive int"):
    stablehlo.exported(model, batch=0)
  with pytest.raises(ValueError, match="input_shape must be"):
    stablehlo.exported(model, input_shape=(8, 8, 2))
  with pytest.raises(ValueError, match="input_dtype must be one of"):
    stablehlo.exported(model, input_dtype="int16")
  with pytest.raises(ValueError, match="platforms must be"):
    stablehlo.exported(model, platforms=["metal"])
  with pytest.raises(FileNotFoundError, match="not a vitjax StableHLO artifact"):
    stablehlo.load(tmp_path)
  assert not list(tmp_path.glob(".*tmp*"))
