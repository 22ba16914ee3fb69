"""Optimizers (a registry with declared sharding capabilities), parameter groups, LR schedules."""

from bigtrain.optim.builder import (
    OPTIMIZERS,
    OptimizerSpec,
    build_optimizer,
    check_optimizer,
    get_optimizer,
    param_groups,
    register_optimizer,
)
from bigtrain.optim.schedules import LRSchedule, ScheduleSpec, lr_factor

__all__ = [
    "OPTIMIZERS", "LRSchedule", "OptimizerSpec", "ScheduleSpec", "build_optimizer", "check_optimizer", "get_optimizer",
    "lr_factor", "param_groups", "register_optimizer",
]
