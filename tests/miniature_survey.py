"""Runs the survey on a miniature config and synthetic data (test_survey.py).

usage: python miniature_survey.py OUT_DIR
One CPU device, as a user's CPU run has; the test checks the files it writes.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
# One CPU device per process; fast compiles as in conftest.
os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
sys.path.insert(0, os.path.dirname(__file__))

from helpers import MINI_STUDENT, MINI_TEACHER, synthetic_dataset  # noqa: E402
from vitjax import recipes, survey  # noqa: E402
from vitjax.models import config as config_lib  # noqa: E402

config_lib.PRESETS["tiny"] = MINI_TEACHER
config_lib.PRESETS["tiny-student"] = MINI_STUDENT
recipes.TEACHER_RECIPES["tiny"] = dict(recipes.TEACHER_RECIPES["tiny"], learning_rate=1e-2,
                                       batch_size=32)
settings = survey.Settings(preset="tiny", finetune_steps=3, student_epochs=0.3,
                           teacher_epochs=12, calibration=32, quick=True)
survey.run(settings, sys.argv[1], dataset=synthetic_dataset(512, 128), progress=False)
