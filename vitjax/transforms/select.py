"""Choosing layers, transforms over chosen layers, and their composition.

A transform is a function `Model -> Model`. Most compression methods replace
the kernel of some linear layers; they are `LayerTransform`s, whose layers are
chosen by regular expressions over layer paths (`re.fullmatch`, as in qwix and
big_vision), e.g. 'embedding', 'head', 'Transformer/encoderblock_3/.*',
'.*/MlpBlock_3/Dense_0'. A pattern that matches no layer is an error, so a
typo never silently compresses nothing.

`chain(t1, t2, ...)` applies transforms in order (like `optax.chain`);
`only(patterns, t)` narrows a layer transform (or every one in a chain) to the
layers that also match `patterns` (like `optax.masked`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

from vitjax import model as model_lib
from vitjax.model import Model
from vitjax.models.arch import require_vit

Transform = Callable[[Model], Model]
Patterns = str | Sequence[str]

ALL = (".*",)
EMBEDDING = ("embedding",)
HEADS = "head(_dist)?"
ATTENTION = (r"Transformer/encoderblock_\d+/MultiHeadDotProductAttention_1/.*",)
MLP = (r"Transformer/encoderblock_\d+/MlpBlock_3/.*",)


def as_patterns(p: Patterns) -> tuple[str, ...]:
  """A pattern or patterns as a tuple of patterns."""
  return (p,) if isinstance(p, str) else tuple(p)


def linear_layers(params: Any) -> list[str]:
  """Paths of every linear layer (the module holding a `kernel`), in tree order."""
  return [path[: -len("/kernel")] for path, _ in model_lib.weight_leaves(params)
          if path.endswith("/kernel")]


def _match(patterns: Sequence[str], layer: str) -> bool:
  return any(re.fullmatch(p, layer) for p in patterns)


def resolve(params: Any, include: Sequence[Sequence[str]],
            exclude: Sequence[str] = ()) -> list[str]:
  """Layers matching a pattern of every group of `include` and none of `exclude`.

  Raises:
    ValueError: a pattern is not a valid regex or matches no linear layer, or
      the patterns together select no layer (e.g. `only(A, exclude=B)` where
      B covers A, or two groups whose intersection is empty).
  """
  layers = linear_layers(params)
  for pattern in [p for group in include for p in group] + list(exclude):
    try:
      hit = any(re.fullmatch(pattern, layer) for layer in layers)
    except re.error as e:
      raise ValueError(f"layer pattern {pattern!r} is not a valid regex: {e}") from e
    if not hit:
      raise ValueError(f"layer pattern {pattern!r} matches no linear layer; the layers "
                       f"are {layers[:4]} ... {layers[-2:]} ({len(layers)} in all)")
  chosen = [layer for layer in layers
            if all(_match(group, layer) for group in include) and not _match(exclude, layer)]
  if not chosen:
    raise ValueError(f"the layer patterns select no layer together: every one of the "
                     f"groups {[list(g) for g in include]} must match, and none of "
                     f"exclude={list(exclude)}")
  return chosen


def get_module(params: Any, path: str) -> dict:
  """The parameter dict of the module at '/'-joined `path`."""
  node = params
  for key in path.split("/"):
    node = node[key]
  return node


def get_kernel(params: Any, layer: str) -> Any:
  return get_module(params, layer)["kernel"]


def update_modules(params: Any, updates: dict[str, dict]) -> Any:
  """A copy of `params` (dicts copied along the changed paths) where each
  module path's dict is updated with `updates[path]`."""
  params = dict(params)
  for path, entries in updates.items():
    node = params
    for key in path.split("/"):
      node[key] = dict(node[key])
      node = node[key]
    node.update(entries)
  return params


def set_kernels(params: Any, kernels: dict[str, Any]) -> Any:
  """A copy of `params` (dicts copied along the changed paths) with new kernels."""
  return update_modules(params, {layer: {"kernel": k} for layer, k in kernels.items()})


@dataclasses.dataclass(frozen=True)
class LayerTransform:
  """`Model -> Model` replacing the kernel of each chosen linear layer.

  Attributes:
    name: what the transform is, for messages.
    fn: `(layer path, kernel leaf, context) -> new kernel leaf`.
    include: groups of patterns; a layer is chosen when it matches some
      pattern of every group (`only` adds groups).
    exclude: patterns of layers to leave alone.
    prepare: optional `(model, chosen layers) -> context`, run once before
      `fn` (e.g. calibration); the context is passed to every `fn` call.
  """

  name: str
  fn: Callable[[str, Any, Any], Any]
  include: tuple[tuple[str, ...], ...] = (ALL,)
  exclude: tuple[str, ...] = ()
  prepare: Callable[[Model, list[str]], Any] | None = None

  def __call__(self, model: Model) -> Model:
    require_vit(model.config, f"the {self.name} transform")
    chosen = resolve(model.params, self.include, self.exclude)
    context = self.prepare(model, chosen) if self.prepare is not None else None
    new = {layer: self.fn(layer, get_kernel(model.params, layer), context)
           for layer in chosen}
    return model.replace(params=set_kernels(model.params, new))


def layer_transform(name: str, fn: Callable[[str, Any, Any], Any], *,
                    layers: Patterns = ALL, exclude: Patterns = (),
                    prepare: Callable[[Model, list[str]], Any] | None = None
                    ) -> LayerTransform:
  """Builds a LayerTransform over `layers` minus `exclude` (regex patterns)."""
  return LayerTransform(name, fn, (as_patterns(layers),), as_patterns(exclude), prepare)


@dataclasses.dataclass(frozen=True)
class Chain:
  """Transforms applied in order."""

  transforms: tuple[Transform, ...]

  def __call__(self, model: Model) -> Model:
    for t in self.transforms:
      model = t(model)
    return model


def chain(*transforms: Transform) -> Chain:
  """`Model -> Model` applying `transforms` left to right.

  Raises:
    TypeError: an argument is not callable.
  """
  for t in transforms:
    if not callable(t):
      raise TypeError(f"chain() takes transforms (Model -> Model), got {t!r}")
  return Chain(tuple(transforms))


def only(layers: Patterns, transform: Transform, *, exclude: Patterns = ()) -> Transform:
  """Restricts a layer transform (or each transform of a chain) to `layers`.

  Raises:
    TypeError: the transform does not work layer by layer (e.g. structured
      pruning, which reshapes whole blocks).
  """
  if isinstance(transform, LayerTransform):
    return dataclasses.replace(
        transform, include=transform.include + (as_patterns(layers),),
        exclude=transform.exclude + as_patterns(exclude))
  if isinstance(transform, Chain):
    return Chain(tuple(only(layers, t, exclude=exclude) for t in transform.transforms))
  raise TypeError(f"only() restricts layer-by-layer transforms; {transform!r} is not one")
