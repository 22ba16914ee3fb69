"""A Hugging Face directory is foreign input: its ``config.json``, safetensors headers and index are
checked before anything is built or allocated, each problem one line naming the file and field.

Why not let transformers and safetensors find the problems: they do, but as tracebacks, after
bigtrain has started building (a 1,000,000-layer config builds for minutes), and a safetensors
header is trusted as far as its own length field says (a lying header makes the reader seek past
the file). ``auto_map`` (custom modelling code) is refused: bigtrain never runs code from a model
directory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

from bigtrain.config import ConfigError

MAX_LAYERS = 4096  # Llama-3.1-405B has 126
MAX_PARAMS = 10**13  # far beyond any model that trains today: a typo or a hostile file
MAX_HEADER = 100 * 2**20  # safetensors' own reader refuses headers above 100 MB
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def _int(hf: dict[str, Any], name: str, where: str, low: int = 1, high: int | None = None,
         optional: bool = False) -> int | None:
    value = hf.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{where}: field '{name}' must be an integer {bound}, got {value!r}")
    return value


def _positive(hf: dict[str, Any], name: str, where: str) -> None:
    value = hf.get(name)
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{where}: field '{name}' must be a finite number > 0, got {value!r}")


def check_hf_config(hf: Any, where: str, architectures: tuple[str, ...]) -> dict[str, Any]:
    """``hf``: the parsed config.json (``where`` names it). Returns it when it describes a model
    bigtrain can build within sane bounds; ConfigError otherwise."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    if hf.get("auto_map"):
        raise ConfigError(f"{where}: 'auto_map' asks for custom modelling code, which bigtrain never runs; "
                          f"supported architectures: {', '.join(architectures)}")
    arch = hf.get("architectures")
    if not (isinstance(arch, list) and arch and isinstance(arch[0], str)) or arch[0] not in architectures:
        what = arch[0] if isinstance(arch, list) and arch and isinstance(arch[0], str) else f"model of architectures {arch!r}"
        raise ConfigError(f"{where} is a {what}; supported: {', '.join(architectures)}")
    width = _int(hf, "hidden_size", where)
    depth = _int(hf, "num_hidden_layers", where, high=MAX_LAYERS)
    heads = _int(hf, "num_attention_heads", where)
    mlp = _int(hf, "intermediate_size", where)
    vocab = _int(hf, "vocab_size", where)
    kv = _int(hf, "num_key_value_heads", where, optional=True) or heads
    head_dim = _int(hf, "head_dim", where, optional=True)
    _int(hf, "max_position_embeddings", where, optional=True)
    assert width and depth and heads and mlp and vocab and kv  # for the type checker: all checked above
    if heads % kv:
        raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if head_dim is None and width % heads:
        raise ConfigError(f"{where}: hidden_size {width} is not divisible by num_attention_heads {heads} "
                          "(and no head_dim is given)")
    for name in ("rms_norm_eps", "rope_theta"):
        _positive(hf, name, where)
    rope = hf.get("rope_scaling")
    if rope is not None:
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        if kind not in ROPE_TYPES:
            raise ConfigError(f"{where}: rope_scaling type {kind!r} is unknown; known: {', '.join(ROPE_TYPES)}")
    if "tie_word_embeddings" in hf and not isinstance(hf["tie_word_embeddings"], bool):
        raise ConfigError(f"{where}: field 'tie_word_embeddings' must be true or false")
    hd = head_dim or width // heads
    params = depth * (width * hd * (2 * heads + 2 * kv) + 3 * width * mlp) + 2 * vocab * width
    if params > MAX_PARAMS:
        raise ConfigError(f"{where}: its sizes make {params:.3g} parameters (more than {MAX_PARAMS:.0e}): refused "
                          "before building anything")
    return hf


def check_weight_file(directory: str, name: str, where: str) -> str:
    """The path of safetensors file ``name`` of ``directory`` after checking that it stays inside the
    directory (no link or ``..`` out of it) and that its header is consistent with the file."""
    if os.path.isabs(name) or os.path.normpath(name).startswith(".."):
        raise ConfigError(f"{where}: weight file {name!r} is outside {directory}")
    path = os.path.join(directory, name)
    root = os.path.realpath(directory)
    if not os.path.realpath(path).startswith(root + os.sep):
        raise ConfigError(f"{where}: {path} links outside {directory}; refusing to read it")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, MAX_HEADER):
                raise ConfigError(f"{path}: not a safetensors file (header length {n} in a {size}-byte file)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ConfigError(f"{where}: weight file {path} is missing") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a safetensors file ({exc})") from None
    _check_entries(header, size - 8 - n, path)
    return path


def _check_entries(header: Any, data_bytes: int, path: str) -> None:
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: its safetensors header is not a JSON object")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") in _DTYPE_BYTES and isinstance(entry.get("shape"), list) \
            and all(isinstance(d, int) and d >= 0 for d in entry["shape"]) and isinstance(entry.get("data_offsets"), list) \
            and len(entry["data_offsets"]) == 2 and all(isinstance(o, int) for o in entry["data_offsets"])
        if not ok:
            raise ConfigError(f"{path}: tensor {key!r} has a malformed header entry")
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= data_bytes or end - start != math.prod(entry["shape"]) * _DTYPE_BYTES[entry["dtype"]]:
            raise ConfigError(f"{path}: tensor {key!r} has offsets {entry['data_offsets']} that do not fit its shape "
                              f"or the file (truncated or damaged)")


def read_weight_index(directory: str, index: str) -> dict[str, str]:
    """``model.safetensors.index.json``: HF tensor name -> checked file path."""
    try:
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{index}: unreadable ({exc})") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ConfigError(f"{index}: 'weight_map' must map tensor names to file names")
    files = {name: check_weight_file(directory, name, index) for name in sorted(set(weight_map.values()))}
    return {k: files[v] for k, v in weight_map.items()}
