"""Runs `vitjax survey` (the CLI) on a miniature config and synthetic npz data
(test_survey.py).

usage: python miniature_survey.py OUT_DIR
One CPU device, as a user's CPU run has; the test checks the files it writes.
"""

import os
import pathlib
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
# One CPU device per process; fast compiles as in conftest.
os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from helpers import MINI_STUDENT, MINI_TEACHER, synthetic_split  # noqa: E402
from vitjax import cli, recipes  # noqa: E402
from vitjax.models import cnn as cnn_lib  # noqa: E402
from vitjax.models import config as config_lib  # noqa: E402

config_lib.PRESETS["tiny"] = MINI_TEACHER
config_lib.PRESETS["tiny-student"] = MINI_STUDENT
cnn_lib.CNN_PRESETS["tiny-cnn"] = cnn_lib.CNNConfig(
    image_size=MINI_TEACHER.image_size, channels=1, num_classes=MINI_TEACHER.num_classes,
    widths=(8, 16), blocks=(1, 1), groups=4, stem_stride=1)
recipes.TEACHER_RECIPES["tiny"] = dict(recipes.TEACHER_RECIPES["tiny"], learning_rate=1e-2,
                                       batch_size=32)
out = pathlib.Path(sys.argv[1])
data_dir = out.parent / "data"
data_dir.mkdir(parents=True, exist_ok=True)
for name, n, seed in (("train.npz", 576, 0), ("test.npz", 128, 1)):
  split = synthetic_split(n, MINI_TEACHER, seed)
  np.savez(data_dir / name, images=split.images, labels=split.labels)
sys.exit(cli.main(["survey", "--quick", "--teacher-epochs", "12", "--finetune-steps", "3",
                   "--student-epochs", "0.3", "--dataset", "npz", "--data-dir", str(data_dir),
                   "--out", str(out)]))
