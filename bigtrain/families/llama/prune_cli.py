"""``bigtrain prune SRC --out DIR [--hidden H] [--ffn F] [--heads A] [--layers L | --params N]
[--data DIR] [--calib-samples N] [--scores FILE]``: Minitron pruning of a causal LM.

SRC is a Hugging Face directory (config.json + safetensors) or a bigtrain checkpoint of the llama
family. Calibration tokens come from ``--data`` (token shards), else CPython's standard library
written on demand with SRC's tokenizer.json if it has one (byte-level otherwise). Axes not given
keep their size. ``--params N``: among candidate shapes under N parameters (width and MLP cut in
eighths, depth in steps of one layer, heads kept), the one with the lowest calibration loss.
Writes DIR as a Hugging Face directory (tokenizer files copied) plus ``prune_report.json``
(shapes, parameter counts, calibration losses, candidates) and ``importance.json`` (the scores,
reusable with ``--scores``: calibration then runs no forward pass).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from bigtrain.config import ConfigError
from bigtrain.config.core import help_text
from bigtrain.families.llama.prune import (
    Importance,
    apply_plan,
    estimate_importance,
    layer_loss_importance,
    lm_loss,
    make_plan,
)
from bigtrain.models.causal_lm import CausalLM
from bigtrain.outputs import atomic_output

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def load_source(src: str) -> CausalLM:
    """The full model on the CPU, in fp32, from an HF directory or a bigtrain checkpoint."""
    from types import SimpleNamespace

    from bigtrain.checkpoint.sources import load_model_state
    from bigtrain.families.llama.pretrained import hf_config, is_checkpoint, load_weights, read_hf_config

    read_hf_config(src, "SRC")  # a clear error for anything that is neither
    with torch.device("meta"):
        model = CausalLM(hf_config(SimpleNamespace(pretrained=src)))
    if is_checkpoint(src):
        model.load_state_dict(load_model_state(src), strict=False, assign=True)
    else:
        model.to_empty(device="cpu")
        model.retie()
        load_weights(model, src)
    model.retie()
    model.reset_buffers(torch.device("cpu"))
    return model.float().eval()


def calibration(src: str, data: str | None, samples: int, seq_len: int, vocab: int) -> list[torch.Tensor]:
    """Token batches of ``samples`` sequences: ``data``'s train split, else the stdlib corpus."""
    from data_pipeline import GlobalOrder, load_split
    from data_pipeline.index import split_entry
    from data_pipeline.loader import TokenBatchDataset
    from data_pipeline.text import BYTES, load_tokenizer, write_text_shards

    tmp = None
    if data is None:
        tmp = tempfile.mkdtemp(prefix="bigtrain_calib_")
        tok = load_tokenizer(src) if os.path.isfile(os.path.join(src, "tokenizer.json")) else BYTES
        write_text_shards(tmp, seq_len=seq_len, max_bytes=max(400_000, samples * seq_len * 8), tokenizer=tok)
        data = tmp
    try:
        split = load_split(data, "train")
        seq = int(split_entry(data, "train").get("seq_len", seq_len))  # the shards' own length
        ds = TokenBatchDataset(split, GlobalOrder([s.num_samples for s in split.shards], 0, shuffle=False),
                               seq, vocab, 0, "skip")
        n = min(samples, split.num_samples)
        return [ds[list(range(i, min(i + 8, n)))]["tokens"] for i in range(0, n, 8)]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def shape_params(c: Any, hidden: int, ffn: int, heads: int, layers: int) -> int:
    """Parameters of a Llama-shaped model with these sizes (biases, if any, are negligible)."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = heads * head_dim, c.num_key_value_heads * head_dim
    per_layer = hidden * (2 * q + 2 * kv) + 3 * hidden * ffn + 2 * hidden
    heads_out = 1 if getattr(c, "tie_word_embeddings", False) else 2
    return layers * per_layer + heads_out * c.vocab_size * hidden + hidden


def candidates(c: Any, budget: int) -> list[tuple[int, int, int, int]]:
    """(hidden, ffn, heads, layers) under ``budget`` parameters, largest first (at most 8)."""
    widths = sorted({max(8, c.hidden_size * k // 8 // 8 * 8) for k in range(4, 9)})
    ffns = sorted({max(8, c.intermediate_size * k // 8 // 8 * 8) for k in range(4, 9)})
    depths = range(max(1, c.num_hidden_layers // 2), c.num_hidden_layers + 1)
    found = [(h, f, c.num_attention_heads, d) for h, f, d in itertools.product(widths, ffns, depths)
             if shape_params(c, h, f, c.num_attention_heads, d) <= budget]
    return sorted(found, key=lambda s: -shape_params(c, *s))[:8]


def _own_output(path: str) -> bool:
    """A complete earlier ``bigtrain prune`` output: its report (written last) and the HF files."""
    return all(os.path.isfile(os.path.join(path, n)) for n in ("prune_report.json", "config.json", "model.safetensors"))


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bigtrain prune", description=help_text(__doc__.split("\n\n")[0]))
    p.add_argument("src")
    p.add_argument("--out", required=True, help="the pruned HF directory (new, empty, or an earlier prune output)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out that is not an earlier prune output")
    p.add_argument("--hidden", type=int, help="residual width (embedding channels) to keep")
    p.add_argument("--ffn", type=int, help="MLP neurons per layer to keep")
    p.add_argument("--heads", type=int, help="query heads per layer to keep (a multiple of the KV heads)")
    axis = p.add_mutually_exclusive_group()
    axis.add_argument("--layers", type=int, help="layers to keep (the lowest block importance is dropped)")
    axis.add_argument("--params", type=float, help="parameter budget: search shapes under it (e.g. 5e8)")
    p.add_argument("--data", help="token shards for calibration (default: stdlib text, SRC's tokenizer)")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128, help="calibration sequence length when writing the corpus")
    p.add_argument("--scores", help="importance.json of an earlier run on the same SRC: no calibration forward")
    p.add_argument("--layer-importance", choices=("cosine", "loss"), default="cosine",
                   help="rank layers by 1 - cos(input, output) (one pass) or by the calibration loss increase when "
                        "the layer alone is dropped (one pass per layer)")
    args = p.parse_args(argv)
    from bigtrain.outputs import check_output

    for flag in ("hidden", "ffn", "heads", "layers"):  # 0 would otherwise read as "keep all"
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag} {value}: must be at least 1 (leave it out to keep the source's size)")
    if args.params is not None and not (math.isfinite(args.params) and args.params >= 1):
        raise ConfigError(f"--params {args.params}: must be a finite parameter count >= 1")
    for flag, value in (("--calib-samples", args.calib_samples), ("--seq-len", args.seq_len)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    if args.data and not os.path.isdir(args.data):
        raise ConfigError(f"--data {args.data}: no such directory of token shards")
    check_output(args.out, "--out", "dir", force=args.force, sources=(args.src, *([args.data] if args.data else [])),
                 own=_own_output)
    return args


def read_scores(path: str, model: CausalLM) -> Importance:
    """``--scores``: an importance.json written by prune for a model of this shape, finite throughout."""
    c = model.config
    shapes = {"heads": (c.num_hidden_layers, c.num_attention_heads), "neurons": (c.num_hidden_layers, c.intermediate_size),
              "channels": (c.hidden_size,), "layers": (c.num_hidden_layers,)}
    try:
        with open(path) as f:
            raw = json.load(f)
        tensors = {k: torch.tensor(raw[k], dtype=torch.float64) for k in shapes}
        samples, metric = raw.get("samples", 0), raw.get("layer_metric", "cosine")
    except FileNotFoundError:
        raise ConfigError(f"--scores {path}: no such file") from None
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"--scores {path}: not an importance.json of bigtrain prune ({type(exc).__name__}: {exc})") from None
    for key, shape in shapes.items():
        if tuple(tensors[key].shape) != shape:
            raise ConfigError(f"--scores {path}: '{key}' has shape {tuple(tensors[key].shape)}, this SRC needs {shape} "
                              "(scores of another model)")
        if not torch.isfinite(tensors[key]).all():
            raise ConfigError(f"--scores {path}: '{key}' holds non-finite values")
    if not isinstance(samples, int) or metric not in ("cosine", "loss"):
        raise ConfigError(f"--scores {path}: malformed 'samples' or 'layer_metric'")
    return Importance(*(tensors[k].float() for k in shapes), samples, metric)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    t0 = time.monotonic()
    model = load_source(args.src)
    c = model.config
    shape = (args.hidden or c.hidden_size, args.ffn or c.intermediate_size, args.heads or c.num_attention_heads,
             args.layers or c.num_hidden_layers)
    checks = [("--hidden", shape[0], c.hidden_size), ("--ffn", shape[1], c.intermediate_size),
              ("--heads", shape[2], c.num_attention_heads), ("--layers", shape[3], c.num_hidden_layers)]
    for flag, value, limit in checks:  # before the calibration passes
        if not 0 < value <= limit:
            raise ConfigError(f"{flag} {value}: must be between 1 and the source's {limit}")
    if shape[2] % c.num_key_value_heads:
        raise ConfigError(f"--heads {shape[2]}: must be a multiple of the {c.num_key_value_heads} key/value heads")
    if (c.architectures or [""])[0] == "LlamaForCausalLM" and shape[0] % shape[2]:
        # transformers' LlamaConfig refuses it even with an explicit head_dim: the output would not load
        raise ConfigError(f"--hidden {shape[0]}: a Llama config needs the width divisible by the {shape[2]} query heads "
                          f"(transformers checks it even with an explicit head_dim); e.g. --hidden "
                          f"{shape[0] // shape[2] * shape[2]} or {-(-shape[0] // shape[2]) * shape[2]}")
    given = read_scores(args.scores, model) if args.scores else None
    batches = calibration(args.src, args.data, args.calib_samples, args.seq_len, c.vocab_size)
    if given is not None:
        imp = given
    else:
        imp = estimate_importance(model, batches)
        if args.layer_importance == "loss":
            imp.layers = layer_loss_importance(model, batches)
        imp.layer_metric = args.layer_importance
    tried = []
    if args.params:
        options = candidates(c, int(args.params))
        if not options:
            raise ConfigError(f"--params {args.params:.3g}: no candidate shape fits (the source has "
                              f"{sum(t.numel() for t in model.parameters()):,} parameters)")
        for cand in options:
            loss = lm_loss(apply_plan(model, make_plan(imp, c, *cand)), batches)
            tried.append({"hidden": cand[0], "ffn": cand[1], "heads": cand[2], "layers": cand[3],
                          "params": shape_params(c, *cand), "calib_loss": loss})
        best = min(tried, key=lambda t: t["calib_loss"])
        shape = (best["hidden"], best["ffn"], best["heads"], best["layers"])
    small = apply_plan(model, make_plan(imp, c, *shape))
    report = {
        "source": args.src, "calib_samples": imp.samples,
        "before": {"hidden": c.hidden_size, "ffn": c.intermediate_size, "heads": c.num_attention_heads,
                   "kv_heads": c.num_key_value_heads, "layers": c.num_hidden_layers,
                   "params": sum(t.numel() for t in model.parameters()), "calib_loss": lm_loss(model, batches)},
        "after": {"hidden": shape[0], "ffn": shape[1], "heads": shape[2], "kv_heads": c.num_key_value_heads,
                  "layers": shape[3], "head_dim": small.config.head_dim,
                  "params": sum(t.numel() for t in small.parameters()), "calib_loss": lm_loss(small, batches)},
        "kept_layers": make_plan(imp, c, *shape).layers, "layer_importance": imp.layer_metric, "candidates": tried,
        "seconds": round(time.monotonic() - t0, 1),
    }
    with atomic_output(args.out, "dir") as tmp:  # built aside and renamed: a killed prune leaves nothing that loads
        small.to_hf().save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(args.src, name)):
                shutil.copyfile(os.path.join(args.src, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, "importance.json"), "w") as f:
            json.dump(imp.to_dict(), f)
        with open(os.path.join(tmp, "prune_report.json"), "w") as f:  # last: it marks a complete output
            json.dump(report, f, indent=1)
    b, a = report["before"], report["after"]
    print(f"pruned {args.src} -> {args.out}: {b['params']:,} -> {a['params']:,} parameters; hidden {b['hidden']}->"
          f"{a['hidden']}, ffn {b['ffn']}->{a['ffn']}, heads {b['heads']}->{a['heads']}, layers {b['layers']}->"
          f"{a['layers']}; calibration loss {b['calib_loss']:.3f} -> {a['calib_loss']:.3f}")
    return 0
