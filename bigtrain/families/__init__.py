"""Model families: everything bigtrain needs to know about one kind of model, in one object.

The registry itself (:class:`Family`, :func:`register_family`, :func:`get_family`, presets, trust of
``module:ATTRIBUTE`` references) lives in :mod:`bigtrain.config.registry`, low enough for the config
schema; this package re-exports it, with what families use to build their hooks (the evaluation
context, checkpoint sources), and holds bigtrain's own families as subpackages (``vit``, ``llama``,
``dit``, ``unet``), each defining ``FAMILY``. See the registry's docstring for the lookup order.
"""

from __future__ import annotations

from typing import Any

from bigtrain.config.registry import (
    ENTRY_POINT_GROUP,
    Family,
    ModelConfig,
    Pretrained,
    RunSpec,
    add_trust_argument,
    all_families,
    apply_preset,
    apply_trust_argument,
    family_names,
    find_command,
    get_family,
    lazy,
    reading_saved_config,
    register_family,
    trust_family,
)

def __getattr__(name: str) -> Any:
    """Re-exported on first use (PEP 562): importing the registry through this package, as every
    family does, must not load the checkpoint code (torch) before a run needs it."""
    if name in ("checkpoint_source", "saved_model_section"):
        from bigtrain.checkpoint import sources

        return getattr(sources, name)
    if name == "EvalContext":
        from bigtrain.eval.context import EvalContext

        return EvalContext
    raise AttributeError(f"module 'bigtrain.families' has no attribute {name!r}")


__all__ = ["ENTRY_POINT_GROUP", "EvalContext", "Family", "ModelConfig", "Pretrained", "RunSpec", "add_trust_argument",
           "all_families", "apply_preset", "apply_trust_argument", "checkpoint_source", "family_names",
           "find_command", "get_family", "lazy", "reading_saved_config", "register_family", "saved_model_section",
           "trust_family"]
