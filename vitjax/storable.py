"""The registry of dataclasses a vitjax checkpoint may hold (weight leaves,
AQT's QTensor, activation quantizers); `export` refuses any other type."""

from __future__ import annotations

import numpy as np

_STORABLE: dict[str, type] = {}


def register_storable(cls: type) -> type:
  """Allows dataclass `cls` (a leaf type, a quantizer, or a type nested in
  one) in saved checkpoints; used as a class decorator."""
  _STORABLE[cls.__name__] = cls
  return cls


def storable_types() -> dict[str, type]:
  """Name -> class of every dataclass a checkpoint may hold."""
  return dict(_STORABLE)


def stores_kept_values(x: np.ndarray, mask: np.ndarray) -> bool:
  """Whether a checkpoint stores array `x`, held by a leaf whose keep-mask is
  the boolean `mask`, as its kept values only: `x` has the mask's shape, is
  not itself boolean, and every entry outside the mask is zero in all bits."""
  x = np.asarray(x)
  return x.shape == mask.shape and x.dtype != bool and not np.any(x[~mask].view(np.uint8))
