"""The auto-tuner: sensitivity, mixed-precision allocation, multi-objective
search, and compression policies as files.

  space        what can be done to one layer (`LayerSetting`, `compress`);
  policy       `CompressionPolicy`: rules per layer, structured counts, op-level
               site rules; JSON files; `apply_policy`;
  emulate      one-compile evaluation of many plans (exact weights);
  sensitivity  per place x setting drops, Hessian-trace proxy;
  allocate     per-layer choice under a budget: integer program and greedy;
  search       NSGA-II and the on-disk history;
  tuner        `tune`: all of the above under a `Budget`.
"""

from vitjax.tune.policy import CompressionPolicy, LayerRule, apply_policy, load, save
from vitjax.tune.space import LayerSetting
from vitjax.tune.tuner import Budget, TuneConfig, tune

__all__ = ["Budget", "CompressionPolicy", "LayerRule", "LayerSetting", "TuneConfig",
           "apply_policy", "load", "save", "tune"]
