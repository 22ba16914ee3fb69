"""Consolidate a sharded DCP checkpoint into one model file, in one process.

``bigtrain export CKPT --format safetensors|hf --out PATH``

The checkpoint's metadata lists every model tensor with its global shape, so the
full tensors are allocated from it and DCP fills them from whatever shards the
saving run wrote (any world size, ZeRO stage, TP or PP layout). Every file's size
and checksum is verified first; the metadata is read by the restricted unpickler
(nothing but DCP's own types), tensors with ``weights_only`` loading, the config
from the checkpoint's YAML.

* ``safetensors``: one ``.safetensors`` file with bigtrain's parameter names.
* ``--weights``: the EMA average by default when the run kept one (what diffusion models are
  sampled and evaluated with), ``model`` for the trained weights.
* ``hf`` (families with a Hugging Face exporter, e.g. ``llama``): a ``save_pretrained``
  directory (``config.json`` + ``model.safetensors``) that ``transformers`` loads.
"""

from __future__ import annotations

import argparse
import json
import os

from bigtrain.checkpoint import CheckpointError
from bigtrain.checkpoint.sources import EMA_PREFIX, MODEL_PREFIX, load_model_state, model_from_checkpoint
from bigtrain.config.core import help_text

__all__ = ["EMA_PREFIX", "MODEL_PREFIX", "export_hf", "export_safetensors", "load_model_state", "main",
           "model_from_checkpoint"]
PRODUCER = "bigtrain export"  # recorded in what export writes: a rerun may replace its own output
PROVENANCE = "bigtrain_export.json"  # in an exported HF directory


def own_export(path: str) -> bool:
    """An earlier output of this command: a safetensors file or HF directory that says so."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, PROVENANCE))
    try:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return (f.metadata() or {}).get("producer") == PRODUCER
    except Exception:  # noqa: BLE001 - not a safetensors file at all: not ours
        return False


def export_safetensors(ckpt: str, out: str, weights: str = "auto") -> str:
    from safetensors.torch import save_file

    from bigtrain.outputs import atomic_output

    state = {k: v.contiguous() for k, v in load_model_state(ckpt, weights).items()}
    with atomic_output(out, "file") as tmp:
        save_file(state, tmp, metadata={"format": "pt", "source": os.path.abspath(ckpt), "producer": PRODUCER})
    return out


def export_hf(ckpt: str, out: str, weights: str = "auto") -> str:
    from bigtrain.families import get_family

    def exportable(cfg: object, model: object) -> None:
        if get_family(cfg.model.family).export_hf is None:  # type: ignore[attr-defined]
            raise CheckpointError(f"model.family={cfg.model.family} has no Hugging Face exporter "  # type: ignore[attr-defined]
                                  "(use --format safetensors)")

    cfg, model, _ = model_from_checkpoint(ckpt, "checkpoint", weights, strict=True, accept=exportable)
    family = get_family(cfg.model.family)
    from bigtrain.outputs import atomic_output

    with atomic_output(out, "dir") as tmp:
        family.export_hf(model, tmp)
        with open(os.path.join(tmp, PROVENANCE), "w") as f:
            json.dump({"producer": PRODUCER, "source": os.path.abspath(ckpt), "weights": weights}, f, indent=1)
    return out


def main(argv: list[str]) -> int:
    from bigtrain.families import add_trust_argument, apply_trust_argument

    ap = argparse.ArgumentParser(prog="bigtrain export", description=help_text(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a complete checkpoint directory (run_dir/checkpoints/step_XXXXXXXX)")
    ap.add_argument("--format", choices=["safetensors", "hf"], default="safetensors")
    ap.add_argument("--out", required=True, help="output .safetensors file (safetensors) or directory (hf)")
    ap.add_argument("--weights", choices=["auto", "model", "ema"], default="auto",
                    help="auto (default): the EMA weights when the checkpoint has an EMA (ema.decay > 0), else the "
                         "trained ones; model: always the trained weights; ema: the EMA (an error without one)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out that is not an earlier export")
    add_trust_argument(ap)
    args = ap.parse_args(argv)
    apply_trust_argument(args)
    from bigtrain.outputs import check_output

    check_output(args.out, "--out", "file" if args.format == "safetensors" else "dir", force=args.force,
                 sources=(args.checkpoint,), own=own_export)
    export = export_safetensors if args.format == "safetensors" else export_hf
    path = export(args.checkpoint, args.out, args.weights)
    print(path)
    return 0
