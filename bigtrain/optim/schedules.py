"""Learning-rate schedules as pure functions of the step, plus a tiny stateful driver.

Shape = linear warmup (0 -> 1 over ``warmup_steps``), then ``constant``,
``cosine``, ``linear`` or ``rsqrt`` decay, times an optional linear cooldown to
zero over the last ``cooldown_steps`` (big_vision's recipe for rsqrt runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScheduleSpec:
    total_steps: int
    warmup_steps: int = 0
    decay: str = "cosine"  # constant | cosine | linear | rsqrt
    rsqrt_timescale: int = 10000
    cooldown_steps: int = 0
    final_ratio: float = 0.0  # end value of cosine/linear as a fraction of peak

    def __post_init__(self) -> None:
        if self.decay not in ("constant", "cosine", "linear", "rsqrt"):
            raise ValueError(f"unknown LR decay {self.decay!r}")
        if self.total_steps <= 0 or self.warmup_steps < 0 or self.cooldown_steps < 0:
            raise ValueError("schedule steps must be non-negative and total_steps > 0")
        if self.warmup_steps + self.cooldown_steps > self.total_steps:
            raise ValueError("warmup_steps + cooldown_steps exceed total_steps")


def lr_factor(spec: ScheduleSpec, step: int) -> float:
    """Multiplier of the peak LR used for optimizer step ``step`` (0-based)."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps  # never 0: step 0 already moves the weights
    t = step - spec.warmup_steps
    span = max(1, spec.total_steps - spec.warmup_steps)
    frac = min(1.0, t / span)
    lo = spec.final_ratio
    if spec.decay == "constant":
        value = 1.0
    elif spec.decay == "cosine":
        value = lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * frac))
    elif spec.decay == "linear":
        value = lo + (1.0 - lo) * (1.0 - frac)
    else:  # rsqrt, continuous at the end of warmup
        value = 1.0 / math.sqrt(1.0 + t / spec.rsqrt_timescale)
    if spec.cooldown_steps:
        remaining = spec.total_steps - step
        value *= min(1.0, remaining / spec.cooldown_steps)
    return value


class LRSchedule:
    """Sets each param group's lr = base lr * group ``lr_mult`` * ``lr_factor(step)``.

    State is the step count only, so a checkpoint restores it exactly and a
    changed total length (longer run) takes effect on resume.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, spec: ScheduleSpec) -> None:
        self.optimizer, self.peak_lr, self.spec = optimizer, peak_lr, spec
        self.step_count = 0
        self.apply()

    def apply(self) -> float:
        factor = lr_factor(self.spec, self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = self.peak_lr * group.get("lr_mult", 1.0) * factor
        return self.peak_lr * factor

    def step(self) -> None:
        self.step_count += 1
        self.apply()  # so the optimizer holds the next step's LR even outside the trainer

    @property
    def lr(self) -> float:
        return self.peak_lr * lr_factor(self.spec, self.step_count)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step"])
        self.apply()
