"""``model.family: llama`` — decoder-only causal LMs built from Hugging Face's ``LlamaForCausalLM``
(re-housed for parallelism, see :mod:`bigtrain.models.causal_lm`), trained by next-token
prediction on token shards, evaluated by held-out loss and perplexity, exported to HF format."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from bigtrain.config.core import ConfigError
from bigtrain.config.registry import Family, lazy
from bigtrain.families.llama.config import PRESETS, LlamaModelConfig
from bigtrain.families.llama.pretrained import hf_config, pretrained, read_hf_config

if TYPE_CHECKING:  # torch, transformers and the data code load when a run uses them, not for a config
    from torch import nn

    from bigtrain.config import Config
    from bigtrain.eval.causal_lm import CausalLMEvaluator
    from bigtrain.eval.context import EvalContext
    from bigtrain.models.causal_lm import CausalLM
    from bigtrain.tasks.distill import DistillLMTask
    from data_pipeline import SplitInfo
    from data_pipeline.loader import TokenBatchDataset


def build(m: LlamaModelConfig) -> CausalLM:
    from bigtrain.models.causal_lm import CausalLM

    return CausalLM(hf_config(m))


def validate(cfg: Config) -> None:
    from bigtrain.optional import require

    require("transformers", "model.family=llama (its layers are transformers' Llama/Mistral/Qwen2 modules)")
    if cfg.data.tokenizer != "bytes":
        require("tokenizers", f"data.tokenizer={cfg.data.tokenizer}")
    m = cfg.model
    m.vocab_size = m.vocab_size or 257  # bytes + end-of-text: the stdlib_text tokenizer
    missing = [k for k in ("width", "depth", "num_heads", "mlp_dim") if not getattr(m, k)]
    if missing:
        raise ConfigError(f"model.variant={m.variant} needs {', '.join('model.' + k for k in missing)} set")
    if cfg.data.tokenizer == "bpe" and m.vocab_size <= 257:
        raise ConfigError("data.tokenizer=bpe trains model.vocab_size tokens: set model.vocab_size above 257 "
                          "(the bytes + end-of-text)")
    if cfg.data.tokenizer not in ("bytes", "bpe", "model") and not os.path.exists(cfg.data.tokenizer):
        raise ConfigError(f"config key 'data.tokenizer': {cfg.data.tokenizer} does not exist (a tokenizer.json or a "
                          "directory holding one; or 'bytes' / 'bpe')")
    if m.pretrained:
        _check_source(m, "model", m.seq_len, _splits(cfg) + (["parallel.zero >= 2 (FSDP)"] if cfg.parallel.zero >= 2 else []))
    if cfg.teacher.family == "llama":
        _check_teacher(cfg)
    explicit_head_dim = bool(m.pretrained and read_hf_config(m.pretrained).get("head_dim"))
    if m.width % m.num_heads and not explicit_head_dim:  # an explicit head_dim (pruned models) frees the width
        raise ConfigError(f"config key 'model.width' ({m.width}) is not divisible by model.num_heads ({m.num_heads})")
    if m.num_kv_heads and m.num_heads % m.num_kv_heads:
        raise ConfigError(f"config key 'model.num_kv_heads' ({m.num_kv_heads}) must divide model.num_heads ({m.num_heads})")


def _splits(cfg: Config) -> list[str]:
    """The layout settings that split a model's tensors apart (FSDP aside)."""
    return [f"{k} > 1" for k, v in (("parallel.tp", cfg.parallel.tp), ("parallel.pp", cfg.parallel.pp)) if v > 1]


