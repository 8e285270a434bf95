"""One process of the 2-process distillation test (run by test_distill.py).

usage: python multihost_worker.py PROCESS_ID PORT OUT_FILE
Trains a tiny student from a tiny teacher on synthetic data with the global
mesh over both processes' CPU devices, then writes the student's parameters.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
# One CPU device per process; fast compiles as in conftest.
os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")

from vitjax import sharding  # noqa: E402

process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sharding.initialize_distributed(f"localhost:{port}", 2, process_id)

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from helpers import TINY, synthetic_split  # noqa: E402
from vitjax import distill, train  # noqa: E402
from vitjax import model as model_lib  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 2
teacher = model_lib.init(TINY, 1)
student = model_lib.init(TINY.replace(dim=8, num_heads=2, mlp_dim=16, distilled=True), 2)
cfg = train.TrainConfig(steps=3, batch_size=16, warmup_steps=1)
trained = distill.fit_student(teacher, student, synthetic_split(64), cfg,
                              distill.DistillConfig(soft=0.5, hard=0.0, temperature=2.0),
                              progress=False)
np.savez(out, *[np.asarray(x) for x in jax.tree_util.tree_leaves(trained.params)])
