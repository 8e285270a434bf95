"""Compression transforms: each a pure `Model -> Model`."""

from vitjax.transforms import quantize, select
from vitjax.transforms.select import chain, only

__all__ = ["chain", "only", "quantize", "select"]
