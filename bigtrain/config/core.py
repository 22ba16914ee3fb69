"""Typed config machinery: YAML + ``key=value`` overrides -> validated dataclasses.

The schema lives in :mod:`bigtrain.config.schema`; this module only knows how to
turn plain dicts into dataclass instances and to say precisely what is wrong
(the full dotted key, and the closest valid key) *before* any work starts.
"""

from __future__ import annotations

import dataclasses
import re
import difflib
import math
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem the user must fix; the message names the offending key."""


def doc(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    **kw: Any,
) -> Any:
    """A dataclass field that carries its documentation (shown by ``bigtrain config``) and,
    for numbers (or lists of numbers), the bounds every given value is checked against."""
    meta = {"help": help, "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _check_bounds(value: Any, bounds: dict[str, float], key: str) -> None:
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        for kind, limit in bounds.items():
            ok = {"ge": item >= limit, "gt": item > limit, "le": item <= limit, "lt": item < limit}[kind]
            if not ok:
                raise ConfigError(f"config key '{key}' must be {_BOUND_TEXT[kind]} {limit:g}, got {item!r}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one leaf value against its annotated type."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and value not in choices:
            # YAML 1.1 reads on/off/yes/no as booleans; map back to the spelled choice.
            spelled = ("on", "true", "yes") if value else ("off", "false", "no")
            value = next((c for c in choices if c in spelled), value)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}{hint}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': {value!r} is not a valid {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping of sub-keys, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        # bool is an int subclass in Python; a YAML 'true' where a count is wanted is a mistake.
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads '3e-4' (no dot) as a string; accept any float literal.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if not math.isfinite(number):  # .inf / .nan pass every bound check and make a run meaningless
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {tp!r}")  # schema bug, not user error


def all_keys(obj: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config class, or of a config instance (whose resolved sections — the
    model family's — may have more keys than the class declares)."""
    keys = []
    cls = obj if isinstance(obj, type) else type(obj)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        sub = hints[f.name] if isinstance(obj, type) else getattr(obj, f.name)
        if dataclasses.is_dataclass(sub):
            keys.extend(all_keys(sub, prefix + f.name + "."))
    return keys


def _resolver(f: dataclasses.Field) -> Any:
    """A section whose schema depends on its contents (``model``: the family decides) carries
    ``resolve(data, key) -> (dataclass, data)`` in its field metadata."""
    return f.metadata.get("resolve")


def unknown_key_error(cls: Any, key: str, prefix: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(cls, prefix), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            raise unknown_key_error(cls, prefix + str(key), prefix)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        resolve = _resolver(f)
        if resolve is not None:
            value = data.get(f.name, {})
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{prefix}{f.name}': expected a mapping of sub-keys, got {value!r}")
            section, value = resolve(value, prefix + f.name)
            kwargs[f.name] = from_dict(section, value, prefix=f"{prefix}{f.name}.")
        elif f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], prefix + f.name)
            _check_bounds(kwargs[f.name], f.metadata.get("bounds", {}), prefix + f.name)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a','b'], value parsed as a YAML scalar/list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(root_cls: Any, data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge ``key=value`` strings into a nested dict, checking each key exists (keys of a resolved
    section, e.g. ``model.*``, are checked by :func:`from_dict` once its schema is known)."""
    valid = set(all_keys(root_cls))
    resolved = {f.name for f in dataclasses.fields(root_cls) if _resolver(f) is not None}
    for text in overrides:
        path, value = parse_override(text)
        dotted = ".".join(path)
        if dotted not in valid and not (len(path) > 1 and path[0] in resolved):
            raise unknown_key_error(root_cls, dotted)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


REQUIRED = "???"  # a value the config leaves to the command line (as in OmegaConf / Hydra)


def required_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose value is still ``???``: a shipped config that cannot name, e.g., the
    weights a user will distill from marks them so instead of shipping a path that is wrong."""
    keys = []
    for key, value in data.items():
        if isinstance(value, dict):
            keys += required_keys(value, f"{prefix}{key}.")
        elif value == REQUIRED:
            keys.append(f"{prefix}{key}")
    return keys


def check_required(data: dict[str, Any], source: str) -> None:
    missing = required_keys(data)
    if missing:
        given = " ".join(f"{k}=..." for k in missing)
        raise ConfigError(f"config key{'s' if len(missing) > 1 else ''} {', '.join(repr(k) for k in missing)} "
                          f"must be given: {source} leaves {'them' if len(missing) > 1 else 'it'} {REQUIRED} "
                          f"(add {given} to the command line)")


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level")
    return data


def describe(cls: Any, prefix: str = "", instance: Any = None) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every leaf field, for ``bigtrain config describe``. A section
    whose default is built by a factory (``teacher`` is a model section with ``family=''``) shows
    the values of that default instance, not its class's."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "<required>"
        if instance is not None:
            default = getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + ".", default if dataclasses.is_dataclass(default) else None))
            continue
        bounds = ", ".join(f"{_BOUND_TEXT[k]} {v:g}" for k, v in f.metadata.get("bounds", {}).items())
        rows.append((prefix + f.name, _type_name(tp), default, f.metadata.get("help", "") + (f" [{bounds}]" if bounds else "")))
    return rows


_RST_ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|exc|obj):`~?([^`]+)`")


def help_text(text: str) -> str:
    """A docstring as terminal help: reStructuredText roles and double backticks become plain text
    (``--help`` is read in a terminal, not rendered)."""
    return _RST_ROLE.sub(r"\1", text).replace("``", "")


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)

