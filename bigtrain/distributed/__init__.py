"""The distributed layer: mesh ownership, data/tensor/pipeline parallelism.

Models never import this package; families use it to parallelize their models
(:func:`parallelize_transformer` with a :class:`BlockPlan`, or :func:`parallelize_blocks`).
"""

from bigtrain.distributed.mesh import LaunchEnv, ParallelState, infer_degrees
from bigtrain.distributed.tensor_parallel import BlockPlan, parallelize_blocks, parallelize_transformer

__all__ = ["BlockPlan", "LaunchEnv", "ParallelState", "infer_degrees", "parallelize_blocks", "parallelize_transformer"]
