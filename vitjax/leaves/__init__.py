"""Weight leaves of the parameter tree and the one `linear` that uses them."""

from vitjax.leaves.dispatch import (constrain, constrain_tree, is_compressed,
                                   linear, matmul, registered_leaf_types,
                                   trainable, trainable_mask)

__all__ = ["constrain", "constrain_tree", "is_compressed", "linear", "matmul", "registered_leaf_types",
           "trainable", "trainable_mask"]
