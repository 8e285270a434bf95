"""One process of the 2-process x 2-device distillation run (test_multiprocess.py).

usage: python multiprocess_run_worker.py PROCESS_ID PORT WORKDIR STOP_AT

Distills a tiny DeiT student from a frozen CNN teacher, FSDP-sharded over the
4 devices of both processes, checkpointing every 2 steps in WORKDIR/train.
STOP_AT > 0: the process dies (os._exit, no clean-up) right after step STOP_AT,
as a killed job does. STOP_AT = 0: trains to the end (resuming from the last
checkpoint), exports the student to WORKDIR/model, and writes the params it
returned to WORKDIR/params-PROCESS_ID.npz. Prints "model writes: N", the times
this process wrote the export.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                           "--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")

from vitjax import sharding  # noqa: E402

process_id, port, workdir, stop_at = (int(sys.argv[1]), sys.argv[2], sys.argv[3],
                                      int(sys.argv[4]))
sharding.initialize_distributed(f"localhost:{port}", 2, process_id)

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from helpers import count_model_writes, multiprocess_run_setup  # noqa: E402
from vitjax import distill, export  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 4
teacher, student, split, cfg, dcfg = multiprocess_run_setup()

writes = count_model_writes()


def die_at(step, metrics):
  if stop_at and step == stop_at:
    print(f"killed after step {step}", flush=True)
    os._exit(17)


trained = distill.fit_student(teacher, student, split, cfg, dcfg,
                              workdir=os.path.join(workdir, "train"), progress=False,
                              on_step=die_at)
export.save_model(trained, os.path.join(workdir, "model"), overwrite=True,
                  metadata={"run": "multiprocess test"})
print(f"model writes: {writes[0]}", flush=True)
np.savez(os.path.join(workdir, f"params-{process_id}.npz"),
         *[np.asarray(x) for x in jax.tree_util.tree_leaves(trained.params)])
