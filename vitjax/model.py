"""`Model(config, params, sites)`: the value every vitjax transform takes and returns.

`config` is a frozen `ViTConfig` (or a CNN teacher's `CNNConfig`; static under
jit); `params` is a plain pytree whose weight leaves may be arrays or
compressed leaves; `sites` maps quantization-site addresses
(`vitjax.models.sites`) to activation quantizers. A `Model` is itself a pytree
(config as static metadata), so it passes through `jax.jit` whole.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Literal

import jax
import jax.numpy as jnp
import numpy as np

from vitjax import leaves, storable
from vitjax.kernels import cpu_int8
from vitjax.leaves import logical_shape
from vitjax.models import sites as sites_lib
from vitjax.models.arch import Config, module_of, require_vit
from vitjax.quantizers.uniform import Uniform

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Model:
  """A ViT/DeiT configuration, its (possibly compressed) parameters, and the
  activation quantizers of its quantization sites (address -> quantizer);
  or a CNN teacher's config and float parameters (`vitjax.models.cnn`)."""

  config: Config
  params: PyTree
  sites: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def module(self) -> Any:
    return module_of(self.config)

  def replace(self, **changes: Any) -> Model:
    return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(Model, data_fields=["params", "sites"],
                                 meta_fields=["config"])


def image_spec(config: Config, batch: int = 1) -> jax.ShapeDtypeStruct:
  """The shape and dtype of a batch of preprocessed images for `config`."""
  return jax.ShapeDtypeStruct(
      (batch, config.image_size, config.image_size, config.channels), jnp.float32)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
  """{'a/b/op': v} -> {'a': {'b': {'op': v}}}."""
  out: dict[str, Any] = {}
  for address, value in flat.items():
    *modules, op = address.split("/")
    node = out
    for m in modules:
      node = node.setdefault(m, {})
    node[op] = value
  return out


def variables(model: Model) -> dict[str, Any]:
  """The Flax variables of `model`: its params and its site quantizers."""
  out = {"params": model.params}
  if model.sites:
    out[sites_lib.COLLECTION] = nest(model.sites)
  return out


def init(config: Config, rng: jax.Array | int = 0) -> Model:
  """Returns a freshly initialized float32 `Model` for `config`."""
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  images = jnp.zeros((1, config.image_size, config.image_size, config.channels))
  return Model(config, _jitted_init(config)(rng, images)["params"])


@functools.lru_cache(maxsize=None)
def _jitted_init(config: Config) -> Any:
  """`module.init` of `config`, jitted once per config: a new jit object per
  call would trace and lower the model again each time (0.7 s even for a
  test-sized model), though the program is the same."""
  return jax.jit(module_of(config).init)


Heads = Literal["mean", "both"]


def apply(model: Model, images: jax.Array, heads: Heads = "mean",
          keep: jax.Array | None = None) -> Any:
  """Returns the logits of `model` on (B, H, W, C) float `images`.

  For a DeiT, `heads="both"` returns `(cls_logits, dist_logits)`; a model
  without a distillation token refuses it, and any other `heads` value. `keep`, (B, K)
  patch-token indices, drops every other patch token (patch dropout, training).
  """
  return model.module.apply(variables(model), images, heads=heads, keep=keep)


def apply_with_intermediates(model: Model, images: jax.Array,
                             heads: Heads = "mean") -> tuple[Any, dict[str, list]]:
  """Returns `(logits, {"features": [...], "attention": [...]})`.

  `features[i]` is block i's output tokens (B, T, dim); `attention[i]` its
  attention probabilities (B, heads, T, T).

  Raises:
    ValueError: `model` is a CNN (it has no tokens or attention).
  """
  require_vit(model.config, "feature/attention distillation (block tokens and attention maps)")
  out, state = model.module.apply(variables(model), images,
                                  heads=heads, mutable=["intermediates"])
  blocks = state["intermediates"]["Transformer"]
  names = sorted(blocks, key=lambda n: int(n.rsplit("_", 1)[1]))
  features = [blocks[n]["features"][0] for n in names]
  attention = [blocks[n]["MultiHeadDotProductAttention_1"]["attention"][0]
               for n in names]
  return out, {"features": features, "attention": attention}


