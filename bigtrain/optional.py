"""Optional packages, asked for by what needs them: importing bigtrain needs none of
``transformers``, ``diffusers``, ``tokenizers``, ``wandb``, ``submitit``, ``deepspeed`` or
``bitsandbytes``; a config or command that needs one says so in one line (exit 2), with the
``pip install`` to run, before any work."""

from __future__ import annotations

import importlib
from types import ModuleType

from bigtrain.config.core import ConfigError

# module -> the pyproject extra that installs it
EXTRAS = {"transformers": "transformers", "tokenizers": "transformers", "diffusers": "diffusers", "wandb": "wandb",
          "submitit": "submitit", "deepspeed": "deepspeed", "bitsandbytes": "bitsandbytes"}


def require(module: str, why: str) -> ModuleType:
    """``module`` imported, or a ConfigError naming ``why`` it is needed and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module.split(".")[0], module)
        raise ConfigError(f"{why} needs the {module} package, which is not installed: pip install "
                          f"'bigtrain[{extra}]'") from None


__all__ = ["EXTRAS", "require"]
