"""The PTQ recipes at DeiT-tiny shape (224x224, patch 16, 197 tokens, dim 192,
depth 12, 3 heads): agreement of each quantized model with its fp32 logits.

No pretrained weights are read (vitjax imports none yet, and nothing is
downloaded): the model is a random init with a non-zero head (normal, std
0.02, as timm initializes heads), so this checks that the methods run and
behave at a realistic token count, not accuracy. Random weights lack the
outlier channels and peaked attention of a trained ViT, which are what the
ViT-specific quantizers exist for, so expect small differences between
recipes here.

Calibration: 32 Fashion-MNIST calibration images (training split), scored on
128 validation images, both resized to 224x224 and repeated to 3 channels.

  .venv/bin/python experiments/ptq_deit_tiny.py        # ~15 min on 2 cores

Writes experiments/results/ptq_deit_tiny.{json,md}.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import data as data_lib
from vitjax import model as model_lib
from vitjax.models.config import ViTConfig
from vitjax.models.inputs import preprocess
from vitjax.transforms import ptq

HERE = pathlib.Path(__file__).parent
RECIPES = ("minmax", "fqvit", "ptq4vit", "repqvit")
BITS = ((8, 8), (6, 6), (4, 4))


def deit_tiny(dataset: data_lib.Dataset) -> model_lib.Model:
  config = ViTConfig(image_size=224, patch_size=16, channels=3, num_classes=1000, dim=192,
                     depth=12, num_heads=3, mlp_dim=768, pixel_mean=dataset.pixel_mean,
                     pixel_std=dataset.pixel_std)
  m = model_lib.init(config, 0)
  head = dict(m.params["head"])
  head["kernel"] = 0.02 * jax.random.normal(jax.random.PRNGKey(1), head["kernel"].shape)
  return m.replace(params={**m.params, "head": head})


def logits(m: model_lib.Model, images: np.ndarray) -> np.ndarray:
  fn = jax.jit(lambda mm, x: model_lib.apply(mm, preprocess(x, mm.config)))
  return np.concatenate([np.asarray(fn(m, images[i:i + 32]))
                         for i in range(0, len(images), 32)])


def agreement(ref: np.ndarray, got: np.ndarray) -> dict:
  p = jax.nn.log_softmax(jnp.asarray(ref), -1)
  q = jax.nn.log_softmax(jnp.asarray(got), -1)
  kl = float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))
  return {"top1_agreement": float(np.mean(ref.argmax(-1) == got.argmax(-1))), "kl": kl}


def main() -> None:
  dataset = data_lib.load("fashion_mnist")
  calibration = dataset.calibration.take(slice(0, 32))
  images = dataset.validation.images[:128]
  model = deit_tiny(dataset)
  ref = logits(model, images)
  print(f"DeiT-tiny shape: {model_lib.site_addresses(model).__len__()} sites, "
        f"{ref.shape[0]} images", flush=True)
  rows = []
  for w, a in BITS:
    for recipe in RECIPES:
      start = time.perf_counter()
      q = ptq.quantize_model(model, recipe, calibration, w_bits=w, a_bits=a, progress=False)
      row = {"recipe": recipe, "w": w, "a": a, **agreement(ref, logits(q, images)),
             "seconds": round(time.perf_counter() - start, 1)}
      rows.append(row)
      print(f"W{w}A{a} {recipe:8s} top-1 agreement {row['top1_agreement'] * 100:.1f}% "
            f"KL {row['kl']:.4f} ({row['seconds']} s)", flush=True)
  out = HERE / "results"
  out.mkdir(exist_ok=True)
  (out / "ptq_deit_tiny.json").write_text(json.dumps(rows, indent=1))
  lines = ["| bits | " + " | ".join(RECIPES) + " |", "|---|" + "---:|" * len(RECIPES)]
  for w, a in BITS:
    cells = [next(r for r in rows if r["recipe"] == k and r["w"] == w) for k in RECIPES]
    lines.append(f"| W{w}A{a} | " + " | ".join(
        f"{c['top1_agreement'] * 100:.1f}% / {c['kl']:.4f}" for c in cells) + " |")
  text = ("Top-1 agreement with fp32 / KL(fp32 || quantized), DeiT-tiny shape, random "
          "init, 128 images\n\n" + "\n".join(lines) + "\n")
  (out / "ptq_deit_tiny.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