def apply_with_sites(model: Model, images: jax.Array,
                     deltas: dict[str, Any] | None = None) -> tuple[jax.Array, dict[str, Any]]:
  """Returns `(logits, site values)`: site address -> what that quantization
  site saw (an array; `{"lhs", "rhs"}` for a matmul of two activations).
  `deltas` (address -> arrays of the same shapes) are added to those values
  first (calibration differentiates the logits with respect to them).

  Raises:
    ValueError: `model` is a CNN (it has no quantization sites)."""
  require_vit(model.config, "quantization sites")
  extra = {sites_lib.DELTA: nest(deltas)} if deltas else {}
  logits, state = model.module.apply({**variables(model), **extra}, images,
                                     mutable=[sites_lib.RECORD])
  # A sown entry is a tuple (one value per call), so `weight_leaves` stops at it.
  return logits, {k: v[0] for k, v in weight_leaves(state[sites_lib.RECORD])}


def site_inputs(model: Model, images: jax.Array) -> dict[str, Any]:
  """Site address -> what that quantization site saw in one forward pass."""
  return apply_with_sites(model, images)[1]


def site_addresses(model: Model) -> list[str]:
  """Addresses of every quantization site of `model`, in tree order."""
  return list(jax.eval_shape(site_inputs, model, image_spec(model.config)))


def linear_inputs(model: Model, images: jax.Array) -> dict[str, jax.Array]:
  """Layer path -> the input of that linear layer, for one forward pass."""
  suffix = "/input"
  return {k[:-len(suffix)]: v for k, v in site_inputs(model, images).items()
          if k.endswith(suffix) and is_linear_layer(model.params, k[:-len(suffix)])}


def is_linear_layer(params: PyTree, path: str) -> bool:
  """True when `path` names a module of `params` that holds a `kernel`."""
  node = params
  for key in path.split("/"):
    node = node.get(key, {}) if isinstance(node, dict) else {}
  return isinstance(node, dict) and "kernel" in node


# ---------------------------------------------------------------- structure


def path_str(path: tuple) -> str:
  """'/'-joined names of a key path from `jax.tree_util` (dict keys only)."""
  parts = []
  for key in path:
    name = getattr(key, "key", None)
    if name is None:
      name = getattr(key, "name", None)
    if name is None:
      name = getattr(key, "idx", key)
    parts.append(str(name))
  return "/".join(parts)


def weight_leaves(params: PyTree) -> Iterator[tuple[str, Any]]:
  """Yields `(path, leaf)` for every entry of the nested params dict.

  Compressed leaves are yielded whole (not their inner arrays); paths look
  like 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'.
  """
  def walk(node: Any, prefix: str):
    if isinstance(node, dict):
      for key in node:
        yield from walk(node[key], f"{prefix}/{key}" if prefix else key)
    else:
      yield prefix, node
  yield from walk(params, "")


def expected_shapes(config: Config) -> dict[str, tuple[int, ...]]:
  """Path -> dense shape of every parameter a model of `config` has."""
  abstract = jax.eval_shape(module_of(config).init,
                            jax.random.PRNGKey(0), image_spec(config))["params"]
  return {p: tuple(leaf.shape) for p, leaf in weight_leaves(abstract)}


