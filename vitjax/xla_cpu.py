"""How XLA compiles a model's inference on the CPU: the YNNPACK choice, measured.

XLA's CPU backend (jaxlib 0.10) hands dots, and the reductions and elementwise
ops around them, to YNNPACK fusions by default. That is XLA's only fast kernel
for int8 x int8 -> int32 dots, but for float matmuls at ViT shapes XLA's own
Eigen-backed dot is often faster: in benchmarks/peer.py on this project's
2-core AMD EPYC, DeiT-tiny fp32 at batch 64 took 2.07 s with YNNPACK fusions
off against 2.86 s with XLA's default, while the tiny Fashion-MNIST model
kept XLA's default at batch 64. Neither choice wins everywhere, so vitjax
measures it.

`vitjax.evaluate.fastest_options(model, batch)` times the forward pass
compiled with each of `CANDIDATES` on this machine and returns the faster
one's compiler options, which `evaluate` passes on to
`jax.jit(..., compiler_options=...)`. The choice is per executable, so a
process can hold float and integer models compiled differently, and it is
never made silently: vitjax's command line and survey call it; library
functions compile with XLA's defaults unless given options.
`xla_flags(options)` spells the same choice as an `XLA_FLAGS` entry for a
whole process.
"""

from __future__ import annotations

import os
import platform
import typing
from typing import Literal, Mapping

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"

# The candidates compared, by name: XLA's defaults, and YNNPACK fusions off
# (an empty list of fusion types).
CANDIDATES: dict[str, dict[str, str]] = {
    "xla-default": {},
    "ynn-off": {YNN_FUSION_TYPE: ""},
}
Candidate = Literal["xla-default", "ynn-off"]
assert set(typing.get_args(Candidate)) == set(CANDIDATES)


def options_for(name: Candidate, backend: str) -> dict[str, str] | None:
  """The compiler options of candidate `name` for `jax.jit` on `backend`:
  None (XLA's defaults) for "xla-default" and on any backend but "cpu", whose
  compilers do not know these options.

  Raises:
    ValueError: `name` is not one of `CANDIDATES`.
  """
  if name not in CANDIDATES:
    raise ValueError(f"XLA CPU candidate {name!r} is unknown; choose one of "
                     f"{tuple(CANDIDATES)}")
  return dict(CANDIDATES[name]) or None if backend == "cpu" else None


def candidate_name(options: Mapping[str, str]) -> str:
  """The `CANDIDATES` name of `options`.

  Raises:
    ValueError: `options` is not one of `CANDIDATES`.
  """
  for name, known in CANDIDATES.items():
    if dict(options) == known:
      return name
  raise ValueError(f"options {dict(options)} are not one of the candidates "
                   f"{CANDIDATES}")


def xla_flags(options: Mapping[str, str]) -> str:
  """`options` as `XLA_FLAGS` entries (`--name=value`), for a whole process."""
  return " ".join(f"--{k}={v}" for k, v in options.items())


def cpu_description() -> str:
  """The host CPU as speed figures need it: model name, logical CPUs, and its
  widest vector extensions (avx512f, avx512_vnni, amx_int8, avx2), from
  /proc/cpuinfo where there is one, else `platform`."""
  name, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          name = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
  except OSError:
    pass
  wide = [f for f in ("amx_int8", "avx512_vnni", "avx512f", "avx2") if f in flags]
  return f"{name}, {os.cpu_count()} CPUs" + (f", {'/'.join(wide)}" if wide else "")
