"""Which config changes a resume may make: the rest must match the checkpoint's own config.

A resumed run continues the saved optimizer trajectory and data order, so keys that change
what the saved state *means* — the model, the objective, the global batch, the seed (data
order), the optimizer type or the schedule — must be the same, unless the user names them
in ``resume_allow_changes``. Layout keys (``parallel.*``), logging, evaluation and the like
may change freely: that is what elastic resume is for.
"""

from __future__ import annotations

from typing import Any

# dotted keys or whole sections (a trailing section name covers every key under it)
RESUME_FIXED = ("task", "model", "train.global_batch_size", "train.seed", "train.steps", "optim.name", "schedule")
# model keys that change no tensor and no data: free to differ
RESUME_FREE = ("model.dropout", "model.head_zero_init")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _fixed(key: str) -> bool:
    return key not in RESUME_FREE and any(key == f or key.startswith(f + ".") for f in RESUME_FIXED)


def resume_mismatches(saved: dict[str, Any], current: dict[str, Any], allow: list[str]) -> list[str]:
    """``key: saved -> current`` for every fixed key that differs and is not allowed to."""
    old, new = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(old) | set(new)):
        if _fixed(key) and key not in allow and old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return out
