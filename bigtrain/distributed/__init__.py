"""The distributed layer: mesh ownership, data/tensor/pipeline parallelism.

Models never import this package; it imports models to parallelize them.
"""

from bigtrain.distributed.mesh import LaunchEnv, ParallelState, infer_degrees

__all__ = ["LaunchEnv", "ParallelState", "infer_degrees"]