def check_params(config: Config, params: PyTree) -> None:
  """Raises ValueError naming the first path where `params` does not fit `config`.

  Checks the set of parameter paths, every leaf's (logical) shape, and that no
  float weight holds NaN or inf.
  """
  want = expected_shapes(config)
  got = dict(weight_leaves(params))
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(
        "parameter tree does not match the model config: "
        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
        f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
  for path, shape in want.items():
    have = logical_shape(got[path])
    if have != shape:
      raise ValueError(f"parameter {path} has shape {have}, the config expects {shape}")
  for path, leaf in got.items():
    for arr in jax.tree_util.tree_leaves(leaf):
      if jnp.issubdtype(arr.dtype, jnp.floating) and not np.isfinite(np.asarray(arr)).all():
        raise ValueError(f"parameter {path} holds NaN or inf values")


# ---------------------------------------------------------------- accounting


def array_bits(arr: Any) -> int:
  """Bits one element of `arr` takes in a vitjax checkpoint.

  int4/uint4 are packed two per byte and boolean masks one bit per element.
  """
  dtype = jnp.dtype(arr.dtype)
  if dtype in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)):
    return 4
  if dtype == jnp.dtype(bool):
    return 1
  return dtype.itemsize * 8


def param_count(model: Model) -> int:
  """Values the model really holds: int8 and float alike, quantization scales
  (of weights and of activation sites) included, pruned (masked-out) weights
  and masks excluded."""
  return sum(leaves.value_count(leaf) for leaf in jax.tree_util.tree_leaves(
      model.params, is_leaf=leaves.is_compressed)) + sum(
          int(np.size(a)) for a in jax.tree_util.tree_leaves(model.sites))


def leaf_bits(leaf: Any) -> int:
  """Bits of one tree entry as a checkpoint stores it: a leaf type naming a
  keep-mask (`STORE_KEPT_BY`) stores its mask-shaped arrays as kept values."""
  mask_field = getattr(type(leaf), "STORE_KEPT_BY", None)
  if mask_field is None:
    return sum(int(np.prod(a.shape)) * array_bits(a) for a in jax.tree_util.tree_leaves(leaf))
  mask = np.asarray(getattr(leaf, mask_field), bool)
  bits = mask.size
  for a in jax.tree_util.tree_leaves([getattr(leaf, f.name) for f in dataclasses.fields(leaf)
                                      if f.name != mask_field]):
    kept = storable.stores_kept_values(a, mask)
    bits += (int(mask.sum()) if kept else int(np.prod(a.shape))) * array_bits(a)
  return bits


def stored_bytes(model: Model) -> int:
  """Bytes of the parameter and site-quantizer arrays as a vitjax checkpoint
  stores them (masked weights as their kept values plus the mask's bits)."""
  model = portable(model)
  bits = sum(leaf_bits(leaf) for leaf in jax.tree_util.tree_leaves(
      (model.params, model.sites), is_leaf=lambda x: hasattr(type(x), "STORE_KEPT_BY")))
  return math.ceil(bits / 8)


def _dot_flops(jaxpr: Any) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      prod = lambda shape, axes: int(np.prod([shape[i] for i in axes]))
      free_l = [i for i in range(len(lhs)) if i not in lc and i not in lb]
      free_r = [i for i in range(len(rhs)) if i not in rc and i not in rb]
      total += 2 * prod(lhs, lb) * prod(lhs, lc) * prod(lhs, free_l) * prod(rhs, free_r)
    elif eqn.primitive.name == "conv_general_dilated":
      # 2 * output elements * (kernel window * input channels per group)
      out_shape = eqn.outvars[0].aval.shape
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
      window = int(np.prod([rhs[i] for i in spec[2:]])) * rhs[spec[1]]
      total += 2 * int(np.prod(out_shape)) * window
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += _dot_flops(inner)
  return total


def flops_per_image(model: Model) -> int:
  """Multiply-add FLOPs (2 per MAC) of every matmul and convolution in one
  image's forward.

  Counted from the traced program, so low-rank factors, pruned widths and
  attention are all accounted for as they really run; element-wise work is
  not counted. Masked (sparse) weights count as the dense matmul XLA runs.
  """
  cfg = model.config
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels))
  closed = jax.make_jaxpr(lambda m, x: apply(m, x))(portable(model), images)
  return _dot_flops(closed.jaxpr)