def _check_source(section: Any, key: str, seq_len: int, split: list[str]) -> None:
    """A pretrained source fits the layout: tied embeddings survive only unsplit layouts, and a
    sliding window shorter than the sequence would be ignored by training."""
    hf = read_hf_config(section.pretrained, f"{key}.pretrained")
    if hf.get("tie_word_embeddings") and split:
        raise ConfigError(f"{key}.pretrained={section.pretrained} ties its input and output embeddings, which "
                          f"{' and '.join(split)} would split apart: use data parallel with parallel.zero 0 or 1"
                          + (" and distill.shard_teacher=false" if key == "teacher" else ""))
    if hf.get("sliding_window") and hf.get("use_sliding_window", True) and hf["sliding_window"] < seq_len:
        raise ConfigError(f"config key 'model.seq_len' ({seq_len}) exceeds the sliding window "
                          f"({hf['sliding_window']}) of {section.pretrained}, which training does not apply")


def _check_teacher(cfg: Config) -> None:
    """A llama teacher: trained weights, the student's vocabulary, the student's sequence length."""
    t, m, d = cfg.teacher, cfg.model, cfg.distill
    if not t.pretrained:
        raise ConfigError("config key 'teacher.pretrained' must name the teacher's weights (a Hugging Face directory "
                          "or a bigtrain checkpoint): a randomly initialised teacher teaches nothing")
    t.seq_len = m.seq_len  # the teacher reads the student's batches
    if t.vocab_size != m.vocab_size:
        raise ConfigError(f"the teacher's vocabulary ({t.vocab_size}, teacher.pretrained={t.pretrained}) differs "
                          f"from the student's (model.vocab_size={m.vocab_size}): distillation compares them token by token")
    _check_source(t, "teacher", m.seq_len, _splits(cfg) + (["distill.shard_teacher (FSDP)"] if d.shard_teacher else []))
    if d.hidden_weight > 0 and cfg.parallel.tp > 1 and cfg.parallel.sequence_parallel:
        raise ConfigError("distill.hidden_weight > 0 compares whole hidden states, which sequence parallelism splits "
                          "across tensor-parallel ranks: set parallel.sequence_parallel=false (or distill.hidden_weight=0)")
    if d.hidden_weight > 0 and t.width != m.width:
        raise ConfigError(f"distill.hidden_weight > 0 needs the teacher's width ({t.width}) to equal the student's "
                          f"(model.width={m.width}): the hidden-state loss is for depth-pruned students")
    if d.hidden_layers and (len(d.hidden_layers) != m.depth or max(d.hidden_layers) >= t.depth):
        raise ConfigError(f"config key 'distill.hidden_layers' needs one teacher block (0..{t.depth - 1}) for each of "
                          f"the student's {m.depth} blocks, got {d.hidden_layers}")


def causal_lm_task(cfg: Config, model: nn.Module) -> nn.Module:
    from bigtrain.tasks import CausalLMTask

    return CausalLMTask(model)


def distill_task(cfg: Config, model: nn.Module, teacher: nn.Module) -> DistillLMTask:
    from bigtrain.tasks.distill import DistillLMTask

    d = cfg.distill
    return DistillLMTask(model, teacher, d.temperature, d.kd_weight, d.ce_weight, d.hidden_weight, d.hidden_layers)


distill_task.uses_teacher = True  # type: ignore[attr-defined]


def write_stdlib_text(cfg: Config, root: str) -> None:
    """``data.source: stdlib_text``: token sequences of CPython's standard library sources, with the
    tokenizer ``data.tokenizer`` names."""
    from data_pipeline.text import BYTES, load_tokenizer, stdlib_files, train_bpe, write_text_shards

    spec = cfg.data.tokenizer
    if spec == "model" and not (cfg.model.pretrained and os.path.isfile(os.path.join(cfg.model.pretrained, "tokenizer.json"))):
        raise ConfigError(f"data.tokenizer=model writes {cfg.data.dir} with model.pretrained's tokenizer.json: set "
                          "model.pretrained to a directory that has one (or choose data.tokenizer=bytes/bpe/PATH)")
    files = stdlib_files(cfg.data.text_max_bytes)
    tok = BYTES if spec == "bytes" else train_bpe(files, cfg.model.vocab_size) if spec == "bpe" \
        else load_tokenizer(cfg.model.pretrained if spec == "model" else spec)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer={spec} has {tok.vocab_size} tokens, more than model.vocab_size="
                          f"{cfg.model.vocab_size}")
    write_text_shards(root, seq_len=cfg.model.seq_len, samples_per_shard=cfg.data.samples_per_shard, files=files,
                      tokenizer=tok, val_by=cfg.data.text_val_split)


