"""Compression transforms: each a pure `Model -> Model`."""

from vitjax.transforms import calibrate, quantize, select
from vitjax.transforms.select import chain, only

__all__ = ["calibrate", "chain", "only", "quantize", "select"]
