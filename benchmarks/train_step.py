"""What a training step of the survey's ViT teacher and student costs under
other batch sizes, kept-token counts, device splits and compute dtypes: the
measurements behind "the trainings' time is their arithmetic".

    .venv/bin/python benchmarks/train_step.py [--steps 120] [--out FILE.json]

Each case trains the recipe's first `--steps` steps on Fashion-MNIST in a
fresh process (the host device count is fixed when JAX starts; the case's
`XLA_FLAGS` replaces the caller's) and reports the median step time after
step 20 (`common.step_ms`). Cases:

  teacher, batch B            the teacher recipe at global batch B, 2 host devices;
  teacher, keep K of 16       patch dropout keeping K patch tokens, batch 128;
  teacher, N device(s)        the recipe with the CPU split into N host devices;
  teacher, bfloat16           the recipe with `ViTConfig.dtype="bfloat16"`;
  student, N device(s)        the distillation student's recipe (labels only);
  student, 2 side by side     two 1-device student trainings at once, each
                              pinned to its own core (Linux only).

Also times a lone bfloat16 x bfloat16 -> float32 dot against a float32 one
at the teacher's MLP shape (896 x 128 x 256, one device). Figures:
benchmarks/RESULTS.md ("The main job again").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

# (name, host devices, what to train, overrides of the recipe).
CASES: list[tuple[str, int, str, dict]] = (
    [(f"teacher, batch {b}", 2, "teacher", {"batch_size": b}) for b in (64, 128, 256)]
    + [(f"teacher, keep {k} of 16", 2, "teacher", {"patch_dropout": 1 - k / 16})
       for k in (4, 5, 8)]
    + [("teacher, 1 device(s)", 1, "teacher", {}), ("teacher, 4 device(s)", 4, "teacher", {}),
       ("teacher, bfloat16", 2, "teacher", {"dtype": "bfloat16"}),
       ("student, 2 device(s)", 2, "student", {}), ("student, 1 device(s)", 1, "student", {})])


def _child(model: str, overrides: dict, steps: int) -> float:
  """ms per step of one case, in this process (JAX not yet started)."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import common  # noqa: PLC0415

  from vitjax import data as data_lib  # noqa: PLC0415
  from vitjax import recipes  # noqa: PLC0415
  dataset = data_lib.load("fashion_mnist")
  overrides = dict(overrides)
  dtype = overrides.pop("dtype", None)
  teacher = recipes.model_config("tiny", dataset)
  if model == "teacher":
    images = recipes.teacher_images("tiny", dataset, hold_out_validation=True)
    config = teacher
    cfg = recipes.teacher_train_config("tiny", len(images), steps=steps)
  else:
    name = recipes.STUDENT_PRESETS["tiny"]
    images = recipes.student_images(name, dataset, hold_out_validation=True)
    config = recipes.student_config(name, teacher)
    cfg = recipes.student_train_config(name, len(images), steps=steps)
  if dtype is not None:
    config = config.replace(dtype=dtype)
  cfg = dataclasses.replace(cfg, log_every=1, **overrides)
  return common.step_ms(config, images, cfg)


def _spawn(devices: int, model: str, overrides: dict, steps: int,
           core: int | None = None) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
  return subprocess.Popen(
      [sys.executable, __file__, "--child", json.dumps([model, overrides, steps])],
      env=env, stdout=subprocess.PIPE, text=True, preexec_fn=pin)


def _result(proc: subprocess.Popen) -> float:
  out, _ = proc.communicate()
  if proc.returncode != 0:
    raise RuntimeError(f"a benchmark case failed (exit {proc.returncode})")
  return float(out.strip().splitlines()[-1])


def _lone_dot_us() -> dict[str, float]:
  """Median microseconds of a 896x128 @ 128x256 dot: float32, and bfloat16
  operands accumulated in float32, timed in alternation
  (`evaluate.round_robin`)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from vitjax import evaluate  # noqa: PLC0415
  x = jax.random.normal(jax.random.PRNGKey(0), (896, 128))
  w = jax.random.normal(jax.random.PRNGKey(1), (128, 256))
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  f32 = jax.jit(jnp.matmul)
  bf16 = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  times = evaluate.round_robin({"float32": lambda: f32(x, w),
                                "bfloat16 operands": lambda: bf16(xb, wb)},
                               rounds=30, calls=10)
  return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--out", default=None)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child is not None:
    model, overrides, steps = json.loads(args.child)
    print(_child(model, overrides, steps))
    return
  if args.steps < 40:
    parser.error(f"--steps {args.steps}: need at least 40 (the median starts at step 20)")
  rows: dict[str, float] = {}
  for name, devices, model, overrides in CASES:
    rows[name] = _result(_spawn(devices, model, overrides, args.steps))
    print(f"{name}: {rows[name]:.1f} ms per step", flush=True)
  if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
    cores = sorted(os.sched_getaffinity(0))[:2]
    procs = [_spawn(1, "student", {}, args.steps, core) for core in cores]
    for core, proc in zip(cores, procs):
      rows[f"student, side by side, core {core}"] = _result(proc)
    print("student, 2 side by side: " + " and ".join(
        f"{rows[f'student, side by side, core {c}']:.1f}" for c in cores) + " ms per step",
          flush=True)
  dots = _lone_dot_us()
  print("lone 896x128x256 dot: " + ", ".join(f"{k} {v:.0f} us" for k, v in dots.items()))
  if args.out:
    from vitjax import xla_cpu  # noqa: PLC0415
    with open(args.out, "w") as f:
      json.dump({"cpu": xla_cpu.cpu_description(), "steps": args.steps,
                 "ms_per_step": rows, "lone_dot_us": dots}, f, indent=1)


if __name__ == "__main__":
  main()
