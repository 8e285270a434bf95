"""Latency and throughput of fp32 vs every quantized variant, side by side.

`w8a8-matmuls` quantizes every matmul's inputs (linear layers, q.kT, probs.v;
`ptq` recipe minmax) and `w8a8-all-sites` the LayerNorm inputs as well.

    .venv/bin/python benchmarks/quantization.py [--checkpoint checkpoints/teacher]
                                               [--preset tiny] [--out FILE.json]

Uses the trained checkpoint if given (accuracy is not measured here; speed does
not depend on the weights' values), else a random model of the preset. All
variants are timed round-robin in one process (`evaluate.round_times`), and
the ratios to fp32 are printed; a variant slower than fp32 is said to be.
Figures recorded on this project's machines: benchmarks/RESULTS.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import common
from vitjax import data as data_lib
from vitjax import model as model_lib
from vitjax.transforms import ptq, quantize


def variants(model: model_lib.Model, names: Sequence[str] | None = None
             ) -> dict[str, model_lib.Model]:
  """fp32 and every quantized variant of `model` (only `names` if given)."""
  cfg = model.config
  calib = np.random.default_rng(0).integers(
      0, 256, (256, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.uint8)
  # Random images stand in for training images: speed does not depend on them.
  calib_split = data_lib.Split(calib, np.zeros(len(calib), np.int32), origin="train")
  build = {
      "fp32": lambda: model,
      "weight-int8": lambda: quantize.weight_only(8)(model),
      "weight-int4": lambda: quantize.weight_only(4)(model),
      "dynamic-int8": lambda: quantize.dynamic_int8()(model),
      "static-int8": lambda: quantize.static_int8(calib_split, progress=False)(model),
      "w8a8-matmuls": lambda: ptq.quantize_model(model, "minmax", calib_split,
                                                 progress=False),
      "w8a8-all-sites": lambda: ptq.quantize_model(model, "minmax", calib_split,
                                                   layernorm_inputs=True, progress=False),
  }
  unknown = sorted(set(names or ()) - set(build))
  if unknown:
    raise ValueError(f"unknown variants {unknown}; choose from {sorted(build)}")
  return {name: make() for name, make in build.items() if names is None or name in names}


if __name__ == "__main__":
  common.main(variants, __doc__.splitlines()[0])
