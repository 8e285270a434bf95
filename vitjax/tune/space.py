"""What the auto-tuner can do to one linear layer: a `LayerSetting`.

A setting combines, in this order, at most one sparsity pattern (magnitude
`sparsity` or N:M `n_m`) or a low-rank factorization (`rank`: the fraction of
the layer's values its two factors keep), then round-to-nearest weight
quantization (`w_bits`, AQT's per-channel grid), and optionally a static
activation quantizer at the layer's input site (`a_bits`). `compress` turns a
float kernel into the compressed leaf a setting describes; the tuner's fast
evaluation and the real policy transform both call it, so they compute the
same weights.

Names are short and round-trip through `parse`: "fp32", "w8", "2:4+w4",
"50%+w8", "r0.5+w8", "w4+a8".
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from vitjax import leaves
from vitjax.leaves import Masked, QuantizedWeight, map_weights
from vitjax.leaves.quantized import quantize_per_channel
from vitjax.quantizers.uniform import check_bits
from vitjax.transforms import lowrank, prune


@dataclasses.dataclass(frozen=True)
class LayerSetting:
  """How one linear layer is compressed (every field None/0: kept in fp32).

  Attributes:
    w_bits: weight bits (2..8), or None for float weights.
    sparsity: fraction of the smallest-|w| values masked out, in [0, 1).
    n_m: (N, M): keep the N largest |w| of every M inputs.
    rank: fraction (0, 1) of the layer's values kept by two SVD factors.
    a_bits: bits (2..8) of a static per-tensor quantizer at the layer's
      input (99.99th-percentile range), or None.
  """

  w_bits: int | None = None
  sparsity: float = 0.0
  n_m: tuple[int, int] | None = None
  rank: float | None = None
  a_bits: int | None = None

  def __post_init__(self) -> None:
    if self.w_bits is not None:
      check_bits(self.w_bits, "w_bits")
    if self.a_bits is not None:
      check_bits(self.a_bits, "a_bits")
    prune.check_sparsity(self.sparsity)
    if self.n_m is not None:
      n, m = self.n_m
      if not (isinstance(n, int) and isinstance(m, int)) or not 1 <= n < m:
        raise ValueError(f"n_m={self.n_m!r}: needs integers 1 <= N < M")
    if self.rank is not None and not 0 < self.rank < 1:
      raise ValueError(f"rank={self.rank!r} is outside (0, 1)")
    shapes = [k for k, on in (("sparsity", self.sparsity > 0), ("n_m", self.n_m is not None),
                              ("rank", self.rank is not None)) if on]
    if len(shapes) > 1:
      raise ValueError(f"a layer setting takes one of sparsity, n_m and rank, got {shapes}")

  @property
  def name(self) -> str:
    parts = []
    if self.n_m is not None:
      parts.append(f"{self.n_m[0]}:{self.n_m[1]}")
    if self.sparsity:
      parts.append(f"{self.sparsity * 100:g}%")
    if self.rank is not None:
      parts.append(f"r{self.rank:g}")
    if self.w_bits is not None:
      parts.append(f"w{self.w_bits}")
    if self.a_bits is not None:
      parts.append(f"a{self.a_bits}")
    return "+".join(parts) or "fp32"

  def to_dict(self) -> dict[str, Any]:
    """The JSON form (only the fields that are set)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if value not in (None, 0.0):
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


FIELDS = tuple(f.name for f in dataclasses.fields(LayerSetting))


def from_dict(entry: dict[str, Any], where: str) -> LayerSetting:
  """A setting from its JSON form (see `LayerSetting.to_dict`).

  Raises:
    ValueError: unknown keys or bad values; `where` names the entry.
  """
  unknown = sorted(set(entry) - set(FIELDS))
  if unknown:
    raise ValueError(f"{where}: unknown keys {unknown}; a layer setting takes {list(FIELDS)}")
  values = dict(entry)
  if values.get("n_m") is not None:
    if not isinstance(values["n_m"], (list, tuple)) or len(values["n_m"]) != 2:
      raise ValueError(f"{where}: n_m={values['n_m']!r} must be [N, M]")
    values["n_m"] = tuple(values["n_m"])
  try:
    return LayerSetting(**values)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from e


