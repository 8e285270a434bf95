"""The registry of dataclasses a vitjax checkpoint may hold (weight leaves,
AQT's QTensor, activation quantizers); `export` refuses any other type."""

from __future__ import annotations

_STORABLE: dict[str, type] = {}


def register_storable(cls: type) -> type:
  """Allows dataclass `cls` (a leaf type, a quantizer, or a type nested in
  one) in saved checkpoints; used as a class decorator."""
  _STORABLE[cls.__name__] = cls
  return cls


def storable_types() -> dict[str, type]:
  """Name -> class of every dataclass a checkpoint may hold."""
  return dict(_STORABLE)
