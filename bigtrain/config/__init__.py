"""Config loading: ``load_config("configs/vit/digits_tiny.yaml", ["train.steps=10"])``."""

from __future__ import annotations

from pathlib import Path

from bigtrain.config.core import ConfigError, apply_overrides, check_required, describe, dump_yaml, from_dict, load_yaml
from bigtrain.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config", "load_saved_config", "describe", "dump_yaml"]


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate everything. A value ``???`` in
    the file must be overridden (one line naming the keys otherwise)."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(Config, data, list(overrides))
    check_required(data, str(path) if path is not None else "the command line")
    return from_dict(Config, data)


def load_saved_config(path: str | Path) -> Config:
    """The config a checkpoint was saved with (``config.yaml`` in it), read by this version:
    configs of older versions are migrated (see :mod:`bigtrain.config.compat`). It is data, not the
    user's: a family it names by module is refused unless the user trusted that module (see
    :func:`bigtrain.families.reading_saved_config`). Callers verify the checkpoint first
    (:func:`bigtrain.checkpoint.open_saved_config` does both)."""
    from bigtrain.config.compat import migrate_legacy
    from bigtrain.config.registry import reading_saved_config

    with reading_saved_config(str(path)):
        return from_dict(Config, migrate_legacy(load_yaml(path)))
