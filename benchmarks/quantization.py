"""Latency and throughput of fp32 vs every quantized variant, side by side.

`w8a8-matmuls` quantizes every matmul's inputs (linear layers, q.kT, probs.v;
`ptq` recipe minmax) and `w8a8-all-sites` the LayerNorm inputs as well.
`w4a4-<recipe>` are the fqvit, ptq4vit and repqvit recipes at W4A4, whose
log / twin-uniform operands multiply as int8 planes (`quantizers.planes`);
`w4a4-<recipe>-value-sites` holds the same quantizers at the softmax and
GELU value sites instead, so probs.v and Dense_1 run in float after them.

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
from vitjax.quantizers.planes import has_planes
from vitjax.transforms import ptq, quantize


def at_value_sites(m: model_lib.Model) -> model_lib.Model:
  """`m` with its probs.v left-operand quantizers moved to the softmax site
  and its twin-uniform Dense_1 input quantizers to the GELU site: the same
  values, then float matmuls there."""
  sites = dict(m.sites)
  for address in [a for a in sites if a.endswith("/pv") and sites[a].lhs is not None]:
    sites[address[:-len("pv")] + "softmax"] = sites[address].lhs
    sites[address] = sites[address].replace(lhs=None)
  for address in [a for a in sites if a.endswith("/Dense_1/input") and has_planes(sites[a])]:
    sites[address[:-len("Dense_1/input")] + "gelu"] = sites.pop(address)
  return m.replace(sites=sites)


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
  for recipe in ("fqvit", "ptq4vit", "repqvit"):
    make = (lambda r: lambda: ptq.quantize_model(model, r, calib_split, w_bits=4, a_bits=4,
                                                 progress=False))(recipe)
    build[f"w4a4-{recipe}"] = make
    build[f"w4a4-{recipe}-value-sites"] = (lambda f: lambda: at_value_sites(f()))(make)
  unknown = sorted(set(names or ()) - set(build))
  if unknown:
    raise ValueError(f"unknown variants {unknown}; choose from {sorted(build)}")
  return {name: make() for name, make in build.items() if names is None or name in names}


if __name__ == "__main__":
  common.main(variants, __doc__.splitlines()[0])
