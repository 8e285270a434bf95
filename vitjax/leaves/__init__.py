"""Weight leaves of the parameter tree and the one `linear` that uses them."""

from vitjax.leaves.dispatch import (constrain, constrain_tree, is_compressed,
                                   linear, map_weights, matmul, register_storable,
                                   registered_leaf_types, storable_types,
                                   trainable, trainable_mask, weight_matmul)
from vitjax.leaves.quantized import FakeQuantWeight, QuantizedWeight

__all__ = ["FakeQuantWeight", "QuantizedWeight", "constrain", "constrain_tree",
           "is_compressed", "linear", "map_weights", "matmul", "register_storable",
           "registered_leaf_types", "storable_types", "trainable", "trainable_mask",
           "weight_matmul"]
