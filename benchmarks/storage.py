"""Checkpoint sizes on disk, and whether a better entropy coder than orbax's
zstd would earn its place.

For a model (a trained checkpoint, or a preset initialized the way timm
initializes a ViT: every kernel N(0, 0.02), since the weights' distribution
decides what a coder can do) it builds fp32, int8, int4, prune-50%,
prune-2:4 and prune-50%+int8 (plain transforms, no fine-tuning: sizes do not
depend on it), saves each with `vitjax.export.save_model`, and reports the
bytes on disk as a ratio to the fp32 checkpoint on disk and to raw fp32 bytes
(4 B per parameter of the fp32 model, the convention of INC and the papers).

The coder study takes the buffers a save hands to orbax (one per dtype) and
compares, per variant: what is on disk (orbax: zstd level 3), zlib level 9,
xz/LZMA preset 9, LZMA after splitting float32 values into byte planes (the
"shuffle" filter of Blosc/HDF5), and the order-0 entropy of each buffer's
bytes (the bound a Huffman or ANS coder of independent bytes approaches).

With `--survey DIR` it instead re-saves every model of a survey run in
today's checkpoint format and reports both sizes (the survey's table gives
sizes in the format of its day).

  python benchmarks/storage.py --preset s16 --out benchmarks/results/storage-s16.json
  python benchmarks/storage.py --checkpoint checkpoints/survey/teacher
  python benchmarks/storage.py --survey checkpoints/survey
"""

from __future__ import annotations

import argparse
import json
import lzma
import pathlib
import tempfile
import zlib

import jax
import numpy as np

from vitjax import export, recipes
from vitjax import model as model_lib
from vitjax.models.config import PRESETS, preset
from vitjax.transforms import prune, quantize


def timm_like(name: str, seed: int = 0) -> model_lib.Model:
  """A preset with timm's ViT init: kernels, embeddings and heads N(0, 0.02),
  LayerNorm scales 1, biases 0."""
  model = model_lib.init(preset(name), seed)
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(
      lambda a: rng.normal(0, 0.02, np.shape(a)).astype(np.float32) if np.ndim(a) >= 2
      else np.asarray(a, np.float32), model.params)
  return model_lib.Model(model.config, params)


def variants(model: model_lib.Model) -> dict[str, model_lib.Model]:
  """The compressed forms the issue asks sizes for."""
  embed_rows = model.params["embedding"]["kernel"].shape[0]
  nm_exclude = () if embed_rows % 4 == 0 else ("embedding",)
  return {"fp32": model, "int8": quantize.weight_only(8)(model),
          "int4": quantize.weight_only(4)(model),
          "prune-50%": prune.magnitude(0.5)(model),
          "prune-2:4": prune.n_m(2, 4, exclude=nm_exclude)(model),
          "prune-50%+int8": quantize.weight_only(8)(prune.magnitude(0.5)(model))}


def entropy_bytes(buffer: np.ndarray) -> float:
  """Order-0 entropy of the buffer's bytes, in bytes."""
  counts = np.bincount(np.ascontiguousarray(buffer).view(np.uint8), minlength=256)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum() * counts.sum() / 8)


def shuffled(buffer: np.ndarray) -> bytes:
  """The byte planes of a multi-byte buffer, one after the other."""
  raw = np.ascontiguousarray(buffer)
  if raw.dtype.itemsize == 1:
    return raw.tobytes()
  return raw.view(np.uint8).reshape(-1, raw.dtype.itemsize).T.copy().tobytes()


def measure(model: model_lib.Model, xz: bool = True) -> list[dict]:
  raw_fp32 = 4 * model_lib.param_count(model)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, variant in variants(model).items():
      disk = export.save_model(variant, pathlib.Path(tmp) / name)
      meta_bytes = (pathlib.Path(tmp) / name / export.META_FILE).stat().st_size
      buffers = export.stored_buffers(variant)
      raw = sum(b.nbytes for b in buffers.values())
      rows.append({
          "variant": name, "disk_bytes": disk, "description_bytes": meta_bytes,
          "buffer_bytes": raw,
          "zlib9": sum(len(zlib.compress(b.tobytes(), 9)) for b in buffers.values()),
          "lzma9": sum(len(lzma.compress(b.tobytes(), preset=9)) for b in buffers.values())
          if xz else None,
          "lzma9_shuffled": sum(len(lzma.compress(shuffled(b), preset=9))
                                for b in buffers.values()) if xz else None,
          "entropy_bound": round(sum(entropy_bytes(b) for b in buffers.values())),
          "buffers": {k: v.nbytes for k, v in buffers.items()},
      })
      print(f"  {name}: {disk:,} B on disk", flush=True)
  base = rows[0]["disk_bytes"]
  for row in rows:
    row["vs_fp32_checkpoint"] = row["disk_bytes"] / base
    row["vs_raw_fp32"] = row["disk_bytes"] / raw_fp32
    row["orbax_zstd3_payload"] = row["disk_bytes"] - row["description_bytes"]
  return rows


