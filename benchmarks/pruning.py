"""Speed of structured pruning, unstructured masks and low-rank, side by side.

    .venv/bin/python benchmarks/pruning.py [--checkpoint checkpoints/teacher]
                                           [--preset tiny] [--out FILE.json]

Structured pruning slices heads and neurons out, so its model is smaller dense
work; unstructured and N:M masks keep the dense matmul (XLA on CPU and GPU has
no sparse kernel for them), so they are expected to run no faster; low-rank
runs two thin matmuls. All variants are timed round-robin in one process
(`evaluate.round_times`); the figures are ratios to the unpruned model.
Figures recorded on this project's machines: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import common
from vitjax import model as model_lib
from vitjax.transforms import lowrank, prune, structured


def variants(model: model_lib.Model) -> dict[str, model_lib.Model]:
  return {
      "dense": model,
      "structured heads 75% / mlp 50%": structured.heads_and_neurons(
          head_keep=0.75, mlp_keep=0.5)(model),
      "structured heads 50% / mlp 50%": structured.heads_and_neurons(
          head_keep=0.5, mlp_keep=0.5)(model),
      "structured heads 50% / mlp 25%": structured.heads_and_neurons(
          head_keep=0.5, mlp_keep=0.25)(model),
      "unstructured 50% (masked)": prune.magnitude(0.5, exclude=("embedding", "head"))(model),
      "2:4 (masked)": prune.n_m(2, 4, exclude=("embedding", "head"))(model),
      "low-rank 50% params": lowrank.svd(param_budget=0.5)(model),
  }


if __name__ == "__main__":
  common.main(variants, __doc__.splitlines()[0])
