"""``model.pretrained: DIR`` (and ``teacher.pretrained``): a local Hugging Face causal-LM directory
(config.json + safetensors) or a bigtrain checkpoint of this family as the starting weights, read
shard by shard into the already parallelized model.

Every rank reads from the safetensors files only the slice of each tensor it holds (its FSDP
rows, its tensor-parallel columns, its pipeline stage's layers): no rank ever holds a full copy
of a sharded tensor. Weights in ``pytorch_model.bin`` (a pickle) are never read: loading one runs
code. ``.bin``-only directories are refused with the conversion to use. A bigtrain checkpoint is
verified (sizes and checksums) and read through DCP, which reshards it to this run's layout; its
architecture is the one its own config describes (recursively, when it was itself started from an
HF directory).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from bigtrain.config.core import ConfigError
from bigtrain.config.registry import Pretrained
from bigtrain.models.args import ARCHITECTURES

if TYPE_CHECKING:  # torch loads with the weights, not when a config naming them is validated
    from torch import nn

# config.json key -> model.* key
SIZE_KEYS = {"hidden_size": "width", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
             "num_key_value_heads": "num_kv_heads", "intermediate_size": "mlp_dim", "vocab_size": "vocab_size"}


def is_checkpoint(path: str) -> bool:
    """A bigtrain checkpoint directory (its config YAML, no HF config.json)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return False  # before importing the checkpoint layer (torch): `config show` of an HF start stays light
    from bigtrain.checkpoint import CONFIG_FILE

    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def saved_section(path: str, key: str = "model.pretrained") -> Any:
    """The ``model`` section a bigtrain checkpoint was trained with."""
    from bigtrain.checkpoint.sources import saved_model_section

    return saved_model_section(path, "llama", key)


def read_hf_config(path: str, key: str = "model.pretrained") -> dict[str, Any]:
    """The transformers config (as a dict) of a pretrained source: an HF directory's config.json, or
    the architecture a bigtrain checkpoint's own config builds."""
    if not os.path.isdir(path):
        raise ConfigError(f"config key '{key}': {path} does not exist (a Hugging Face model directory or a bigtrain "
                          "checkpoint)")
    if is_checkpoint(path):
        return hf_config(saved_section(path, key)).to_dict()
    cfg_file = os.path.join(path, "config.json")
    try:
        with open(cfg_file) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config key '{key}': {path} has neither a config.json (a Hugging Face model directory) "
                          "nor a config.yaml (a bigtrain checkpoint)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config key '{key}': cannot read {cfg_file}: {exc}") from None
    from bigtrain.families.llama.hf_checks import check_hf_config

    try:
        return check_hf_config(hf, cfg_file, ARCHITECTURES)
    except ConfigError as exc:
        raise ConfigError(f"config key '{key}': {exc}") from None


def weight_files(path: str) -> dict[str, str]:
    """HF tensor name -> the safetensors file holding it."""
    from bigtrain.families.llama.hf_checks import check_weight_file, read_weight_index

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        return read_weight_index(path, index)
    if os.path.lexists(os.path.join(path, "model.safetensors")):
        from safetensors import safe_open

        single = check_weight_file(path, "model.safetensors", path)
        with safe_open(single, "pt") as f:
            return {k: single for k in f.keys()}
    hint = " (only pytorch_model.bin, a pickle, which is never loaded: convert it with save_pretrained(safe_serialization=True))" \
        if os.path.isfile(os.path.join(path, "pytorch_model.bin")) else ""
    raise ConfigError(f"config key 'model.pretrained': no safetensors weights in {path}{hint}")


def load_weights(model: nn.Module, path: str) -> dict[str, int]:
    """Copy the pretrained tensors into ``model`` (materialized, possibly sharded); returns how many
    tensors and elements this rank read."""
    import torch

    with torch.no_grad():
        return _load_weights(model, path)


def _load_weights(model: nn.Module, path: str) -> dict[str, int]:
    from safetensors import safe_open

    from bigtrain.distributed.activation import clean_name
    from bigtrain.distributed.sharded_init import local_box

    files = weight_files(path)
    handles: dict[str, Any] = {}
    tensors = elements = 0
    try:
        for name, param in model.named_parameters():  # a tied lm_head shares embed_tokens' parameter
            name = clean_name(name)
            hf_name = name if name.startswith("lm_head.") else "model." + name
            if hf_name not in files:
                raise ConfigError(f"config key 'model.pretrained': {path} has no tensor {hf_name}")
            if files[hf_name] not in handles:
                handles[files[hf_name]] = safe_open(files[hf_name], "pt")
            view = handles[files[hf_name]].get_slice(hf_name)
            if tuple(view.get_shape()) != tuple(param.shape):
                raise ConfigError(f"config key 'model.pretrained': {hf_name} in {path} has shape "
                                  f"{tuple(view.get_shape())}, the model expects {tuple(param.shape)}")
            local, offset = local_box(param)
            part = view[tuple(slice(o, o + n) for o, n in zip(offset, local.shape))] if local.ndim else view[...]
            local.copy_(part.to(local.dtype))
            tensors, elements = tensors + 1, elements + part.numel()
    finally:
        handles.clear()
    return {"tensors": tensors, "elements": elements}


def pretrained(m: Any) -> Pretrained | None:
    """The source named by ``model.pretrained`` (None when unset): its sizes and its loader."""
    path = getattr(m, "pretrained", "")
    if not path:
        return None
    if is_checkpoint(path):
        return _checkpoint_source(path)
    hf = read_hf_config(path)
    sizes = {ours: hf[theirs] for theirs, ours in SIZE_KEYS.items() if theirs in hf}
    sizes.setdefault("num_kv_heads", sizes.get("num_heads", 0))

    def load(model: nn.Module) -> dict[str, int]:
        model.retie()  # replicated layouts only (validated): FSDP would own two tensors by now
        stats = load_weights(model, path)
        model.reset_buffers(next(model.parameters()).device)
        return stats

    return Pretrained(path=path, sizes=sizes, load=load)


def _checkpoint_source(path: str) -> Pretrained:
    from bigtrain.checkpoint.sources import checkpoint_source

    def finish(model: nn.Module) -> None:
        model.reset_buffers(next(model.parameters()).device)

    return checkpoint_source(path, "llama", tuple(SIZE_KEYS.values()), prepare=lambda m: m.retie(), finish=finish)


def hf_config(m: Any) -> Any:
    """The transformers config a ``model`` (or ``teacher``) section builds: ``pretrained``'s own (an HF
    directory's config.json, with the run's attention kernel, or what a bigtrain checkpoint's config
    builds), else a Llama config from the sizes."""
    from bigtrain.models.causal_lm import llama_config

    if not m.pretrained:
        return llama_config(m.vocab_size, m.width, m.depth, m.num_heads, m.num_kv_heads, m.mlp_dim, m.seq_len)
    if is_checkpoint(m.pretrained):
        return hf_config(saved_section(m.pretrained))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(m.pretrained, local_files_only=True)
    config._attn_implementation = "sdpa"
    return config
