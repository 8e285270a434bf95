"""Sensitivity of every place of the ViT to every compression setting, and a
Hessian-trace proxy for it.

`measure` compresses one place at a time (a linear layer with each weight
setting of a menu or each activation bit width, or one block's heads or MLP
neurons with each keep ratio) and records the accuracy and the agreement
with the uncompressed model on the emulator's evaluation images (the
validation split). `hessian_traces` estimates each layer's Hessian trace
of the training loss (Hutchinson: E[v^T H v] over Rademacher v, H v by
forward-over-reverse differentiation, as HAWQ does); `proxy` turns it into
HAWQ-V2's score tr(H)/n * ||W_hat - W||^2, and `rank_agreement` says how
well that cheap score ranks the places against the measured drops.
`layer_latency` times each layer's matmul under each setting, for a
latency-budgeted allocation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from vitjax import data as data_lib
from vitjax import evaluate, leaves, losses
from vitjax import model as model_lib
from vitjax import progress as progress_lib
from vitjax.model import Model
from vitjax.models.inputs import preprocess
from vitjax.quantizers.uniform import Uniform
from vitjax.transforms import site_calibration
from vitjax.transforms.select import get_kernel, set_kernels
from vitjax.tune import space
from vitjax.tune.emulate import Emulator, Plan
from vitjax.tune.space import LayerSetting


@dataclasses.dataclass(frozen=True)
class Table:
  """Places (rows) x settings (columns); NaN where a setting does not apply.

  Attributes:
    places: linear-layer paths, then `<block>/heads` and `<block>/mlp`.
    settings: setting names (`space` names, "a8" for activations alone,
      "keep0.75" for structured keep ratios).
    accuracy: % on the evaluation images.
    agreement: % of predictions equal to the uncompressed model's.
    reference_accuracy: the uncompressed model's %.
    bytes: stored bytes of the model with that one place compressed.
  """

  places: tuple[str, ...]
  settings: tuple[str, ...]
  accuracy: np.ndarray
  agreement: np.ndarray
  reference_accuracy: float
  bytes: np.ndarray

  @property
  def drop(self) -> np.ndarray:
    """Accuracy drop in points (positive: worse)."""
    return self.reference_accuracy - self.accuracy

  def to_dict(self) -> dict[str, Any]:
    clean = lambda a: [[None if np.isnan(v) else round(float(v), 4) for v in row]  # noqa: E731
                       for row in a]
    return {"places": list(self.places), "settings": list(self.settings),
            "reference_accuracy": self.reference_accuracy,
            "accuracy": clean(self.accuracy), "agreement": clean(self.agreement),
            "bytes": clean(self.bytes)}

  @classmethod
  def from_dict(cls, doc: dict[str, Any]) -> Table:
    """The table `to_dict` wrote."""
    table = lambda key: np.array([[np.nan if v is None else v for v in row]  # noqa: E731
                                  for row in doc[key]], np.float64)
    return cls(tuple(doc["places"]), tuple(doc["settings"]), table("accuracy"),
               table("agreement"), float(doc["reference_accuracy"]), table("bytes"))


def measure(emulator: Emulator, menu: Sequence[str] = space.DEFAULT_MENU, *,
            a_bits: Sequence[int] = space.ACTIVATION_BITS,
            keeps: Sequence[float] = (0.75, 0.5), progress: bool = False) -> Table:
  """The sensitivity table (see the module docstring).

  Raises:
    ValueError: an unknown setting name, activation bits the emulator did
      not calibrate, or a keep ratio outside (0, 1).
  """
  weight = [space.parse(name) for name in menu if name != "fp32"]
  for bits in a_bits:
    if bits not in emulator.fits:
      raise ValueError(f"a_bits={bits} was not calibrated; the emulator has "
                       f"{sorted(emulator.fits)}")
  for k in keeps:
    if not 0 < k < 1:
      raise ValueError(f"keep ratio {k} is outside (0, 1)")
  columns = [s.name for s in weight] + [f"a{b}" for b in a_bits] + [f"keep{k:g}" for k in keeps]
  cfg = emulator.model.config
  blocks = [f"Transformer/encoderblock_{i}" for i in range(cfg.depth)]
  places = list(emulator.layers) + [f"{b}/heads" for b in blocks] + [f"{b}/mlp" for b in blocks]
  shape = (len(places), len(columns))
  acc, agree, size = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
  jobs: list[tuple[int, int, Plan]] = []
  for r, layer in enumerate(emulator.layers):
    kernel_shape = tuple(np.shape(get_kernel(emulator.model.params, layer)))
    for c, setting in enumerate(weight):
      if space.applies_to(setting, kernel_shape):
        jobs.append((r, c, Plan({layer: setting})))
    for j, bits in enumerate(a_bits):
      jobs.append((r, len(weight) + j, Plan({layer: LayerSetting(a_bits=bits)})))
  for i in range(cfg.depth):
    for j, k in enumerate(keeps):
      c = len(weight) + len(a_bits) + j
      heads = [cfg.heads(b) for b in range(cfg.depth)]
      mlp = [cfg.mlp_width(b) for b in range(cfg.depth)]
      heads[i] = max(1, round(k * heads[i]))
      mlp[i] = max(1, round(k * mlp[i]))
      jobs.append((len(emulator.layers) + i, c, Plan({}, heads=tuple(heads))))
      jobs.append((len(emulator.layers) + cfg.depth + i, c, Plan({}, mlp=tuple(mlp))))
  bar = progress_lib.bar(len(jobs), "sensitivity", enabled=progress)
  for r, c, plan in jobs:
    outcome = emulator.evaluate(plan)
    acc[r, c], agree[r, c] = outcome.accuracy, outcome.agreement
    size[r, c] = emulator.stored_bytes(plan)
    bar.update(1)
  bar.close()
  reference = emulator.evaluate(Plan({})).accuracy
  return Table(tuple(places), tuple(columns), acc, agree, reference, size)


def hessian_traces(model: Model, calibration: data_lib.Split, layers: Sequence[str], *,
                   probes: int = 8, batch_size: int = 256, seed: int = 0) -> dict[str, float]:
  """Layer -> Hutchinson estimate of the trace of the training loss's Hessian
  with respect to that layer's kernel (cross-entropy on `calibration` labels,
  `probes` Rademacher vectors, one Hessian-vector product each covering all
  layers).

  Raises:
    ValueError: calibration not from the training split, probes < 1.
  """
  site_calibration.check_training_split(calibration)
  if probes < 1:
    raise ValueError(f"probes={probes} must be >= 1")
  images = jnp.asarray(calibration.images[:batch_size])
  labels = jnp.asarray(calibration.labels[:batch_size])
  kernels = {layer: jnp.asarray(get_kernel(model.params, layer), jnp.float32)
             for layer in layers}

  def loss(k: dict[str, jax.Array]) -> jax.Array:
    m = model.replace(params=set_kernels(model.params, k))
    return losses.cross_entropy(model_lib.apply(m, preprocess(images, m.config)), labels)

  @jax.jit
  def quadratic(v: dict[str, jax.Array]) -> dict[str, jax.Array]:
    hv = jax.jvp(jax.grad(loss), (kernels,), (v,))[1]
    return {layer: jnp.sum(v[layer] * hv[layer]) for layer in layers}

  rng = np.random.default_rng(seed)
  totals = {layer: 0.0 for layer in layers}
  for _ in range(probes):
    v = {layer: jnp.asarray(rng.choice([-1.0, 1.0], size=k.shape), jnp.float32)
         for layer, k in kernels.items()}
    for layer, value in jax.device_get(quadratic(v)).items():
      totals[layer] += float(value) / probes
  return totals


def proxy(model: Model, traces: dict[str, float], setting: LayerSetting) -> dict[str, float]:
  """Layer -> HAWQ-V2 score tr(H)/n * ||W_hat - W||^2 of compressing it with
  `setting` (layers the setting does not apply to are left out)."""
  out = {}
  for layer, trace in traces.items():
    w = np.asarray(get_kernel(model.params, layer), np.float64)
    if space.applies_to(setting, w.shape):
      w_hat = space.dense(space.compress(w, setting, layer))
      out[layer] = trace / w.size * float(np.sum((w_hat - w) ** 2))
  return out


def rank_agreement(scores: dict[str, float], drops: dict[str, float]) -> float:
  """Spearman's rank correlation of proxy scores and measured drops over the
  layers both have (NaN when fewer than 3 or one side is constant)."""
  common = sorted(set(scores) & set(drops))
  if len(common) < 3:
    return float("nan")
  a = [scores[k] for k in common]
  b = [drops[k] for k in common]
  if np.ptp(a) == 0 or np.ptp(b) == 0:
    return float("nan")
  return float(scipy.stats.spearmanr(a, b).statistic)


def layer_latency(model: Model, layers: Sequence[str], menu: Sequence[str], *,
                  batch: int = 1, a_bits: int | None = None, rounds: int = 5,
                  calls: int = 20) -> np.ndarray:
  """Measured seconds of each layer's matmul (layers x menu settings; NaN
  where a setting does not apply): `leaves.linear` jitted on the layer's
  input shape for a batch of `batch` images (tokens x width; the heads see
  one vector per image), on a kernel of the layer's shape compressed by the
  setting, with a static `a_bits` input quantizer when given. Timed in
  rounds over all (shape, setting) pairs (`evaluate.round_robin`), median
  of rounds; layers of one shape share a measurement.
  """
  cfg = model.config
  tokens = cfg.num_patches + cfg.num_prefix_tokens
  settings = [space.parse(n) for n in menu]
  act = None if a_bits is None else Uniform(jnp.float32(0.05), None, bits=a_bits)
  rng = np.random.default_rng(0)
  fns, keys = {}, {}
  for layer in layers:
    shape = tuple(np.shape(get_kernel(model.params, layer)))
    rows = (batch,) if layer.startswith("head") else (batch, tokens)
    for setting in settings:
      if not space.applies_to(setting, shape):
        continue
      key = f"{shape}|{rows}|{setting.name}"
      keys[(layer, setting.name)] = key
      if key in fns:
        continue
      leaf = space.compress(rng.normal(size=shape).astype(np.float32), setting, layer)
      x = jnp.asarray(rng.normal(size=rows + shape[:1]), jnp.float32)
      bias = jnp.zeros(shape[1:], jnp.float32)
      run = jax.jit(lambda x, leaf, bias: leaves.linear(x, leaf, bias, act=act))
      fns[key] = (lambda run, x, leaf, bias: lambda: run(x, leaf, bias))(run, x, leaf, bias)
  times = evaluate.round_robin(fns, rounds=rounds, calls=calls)
  table = np.full((len(layers), len(settings)), np.nan)
  for i, layer in enumerate(layers):
    for j, setting in enumerate(settings):
      key = keys.get((layer, setting.name))
      if key is not None:
        table[i, j] = float(np.median(times[key]))
  return table