def check_split_vocabulary(cfg: Config, split: SplitInfo, name: str) -> None:
    """A token set written by bigtrain records its tokenizer's vocabulary: one larger than the model's
    would make samples bad one by one (the eval split's only at the first evaluation); refused now."""
    entry = split.meta  # the index entry (of data.dir's split, or the one beside a shard spec's shards)
    vocab = entry.get("vocab_size")
    if isinstance(vocab, int) and vocab > cfg.model.vocab_size:
        raise ConfigError(f"data.dir={split.root}: split '{name}' was tokenized with {vocab} tokens "
                          f"({entry.get('tokenizer', '?')}), more than model.vocab_size={cfg.model.vocab_size}")


def train_data(cfg: Config, split: SplitInfo) -> TokenBatchDataset:
    from data_pipeline.loader import TokenBatchDataset

    check_split_vocabulary(cfg, split, cfg.data.train_split)
    order = split.order(cfg.train.seed, cfg.data.shuffle_window)
    return TokenBatchDataset(split, order, cfg.model.seq_len, cfg.model.vocab_size, cfg.train.seed, cfg.data.on_error,
                             cfg.data.max_member_bytes)


def evaluator(cfg: Config, train: SplitInfo, evals: SplitInfo, ctx: EvalContext) -> CausalLMEvaluator:
    from bigtrain.eval.causal_lm import CausalLMEvaluator

    check_split_vocabulary(cfg, evals, cfg.data.eval_split)
    return CausalLMEvaluator(evals, cfg.model.seq_len, cfg.model.vocab_size, cfg.eval.batch_size, autocast=ctx.autocast,
                             max_member_bytes=cfg.data.max_member_bytes, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size,
                             dp_group=ctx.dp_group, device=ctx.device)


def flops_per_sample(model: nn.Module, m: Any) -> float:
    return float(model.train_flops_per_token(m.seq_len) * m.seq_len)


def export_hf(model: nn.Module, out: str) -> None:
    model.to_hf().save_pretrained(out, safe_serialization=True)


def token_batch(m: Any, batch_size: int, generator: Any) -> dict[str, Any]:
    import torch

    return {"tokens": torch.randint(0, m.vocab_size, (batch_size, m.seq_len + 1), generator=generator),
            "weight": torch.ones(batch_size)}


FAMILY = Family(
    name="llama",
    description="decoder-only causal LM from Hugging Face's LlamaForCausalLM (GQA, SwiGLU, RoPE), next-token prediction",
    config=LlamaModelConfig,
    build=build,
    tasks={"causal_lm": causal_lm_task, "distill": distill_task},
    train_data=train_data,
    evaluator=evaluator,
    flops_per_sample=flops_per_sample,
    data_sources={"stdlib_text": write_stdlib_text},
    presets=PRESETS,
    debug_overrides=("model.variant=debug", "model.seq_len=64", "data.dir=data/stdlib_seq64", "data.text_max_bytes=300000",
                     "data.eval_split=val", "train.global_batch_size=16", "eval.batch_size=64"),
    parallelize=lazy("bigtrain.families.llama.parallelize:parallelize_lm"),
    check_layout=lazy("bigtrain.families.llama.parallelize:check_layout"),
    pipeline=True,
    validate=validate,
    export_hf=export_hf,
    sample_unit=lambda m: ("tokens", m.seq_len),
    example_batch=token_batch,
    pretrained=pretrained,
    commands={"prune": lazy("bigtrain.families.llama.prune_cli:main")},
    benchmarks={"minitron": lazy("bigtrain.families.llama.minitron_bench:main")},
)
