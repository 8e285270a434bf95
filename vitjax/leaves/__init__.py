"""Weight leaves of the parameter tree and the one `linear` that uses them."""

from vitjax.leaves.dispatch import (apply_mask, constrain, constrain_tree, input_leaf,
                                   input_operand, is_compressed, linear, logical_shape,
                                   map_weights, matmul, register_storable,
                                   registered_leaf_types,
                                   storable_types, trainable, trainable_mask,
                                   value_count, weight_matmul)
from vitjax.leaves.lowrank import LowRank
from vitjax.leaves.masked import Masked
from vitjax.leaves.quantized import (FakeQuantWeight, QuantizedWeight, with_cpu_int8_kernel,
                                    without_cpu_int8_kernel)

__all__ = ["FakeQuantWeight", "LowRank", "Masked", "QuantizedWeight", "apply_mask",
           "constrain", "constrain_tree", "input_leaf", "input_operand", "is_compressed", "linear", "logical_shape",
           "map_weights", "matmul", "register_storable", "registered_leaf_types",
           "storable_types",
           "trainable", "trainable_mask", "value_count", "weight_matmul",
           "with_cpu_int8_kernel", "without_cpu_int8_kernel"]
