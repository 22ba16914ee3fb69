"""Optional packages, asked for by what needs them: importing bigtrain needs none of
``transformers``, ``diffusers``, ``tokenizers``, ``wandb``, ``submitit``, ``deepspeed`` or
``bitsandbytes``; a config or command that needs one says so in one line (exit 2), with the
``pip install`` to run, before any work."""

from __future__ import annotations

import importlib.util

from bigtrain.config.core import ConfigError

# module -> the pyproject extra that installs it
EXTRAS = {"transformers": "transformers", "tokenizers": "transformers", "diffusers": "diffusers", "wandb": "wandb",
          "submitit": "submitit", "deepspeed": "deepspeed", "bitsandbytes": "bitsandbytes"}


def install_hint(module: str) -> str:
    """The command that installs ``module`` (a pyproject extra where one covers it)."""
    top = module.split(".")[0]
    return f"pip install 'bigtrain[{EXTRAS[top]}]'" if top in EXTRAS else f"pip install {top}"


def require(module: str, why: str) -> None:
    """A ConfigError naming ``why`` ``module`` is needed and the install command, unless it is
    installed. Found, not imported (``importlib.util.find_spec``): validating a config stays fast
    and torch-free; the code that uses the package imports it."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken module entry
        found = False
    if not found:
        raise ConfigError(f"{why} needs the {module} package, which is not installed: {install_hint(module)}")


def missing_optional(exc: BaseException, what: str = "this") -> str | None:
    """The one-line message for an ImportError of an optional package raised where a command uses it
    (the CLI exits 2 with it instead of a traceback); None for any other error."""
    name = getattr(exc, "name", None) or ""
    if not isinstance(exc, ModuleNotFoundError) or name.split(".")[0] not in EXTRAS:
        return None
    return f"{what} needs the {name.split('.')[0]} package, which is not installed: {install_hint(name)}"


__all__ = ["EXTRAS", "install_hint", "missing_optional", "require"]
