"""Optimizers with parameter groups, and LR schedules."""

from bigtrain.optim.builder import build_optimizer, param_groups
from bigtrain.optim.schedules import LRSchedule, ScheduleSpec, lr_factor

__all__ = ["LRSchedule", "ScheduleSpec", "build_optimizer", "lr_factor", "param_groups"]
