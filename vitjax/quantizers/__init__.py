"""Activation quantizers: the pieces a quantization site applies.

Each quantizer is a storable pytree dataclass with `__call__(x)` (the
quantized-then-dequantized values), a `fit_*` function that builds it from
calibration samples, and a frozen `*Spec` (bits and options) whose `fit` a
site rule calls. A new quantizer is one new file. For integer matmuls,
uniform quantizers hand their codes to AQT (`uniform.quantized_dot_general`);
log and twin-uniform quantizers write their values as int8 planes
(`planes.planes_dot_general`).
"""

from vitjax.quantizers.logarithmic import Logarithmic, LogarithmicSpec, fit_logarithmic
from vitjax.quantizers.power_of_two import (PowerOfTwoFactor, PowerOfTwoSpec,
                                            fit_power_of_two)
from vitjax.quantizers.twin_uniform import (TwinUniform, TwinUniformSpec,
                                            fit_twin_uniform)
from vitjax.quantizers.uniform import (Operands, OperandsSpec, Uniform, UniformSpec,
                                       fit_uniform)

__all__ = ["Logarithmic", "LogarithmicSpec", "Operands", "OperandsSpec", "PowerOfTwoFactor",
           "PowerOfTwoSpec", "TwinUniform", "TwinUniformSpec", "Uniform", "UniformSpec",
           "fit_logarithmic", "fit_power_of_two", "fit_twin_uniform", "fit_uniform"]
