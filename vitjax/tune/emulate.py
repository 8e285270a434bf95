"""Fast, exact-weight evaluation of many compression plans with one compile.

Every plan the tuner tries would otherwise be a new parameter tree (new leaf
types, new shapes) and so a new XLA compilation. The `Emulator` instead keeps
one tree shape: each linear kernel is replaced by the dense float kernel its
compressed leaf multiplies by (`space.dense(space.compress(...))`, the
model's own arithmetic on an identity), removed heads and neurons become zero
rows/columns of the dense kernels (their outputs then add nothing, as when
sliced), and every linear input carries an `EmulatedUniform` quantizer whose
scale, shift and code range are arrays, switched off where a plan keeps the
input in float. A plan therefore runs through one jitted forward pass.

The weights are exactly those of the real transform (it calls the same
`space.compress` on the same sliced kernels); the activation quantizers use
scales calibrated once on the uncompressed model, where the real transform
calibrates the compressed one, and float arithmetic stands in for AQT's
integer dots. The tuner measures its final choice on the real model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vitjax import data as data_lib
from vitjax import evaluate
from vitjax import model as model_lib
from vitjax.model import Model
from vitjax.models.arch import require_vit
from vitjax.quantizers.uniform import UniformSpec, qmax
from vitjax.transforms import site_calibration, structured
from vitjax.transforms.select import get_kernel, get_module, linear_layers, set_kernels
from vitjax.tune import space
from vitjax.tune.space import LayerSetting

ATTENTION = "MultiHeadDotProductAttention_1"
MLP = "MlpBlock_3"


def activation_spec(bits: int) -> UniformSpec:
  """The static input quantizer of a layer setting's `a_bits`."""
  return UniformSpec(bits, "percentile", "tensor", None, 99.99)


@flax.struct.dataclass
class EmulatedUniform:
  """A per-tensor uniform quantizer whose every parameter is an array (so
  plans that differ only in bits or on/off share one compilation)."""

  scale: jax.Array
  shift: jax.Array
  limit: jax.Array
  on: jax.Array

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x + self.shift
    codes = jnp.round(jnp.clip(y / self.scale, -self.limit, self.limit))
    return jnp.where(self.on, codes * self.scale - self.shift, x).astype(x.dtype)


# NumPy values, not jnp: an import must not start JAX's backends (a
# multi-process run joins `jax.distributed` after importing vitjax).
OFF = EmulatedUniform(np.float32(1.0), np.float32(0.0), np.float32(127.0), np.bool_(False))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-layer settings (layers absent stay fp32) and per-block head and
  neuron counts (None: all kept)."""

  settings: dict[str, LayerSetting]
  heads: tuple[int, ...] | None = None
  mlp: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
  """Accuracy (%) on the evaluation images and agreement (%) with the
  uncompressed model's predictions."""

  accuracy: float
  agreement: float


def kept_indices(model: Model, heads: tuple[int, ...] | None, mlp: tuple[int, ...] | None
                 ) -> dict[str, tuple[int, np.ndarray]]:
  """Layer -> (sliced axis, kept indices) of structured pruning that keeps,
  per block, `heads[i]` heads and `mlp[i]` neurons by L2 norm, as
  `structured.heads_and_neurons(score="l2")` does.

  Raises:
    ValueError: what `structured.kept_units` refuses.
  """
  if heads is None and mlp is None:
    return {}
  heads_kept, neurons_kept = structured.kept_units(
      model, list(heads) if heads is not None else 1.0, list(mlp) if mlp is not None else 1.0)
  out = {}
  for i, (kept, neurons) in enumerate(zip(heads_kept, neurons_kept)):
    block = f"Transformer/encoderblock_{i}"
    cols = structured.head_columns(kept, model.config.head_dim)
    for name in ("query", "key", "value"):
      out[f"{block}/{ATTENTION}/{name}"] = (1, cols)
    out[f"{block}/{ATTENTION}/out"] = (0, cols)
    out[f"{block}/{MLP}/Dense_0"] = (1, neurons)
    out[f"{block}/{MLP}/Dense_1"] = (0, neurons)
  return out


def _refuse_test(evaluation: data_lib.Split) -> None:
  if evaluation.origin == "test":
    raise ValueError("the tuner scores plans on held-out validation images; got the test "
                     "split (report test figures once, after choosing)")


def check_uncompressed(model: Model) -> None:
  """Refuses a model with compressed kernels or site quantizers (the tuner
  starts from float weights)."""
  if model.sites:
    raise ValueError(f"the model already has {len(model.sites)} site quantizers; tune an "
                     "uncompressed model")
  for layer in linear_layers(model.params):
    k = get_kernel(model.params, layer)
    if not isinstance(k, (jax.Array, np.ndarray)):
      raise ValueError(f"layer {layer} holds a {type(k).__name__}; tune an uncompressed "
                       "model (float kernels)")


