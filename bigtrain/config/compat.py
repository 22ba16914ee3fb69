"""Which config changes a resume may make: the rest must match the checkpoint's own config.

A resumed run continues the saved optimizer trajectory and data order, so keys that change
what the saved state *means* — the model, the objective, the global batch, the seed (data
order), the optimizer type or the schedule — must be the same, unless the user names them
in ``resume_allow_changes``. Layout keys (``parallel.*``), logging, evaluation and the like
may change freely: that is what elastic resume is for.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

log = logging.getLogger(__name__)

# dotted keys or whole sections (a trailing section name covers every key under it)
RESUME_FIXED = ("task", "model", "teacher", "distill", "diffusion", "train.global_batch_size", "train.seed", "train.steps", "optim.name",
                "schedule")
# model keys that change no tensor and no data: free to differ (the variant only names the sizes,
# which are compared themselves once the preset filled them in)
RESUME_FREE = ("model.dropout", "model.head_zero_init", "model.head_bias_init", "model.variant", "teacher.variant",
               "distill.shard_teacher", "diffusion.sampler", "diffusion.sample_steps", "diffusion.guidance",
               "diffusion.samples", "diffusion.eval_classifier", "diffusion.eval_max_samples")


def migrate_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an older bigtrain, in today's shape (the input is not changed).

    Before model families, the model section was one flat union named by ``model.name`` (every
    family's keys present, the unused ones at their defaults): the name becomes ``model.family``
    and the keys the family does not have are dropped. A variant the family does not know (the
    old default 'Ti', which the LM ignored) becomes 'custom'."""
    model = data.get("model")
    if not isinstance(model, dict) or "name" not in model or "family" in model:
        return data
    from bigtrain.config.registry import get_family

    family = get_family(str(model["name"]))
    keep = {f.name for f in dataclasses.fields(family.config)}
    migrated = {"family": model["name"], **{k: v for k, v in model.items() if k in keep and k != "family"}}
    if migrated.get("variant", "custom") not in (*family.presets, "custom"):
        migrated["variant"] = "custom"
    return {**data, "model": migrated}


def normalize_saved(data: dict[str, Any], source: str = "the checkpoint's config") -> dict[str, Any]:
    """A saved config as this version resolves it (legacy keys migrated, presets and defaults filled),
    so it compares key by key with a run's resolved config; as migrated if it no longer validates.
    Read as untrusted data: no family it names by module is imported (``source`` names the file)."""
    from bigtrain.config.core import ConfigError, from_dict
    from bigtrain.config.schema import Config
    from bigtrain.config.registry import reading_saved_config

    try:
        with reading_saved_config(source):
            return dataclasses.asdict(from_dict(Config, migrate_legacy(data)))
    except ConfigError as exc:
        log.warning("the checkpoint's saved config does not validate today (%s); comparing it as saved", exc)
        return data


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


def resume_mismatches(saved: dict[str, Any], current: dict[str, Any], allow: list[str],
                      source: str = "the checkpoint's config") -> list[str]:
    """``key: saved -> current`` for every fixed key that differs and is not allowed to."""
    old, new = _flatten(normalize_saved(saved, source)), _flatten(current)
    out = []
    for key in sorted(set(old) | set(new)):
        if _fixed(key) and key not in allow and old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return out
