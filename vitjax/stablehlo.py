"""Deployable StableHLO artifacts: a model's whole inference path, serialized
with `jax.export`, runnable without vitjax.

An artifact directory holds:
  forward.jaxexport  `jax.export.Exported.serialize()`: raw pixels
                     (B, H, W, C) -> normalization and resize -> the model
                     (fp32, int8 or int4: its integer dots stay integer dots)
                     -> float32 logits (B, classes). The batch is symbolic
                     (any B) unless a fixed one was asked for.
  forward.mlir       the same module as StableHLO text, to read or diff, with
                     the weight constants elided (a W8A8 model shows
                     `stablehlo.dot_general` on i8 operands accumulating in i32).
  signature.json     input shape/dtype, output, platforms, the model config.

`load(path)` needs only `jax`: `jax.export.deserialize(bytes).call(images)`.
Weights are constants inside the module, so the artifact is self-contained
(its size is about the checkpoint's, uncompressed).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import typing
import uuid
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import export as export_lib
from vitjax import model as model_lib
from vitjax.models.inputs import preprocess

SERIALIZED, MLIR, SIGNATURE = "forward.jaxexport", "forward.mlir", "signature.json"
InputDtype = Literal["uint8", "float32"]
INPUT_DTYPES: tuple[str, ...] = typing.get_args(InputDtype)
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def exported(model: model_lib.Model, *, batch: int | None = None,
             input_shape: Sequence[int] | None = None, input_dtype: InputDtype = "uint8",
             platforms: Sequence[str] | None = None) -> jax.export.Exported:
  """`jax.export` of `model`'s inference path (raw pixels -> logits).

  Args:
    model: any vitjax model, compressed or not (a model prepared for the CPU
      int8 kernel is exported with XLA's dots: the artifact holds no custom
      call, so it runs wherever jax.export artifacts run).
    batch: a fixed batch size; None for a symbolic one.
    input_shape: (H, W, C) of the raw images (default: the model's own);
      other sizes are resized inside, a single channel repeated for RGB models.
    input_dtype: 'uint8' (0..255) or 'float32' (0..1).
    platforms: lowering platforms (default: the current backend).

  Raises:
    ValueError: a batch < 1, a malformed input shape, an unknown dtype or
      platform.
  """
  cfg = model.config
  if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or
                            batch < 1):
    raise ValueError(f"batch must be a positive int or None (symbolic), got {batch!r}")
  shape = tuple(input_shape) if input_shape is not None else (
      cfg.image_size, cfg.image_size, cfg.channels)
  if len(shape) != 3 or not all(isinstance(d, int) and d >= 1 for d in shape) or \
      shape[2] not in (1, cfg.channels):
    raise ValueError(f"input_shape must be (H, W, C) positive ints with C 1 or "
                     f"{cfg.channels}, got {input_shape!r}")
  if input_dtype not in INPUT_DTYPES:
    raise ValueError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
  unknown = sorted(set(platforms or ()) - set(PLATFORMS))
  if unknown or (platforms is not None and not platforms):
    raise ValueError(f"platforms must be a non-empty subset of {PLATFORMS}, got "
                     f"{platforms!r}")

  b = batch if batch is not None else jax.export.symbolic_shape("b")[0]
  spec = jax.ShapeDtypeStruct((b, *shape), jnp.dtype(input_dtype))
  return jax.export.export(jax.jit(inference_fn(model_lib.portable(model))),
                           platforms=platforms)(spec)


def inference_fn(model: model_lib.Model) -> Callable[[jax.Array], jax.Array]:
  """The function an artifact serializes: raw pixels -> preprocessing ->
  `model` -> float32 logits (jit it to compare with a reloaded artifact)."""
  def forward(images: jax.Array) -> jax.Array:
    return model_lib.apply(model, preprocess(images, model.config)).astype(jnp.float32)
  return forward


def save(model: model_lib.Model, path: str | os.PathLike, *, batch: int | None = None,
         input_shape: Sequence[int] | None = None, input_dtype: InputDtype = "uint8",
         platforms: Sequence[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Writes the artifact directory `path`; returns its signature.

  Written into a temporary sibling and renamed into place: an interrupted
  export leaves nothing half-written.

  Raises:
    FileExistsError: `path` exists and not `overwrite`.
    ValueError: see `exported`.
  """
  path = pathlib.Path(path).absolute()
  export_lib.check_output_path(path, overwrite)
  exp = exported(model, batch=batch, input_shape=input_shape, input_dtype=input_dtype,
                 platforms=platforms)
  signature = {
      "format": "vitjax-stablehlo", "version": 1,
      "input": {"shape": [None if batch is None else batch,
                          *[int(d) for d in exp.in_avals[0].shape[1:]]],
                "dtype": input_dtype,
                "scale": "0..255" if input_dtype == "uint8" else "0..1"},
      "output": {"shape": [None if batch is None else batch, model.config.num_classes],
                 "dtype": "float32", "meaning": "logits"},
      "platforms": list(exp.platforms), "config": model.config.to_dict(),
      "jax_version": jax.__version__}
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    tmp.mkdir(parents=True)
    (tmp / SERIALIZED).write_bytes(exp.serialize())
    (tmp / MLIR).write_text(readable_mlir(exp.mlir_module()))
    (tmp / SIGNATURE).write_text(json.dumps(signature, indent=1))
    if path.exists():
      shutil.rmtree(path)
    tmp.rename(path)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return signature


def load(path: str | os.PathLike) -> Callable[[Any], jax.Array]:
  """The artifact's forward function (images -> logits), from `path`.

  This is what a deployment does, and it needs only `jax`:
  `jax.export.deserialize(open(path / 'forward.jaxexport', 'rb').read()).call`.

  Raises:
    FileNotFoundError: `path` has no serialized module.
  """
  file = pathlib.Path(path) / SERIALIZED
  if not file.is_file():
    raise FileNotFoundError(f"{path} is not a vitjax StableHLO artifact: {SERIALIZED} "
                            "is missing")
  return jax.export.deserialize(bytearray(file.read_bytes())).call


def readable_mlir(mlir: str) -> str:
  """Module text with every constant longer than 64 hex digits elided (the
  weights), so that the ops can be read; not meant to be parsed back."""
  return re.sub(r'dense<"0x[0-9A-Fa-f]{64,}">', 'dense<"...elided...">', mlir)


def integer_dots(mlir: str) -> int:
  """How many `stablehlo.dot_general` ops of a module's text take integer
  (i8 or i4) operands."""
  return sum(1 for line in mlir.splitlines()
             if "stablehlo.dot_general" in line and
             any(f"x{t}>" in line.split("->")[0] for t in ("i8", "i4")))


def random_images(signature: dict[str, Any], batch: int, seed: int = 0) -> np.ndarray:
  """A batch of random raw images matching an artifact's input signature."""
  shape = [batch] + signature["input"]["shape"][1:]
  rng = np.random.default_rng(seed)
  if signature["input"]["dtype"] == "uint8":
    return rng.integers(0, 256, shape).astype(np.uint8)
  return rng.random(shape, dtype=np.float32)