class Emulator:
  """Evaluates plans on fixed images with one compiled forward pass.

  Args:
    model: the uncompressed ViT.
    evaluation: labeled images the plans are scored on (the validation
      split; never the test split).
    calibration: training-split images for the activation scales.
    a_bits: the activation bits plans may use (one calibration each).

  Raises:
    ValueError: a compressed model, evaluation images from the test split,
      calibration not from the training split.
  """

  def __init__(self, model: Model, evaluation: data_lib.Split, calibration: data_lib.Split,
               *, a_bits: tuple[int, ...] = space.ACTIVATION_BITS, batch_size: int = 500,
               progress: bool = False):
    require_vit(model.config, "the auto-tuner")
    check_uncompressed(model)
    _refuse_test(evaluation)
    site_calibration.check_training_split(calibration)
    self.model = model
    self.layers = linear_layers(model.params)
    self.evaluation = evaluation
    self.batch_size = batch_size
    self._dense: dict[tuple[str, str, int], tuple[np.ndarray, int]] = {}
    self._kept: dict[tuple, dict[str, tuple[int, np.ndarray]]] = {}
    samples = site_calibration.record(model, calibration,
                                      [f"{layer}/input" for layer in self.layers],
                                      progress=progress)
    self.fits: dict[int, dict[str, Any]] = {
        bits: {layer: activation_spec(bits).fit(samples[f"{layer}/input"].values,
                                                site=f"{layer}/input")
               for layer in self.layers} for bits in a_bits}
    self.site_bits = {bits: {layer: model_lib.leaf_bits(q) for layer, q in fits.items()}
                       for bits, fits in self.fits.items()}
    self.fixed_bits = sum(model_lib.leaf_bits(a) for a in jax.tree_util.tree_leaves(
        model.params)) - sum(self._float_bits(layer) for layer in self.layers)
    self._score_reference()

  def on(self, evaluation: data_lib.Split) -> Emulator:
    """The same emulator (calibration, cached kernels) scoring other images.

    Raises:
      ValueError: images from the test split.
    """
    _refuse_test(evaluation)
    other = copy.copy(self)
    other.evaluation = evaluation
    other._score_reference()
    return other

  def _score_reference(self) -> None:
    """The uncompressed model's predictions and accuracy on the images."""
    self.reference = self._predict(Plan({}))
    self.reference_accuracy = float(np.mean(self.reference == self.evaluation.labels) * 100)

  def _float_bits(self, layer: str) -> int:
    module = get_module(self.model.params, layer)
    return sum(model_lib.leaf_bits(a) for a in jax.tree_util.tree_leaves(module))

  def kept(self, heads: tuple[int, ...] | None, mlp: tuple[int, ...] | None
           ) -> dict[str, tuple[int, np.ndarray]]:
    key = (heads, mlp)
    if key not in self._kept:
      self._kept[key] = kept_indices(self.model, heads, mlp)
    return self._kept[key]

  def _layer(self, layer: str, setting: LayerSetting, cut: tuple[int, np.ndarray] | None
             ) -> tuple[np.ndarray, int]:
    """(dense full-shape kernel, stored bits of kernel and bias) of a layer."""
    weight_only = dataclasses.replace(setting, a_bits=None)
    key = (layer, weight_only.name, -1 if cut is None else int(cut[1].size))
    if key not in self._dense:
      kernel = np.asarray(get_kernel(self.model.params, layer))
      bias_len = kernel.shape[1]
      part = kernel
      if cut is not None:
        axis, idx = cut
        part = np.take(kernel, idx, axis=axis)
        bias_len = idx.size if axis == 1 else kernel.shape[1]
      leaf = space.compress(part, weight_only, layer)
      full = np.zeros_like(kernel)
      if cut is None:
        full = space.dense(leaf)
      elif cut[0] == 1:
        full[:, cut[1]] = space.dense(leaf)
      else:
        full[cut[1], :] = space.dense(leaf)
      self._dense[key] = (full, model_lib.leaf_bits(leaf) + 32 * bias_len)
    return self._dense[key]

  def stored_bytes(self, plan: Plan) -> int:
    """Bytes the real compressed model would store (`model.stored_bytes`):
    exact for the weights; activation scales as calibrated here."""
    kept = self.kept(plan.heads, plan.mlp)
    bits = self.fixed_bits
    for layer in self.layers:
      setting = plan.settings.get(layer, LayerSetting())
      bits += self._layer(layer, setting, kept.get(layer))[1]
      if setting.a_bits is not None:
        bits += self.site_bits[setting.a_bits][layer]
    return math.ceil(bits / 8)

  def emulated_model(self, plan: Plan) -> Model:
    """The fixed-structure float model computing `plan`."""
    unknown = sorted(set(plan.settings) - set(self.layers))
    if unknown:
      raise ValueError(f"plan names layers the model does not have: {unknown[:3]}")
    kept = self.kept(plan.heads, plan.mlp)
    kernels, quantizers = {}, {}
    for layer in self.layers:
      setting = plan.settings.get(layer, LayerSetting())
      kernels[layer] = jnp.asarray(self._layer(layer, setting, kept.get(layer))[0])
      if setting.a_bits is None:
        quantizers[f"{layer}/input"] = OFF
      else:
        if setting.a_bits not in self.fits:
          raise ValueError(f"a_bits={setting.a_bits} was not calibrated; the emulator has "
                           f"{sorted(self.fits)}")
        q = self.fits[setting.a_bits][layer]
        quantizers[f"{layer}/input"] = EmulatedUniform(
            jnp.float32(q.scale), jnp.float32(0.0 if q.shift is None else q.shift),
            jnp.float32(qmax(setting.a_bits)), jnp.asarray(True))
    return self.model.replace(params=set_kernels(self.model.params, kernels),
                              sites=quantizers)

  def _predict(self, plan: Plan) -> np.ndarray:
    return evaluate.predictions(self.emulated_model(plan), self.evaluation, self.batch_size)

  def evaluate(self, plan: Plan) -> Outcome:
    """Accuracy and agreement of `plan` on the evaluation images."""
    predicted = self._predict(plan)
    return Outcome(float(np.mean(predicted == self.evaluation.labels) * 100),
                   float(np.mean(predicted == self.reference) * 100))