# ------------------------------------------------------------ CPU int8 kernel


def use_cpu_int8_kernel(model: Model, isa: cpu_int8.Isa | None = None) -> Model:
  """`model` whose integer matmuls run on vitjax's CPU int8 kernel
  (`vitjax.kernels.cpu_int8`): every QuantizedWeight that multiplies integer
  activations (its own dynamic/static int8 ones, or a uniform quantizer at its
  input site) gets its weight packed in the kernel's layout, for the kernel's
  code path `isa` (None: the fastest this CPU has, `cpu_int8.isa()`). The logits are
  bit-identical; the kernel runs forward only and on the CPU backend only.
  `portable` undoes it; saving and exporting drop it by themselves.

  Raises:
    ValueError: no layer of `model` multiplies integers (weight-only or float
      models: nothing would run on the kernel), or `isa` is not a code path
      of this CPU (`cpu_int8.check_isa`).
    KernelUnavailable: the backend is not the CPU, or the kernel cannot be
      built here (no C++ compiler).
  """
  if not cpu_int8_layers(model):
    raise ValueError("use_cpu_int8_kernel: no layer of this model multiplies integers (its "
                     "quantized weights all take float activations, and no uniform quantizer "
                     "sits at their inputs); quantize activations first, e.g. with "
                     "transforms.dynamic_int8() or static_int8()")
  if jax.default_backend() != "cpu":
    raise cpu_int8.KernelUnavailable(
        f"the CPU int8 kernel runs on the CPU backend; this process's default backend is "
        f"{jax.default_backend()!r}")
  cpu_int8.isa()  # builds and loads it now, or says why it cannot
  cpu_int8.check_isa(isa)
  return model.replace(params=_map_integer_layers(
      model, lambda address, leaf: leaves.with_cpu_int8_kernel(leaf, isa)))


def cpu_int8_layers(model: Model) -> list[str]:
  """Addresses of the QuantizedWeight leaves whose matmul multiplies integers
  (their own dynamic/static int8 activations, or a uniform quantizer at their
  input site): what `use_cpu_int8_kernel` puts on the kernel."""
  found: list[str] = []
  _map_integer_layers(model, lambda address, leaf: found.append(address) or leaf)
  return found


def _map_integer_layers(model: Model, fn: Callable[[str, Any], Any]) -> PyTree:
  """`model.params` with `fn(address, leaf)` applied to every QuantizedWeight
  whose matmul multiplies integers: its own activations are integer, or it is
  the leaf that takes its layer's input (`leaves.input_leaf`: a mask's
  values, a low-rank pair's first factor) and a uniform quantizer sits at that
  input."""
  def layer(path: tuple, weight: Any) -> Any:
    address = path_str(path)
    site = model.sites.get(address.rsplit("/", 1)[0] + "/input") \
        if address.endswith("/kernel") else None
    fed_path = leaves.input_leaf(weight)[0] if isinstance(site, Uniform) else None

    def inner(sub: tuple, leaf: Any) -> Any:
      if not isinstance(leaf, leaves.QuantizedWeight):
        return leaf
      names = tuple(path_str(sub).split("/")) if sub else ()
      if not leaf.multiplies_integers(names == fed_path):
        return leaf
      return fn("/".join((address, *names)), leaf)
    return jax.tree_util.tree_map_with_path(
        inner, weight, is_leaf=lambda x: isinstance(x, leaves.QuantizedWeight))
  return jax.tree_util.tree_map_with_path(layer, model.params, is_leaf=leaves.is_compressed)


def portable(model: Model) -> Model:
  """`model` without the CPU int8 kernel's packed weights: XLA's own dots,
  on any backend."""
  return model.replace(params=leaves.without_cpu_int8_kernel(model.params))