_PART = re.compile(r"(?P<nm>\d+:\d+)|(?P<sp>[\d.]+)%|r(?P<r>[\d.]+)|w(?P<w>\d+)|a(?P<a>\d+)")


def parse(name: str) -> LayerSetting:
  """The setting of a name such as "2:4+w4" or "r0.5+w8+a8" ("fp32": none).

  Raises:
    ValueError: a part that is not one of N:M, P%, rF, wB, aB, or a bad value.
  """
  if name == "fp32":
    return LayerSetting()
  values: dict[str, Any] = {}
  for part in name.split("+"):
    m = _PART.fullmatch(part)
    if m is None:
      raise ValueError(f"setting {name!r}: part {part!r} is not one of 'N:M', 'P%' "
                       "(sparsity), 'rF' (rank fraction), 'wB' or 'aB' (bits)")
    if m["nm"]:
      values["n_m"] = tuple(int(v) for v in m["nm"].split(":"))
    elif m["sp"]:
      values["sparsity"] = float(m["sp"]) / 100
    elif m["r"]:
      values["rank"] = float(m["r"])
    elif m["w"]:
      values["w_bits"] = int(m["w"])
    else:
      values["a_bits"] = int(m["a"])
  try:
    return LayerSetting(**values)
  except ValueError as e:
    raise ValueError(f"setting {name!r}: {e}") from e


def applies_to(setting: LayerSetting, shape: tuple[int, ...]) -> bool:
  """Whether `setting` can compress a (in, out) kernel: M divides `in`, and a
  rank fraction leaves at least rank 1."""
  if setting.n_m is not None and shape[0] % setting.n_m[1]:
    return False
  return setting.rank is None or factor_rank(setting.rank, shape) >= 1


def factor_rank(rank: float, shape: tuple[int, ...]) -> int:
  """The rank whose two factors keep at most `rank` of an (m, n) kernel's values."""
  m, n = shape
  return int(math.floor(rank * m * n / (m + n)))


def compress(kernel: Any, setting: LayerSetting, where: str = "layer") -> Any:
  """The compressed leaf of a float `kernel` (see the module docstring).

  Raises:
    ValueError: the kernel is not a float array, or the setting does not
      apply to its shape (`applies_to`); `where` names the layer.
  """
  if not isinstance(kernel, (np.ndarray,)) and not hasattr(kernel, "dtype"):
    raise ValueError(f"{where} holds a {type(kernel).__name__}; the tuner compresses float "
                     "kernels (start from an uncompressed model)")
  w = jnp.asarray(kernel, jnp.float32)
  if not applies_to(setting, w.shape):
    raise ValueError(f"setting {setting.name} does not apply to {where} of shape "
                     f"{tuple(w.shape)} (N:M needs M to divide the input dimension; a rank "
                     "fraction needs rank >= 1)")
  leaf: Any = w
  if setting.n_m is not None:
    leaf = leaves.constrain(Masked(w, prune.n_m_mask(jnp.abs(w), *setting.n_m)))
  elif setting.sparsity:
    leaf = leaves.constrain(Masked(w, prune.topk_mask(jnp.abs(w), setting.sparsity)))
  elif setting.rank is not None:
    leaf = lowrank.factor(np.asarray(w, np.float64)).factors(
        factor_rank(setting.rank, w.shape))
  if setting.w_bits is not None:
    bits = setting.w_bits
    leaf = map_weights(leaf, lambda x: QuantizedWeight(quantize_per_channel(x, bits),
                                                       bits=bits, activations="float"))
  return leaf


def dense(leaf: Any) -> np.ndarray:
  """The float (in, out) kernel a weight leaf of any type multiplies by:
  `leaves.matmul(I, leaf)`, the model's own arithmetic on an identity."""
  n = leaves.logical_shape(leaf)[0]
  return np.asarray(leaves.matmul(jnp.eye(n, dtype=jnp.float32), leaf))


DEFAULT_MENU: tuple[str, ...] = ("fp32", "w8", "w6", "w4", "2:4+w8", "2:4+w4", "50%+w4",
                                 "75%+w4", "r0.5+w8", "r0.5+w4")
ACTIVATION_BITS: tuple[int, ...] = (8, 6, 4)
