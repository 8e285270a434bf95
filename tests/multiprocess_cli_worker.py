"""One process of the 2-process x 2-device `vitjax train` run (test_multiprocess.py).

usage: python multiprocess_cli_worker.py PROCESS_ID PORT ARG...

Runs `vitjax train ARG... --coordinator localhost:PORT --num-processes 2
--process-id PROCESS_ID` through `vitjax.cli.main`, with the "tiny" preset
swapped for the tests' small one (`helpers.TINY`, 8x8 images), then prints
"model writes: N", the times this process wrote the exported model.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                           "--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")

sys.path.insert(0, os.path.dirname(__file__))
from helpers import TINY, count_model_writes  # noqa: E402
from vitjax import cli  # noqa: E402
from vitjax.models import config as config_lib  # noqa: E402

process_id, port, args = sys.argv[1], sys.argv[2], sys.argv[3:]
config_lib.PRESETS["tiny"] = TINY

writes = count_model_writes()
rc = cli.main(["train", *args, "--coordinator", f"localhost:{port}", "--num-processes", "2",
               "--process-id", process_id])
print(f"model writes: {writes[0]}", flush=True)
sys.exit(rc)
