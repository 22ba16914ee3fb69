"""Consolidate a sharded DCP checkpoint into one model file, in one process.

``bigtrain export CKPT --format safetensors|hf --out PATH``

The checkpoint's metadata lists every model tensor with its global shape, so the
full tensors are allocated from it and DCP fills them from whatever shards the
saving run wrote (any world size, ZeRO stage, TP or PP layout). Every file's size
and checksum is verified first; the metadata is read by the restricted unpickler
(nothing but DCP's own types), tensors with ``weights_only`` loading, the config
from the checkpoint's YAML.

* ``safetensors``: one ``.safetensors`` file with bigtrain's parameter names.
* ``hf`` (families with a Hugging Face exporter, e.g. ``llama``): a ``save_pretrained``
  directory (``config.json`` + ``model.safetensors``) that ``transformers`` loads.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torch.distributed.checkpoint.api import CheckpointException

from bigtrain.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    CorruptCheckpoint,
    SafeFileSystemReader,
    SafeLoadPlanner,
    _single_process_ok,
)
from bigtrain.checkpoint.manager import verify_checkpoint

MODEL_PREFIX = "model."


def load_model_state(ckpt: str) -> dict[str, torch.Tensor]:
    """Every model tensor of a complete checkpoint, unsharded, keyed by parameter name."""
    verify_checkpoint(ckpt)
    reader = SafeFileSystemReader(ckpt)
    state: dict[str, torch.Tensor] = {}
    for key, meta in reader.read_metadata().state_dict_metadata.items():
        if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata):
            state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not state:
        raise CheckpointError(f"{ckpt} holds no model tensors")
    try:
        with _single_process_ok():
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    except CheckpointException as exc:  # a BaseException: never let it escape as a traceback
        raise CorruptCheckpoint(f"{ckpt} does not load: {next(iter(exc.failures.values()))[0]}") from None
    return {k[len(MODEL_PREFIX):]: v for k, v in state.items()}


def export_safetensors(ckpt: str, out: str) -> str:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in load_model_state(ckpt).items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(state, out, metadata={"format": "pt", "source": os.path.abspath(ckpt)})
    return out


def export_hf(ckpt: str, out: str) -> str:
    from bigtrain.config import load_saved_config
    from bigtrain.families import get_family
    from bigtrain.recipes import build_model

    config_path = os.path.join(ckpt, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{ckpt} has no {CONFIG_FILE}: cannot rebuild the model for --format hf")
    cfg = load_saved_config(config_path)
    family = get_family(cfg.model.family)
    if family.export_hf is None:
        raise CheckpointError(f"model.family={cfg.model.family} has no Hugging Face exporter (use --format safetensors)")
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(load_model_state(ckpt), strict=True, assign=True)
    family.export_hf(model, out)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bigtrain export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a complete checkpoint directory (run_dir/checkpoints/step_XXXXXXXX)")
    ap.add_argument("--format", choices=["safetensors", "hf"], default="safetensors")
    ap.add_argument("--out", required=True, help="output .safetensors file (safetensors) or directory (hf)")
    args = ap.parse_args(argv)
    path = export_safetensors(args.checkpoint, args.out) if args.format == "safetensors" else export_hf(args.checkpoint, args.out)
    print(path)
    return 0