def resave_survey(survey: pathlib.Path) -> tuple[list[dict], str]:
  """Every model of a survey run re-saved in today's format: rows and a table."""
  teacher_dir = survey / "teacher" / recipes.MODEL_DIR
  teacher = export.load_model(teacher_dir)
  raw = 4 * model_lib.param_count(teacher)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for model_dir in [teacher_dir] + sorted(
        p / recipes.MODEL_DIR for p in survey.iterdir()
        if (p / recipes.MODEL_DIR / export.META_FILE).exists() and p.name != "teacher"):
      model = export.load_model(model_dir)
      new = export.save_model(model, pathlib.Path(tmp) / model_dir.parent.name)
      rows.append({"method": model_dir.parent.name,
                   "format": export.read_metadata(model_dir)["version"],
                   "saved_bytes": export.disk_bytes(model_dir), "resaved_bytes": new})
  base = rows[0]["resaved_bytes"]
  lines = [f"**{survey}: sizes as saved and re-saved in format {export.VERSION}** (raw "
           f"fp32 of the teacher: {raw:,} B)", "",
           "| method | as saved (format) | re-saved | vs fp32 checkpoint | vs raw fp32 |",
           "|---|---:|---:|---:|---:|"]
  for r in rows:
    r["vs_fp32_checkpoint"], r["vs_raw_fp32"] = r["resaved_bytes"] / base, \
        r["resaved_bytes"] / raw
    lines.append(f"| {r['method']} | {r['saved_bytes']:,} ({r['format']}) | "
                 f"{r['resaved_bytes']:,} | {r['vs_fp32_checkpoint']:.3f}x | "
                 f"{r['vs_raw_fp32']:.3f}x |")
  return rows, "\n".join(lines)


def _n(value: int | None) -> str:
  return "not run" if value is None else f"{value:,}"


def markdown(rows: list[dict], title: str, raw_fp32: int) -> str:
  lines = [f"**{title}** (raw fp32: {raw_fp32:,} B)", "",
           "| variant | on disk (B) | vs fp32 ckpt | vs raw fp32 | description (B) | "
           "zstd-3 payload | zlib-9 | xz-9 | xz-9 byte-planes | order-0 entropy |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['variant']} | {r['disk_bytes']:,} | {r['vs_fp32_checkpoint']:.3f} | "
        f"{r['vs_raw_fp32']:.3f} | {r['description_bytes']:,} | "
        f"{r['orbax_zstd3_payload']:,} | {r['zlib9']:,} | {_n(r['lzma9'])} | "
        f"{_n(r['lzma9_shuffled'])} | {r['entropy_bound']:,} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", default=None, help="a trained run or model directory")
  parser.add_argument("--preset", default="s16", choices=sorted(PRESETS),
                      help="without --checkpoint: this preset, timm-initialized")
  parser.add_argument("--survey", default=None,
                      help="re-save a survey run's models in today's format instead")
  parser.add_argument("--no-xz", action="store_true",
                      help="skip the xz columns (minutes per variant on an s16)")
  parser.add_argument("--out", default=None, help="also write the figures as JSON")
  args = parser.parse_args()
  if args.survey:
    rows, text = resave_survey(pathlib.Path(args.survey))
    print(text)
    if args.out:
      pathlib.Path(args.out).write_text(json.dumps({"rows": rows, "markdown": text}, indent=1))
    return
  if args.checkpoint:
    model = export.load_model(recipes.model_dir_of(args.checkpoint))
    title = f"{args.checkpoint} ({model_lib.param_count(model):,} parameters)"
  else:
    model = timm_like(args.preset)
    title = f"{args.preset}, timm init N(0, 0.02) ({model_lib.param_count(model):,} parameters)"
  print(title, flush=True)
  rows = measure(model, xz=not args.no_xz)
  text = markdown(rows, title, 4 * model_lib.param_count(model))
  print(text)
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(
        {"title": title, "raw_fp32_bytes": 4 * model_lib.param_count(model), "rows": rows,
         "markdown": text}, indent=1))


if __name__ == "__main__":
  main()
