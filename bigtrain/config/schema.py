"""The config schema: every key a run accepts, its type, default and meaning.

``bigtrain config describe`` prints this table; ``configs/*.yaml`` files and
``key=value`` overrides are validated against it before any work starts.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Literal

from bigtrain.config.batching import plan_batches
from bigtrain.config.core import ConfigError, all_keys, doc


@dataclass
class RunConfig:
    dir: str = doc("runs/default", "Output directory: config.yaml, metrics.jsonl, checkpoints/ go here.")
    name: str = doc("", "Human-readable run name (wandb run name); defaults to the basename of run.dir.")


@dataclass
class TrainConfig:
    steps: int = doc(1000, "Number of optimizer steps.", gt=0)
    seed: int = doc(0, "Seed for model init, data order, augmentation and dropout.")
    global_batch_size: int = doc(128, "Samples per optimizer step, summed over all data-parallel ranks.", gt=0)
    micro_batch_size: int = doc(
        0,
        "Samples per forward/backward on one rank; global_batch_size / (dp * micro_batch_size) "
        "micro-steps are accumulated. 0 = no accumulation.",
        ge=0,
    )
    dtype: Literal["float32", "bfloat16"] = doc("float32", "Compute dtype (autocast); master weights stay fp32.")
    num_threads: int = doc(0, "torch intra-op threads per process; 0 keeps torch's default.", ge=0)
    tf32: bool = doc(True, "CUDA: allow TF32 tensor cores for fp32 matmuls and convolutions (no effect on CPU).")
    max_minutes: float = doc(
        0.0, "Stop once this wall time is used: save a checkpoint and exit with code 75 (requeue); 0 = no limit.", ge=0
    )
    preempt_signals: list[str] = doc(
        ["SIGTERM", "SIGUSR1", "SIGUSR2"],
        "Signals that mean 'preempted': finish the current step, save, exit with code 75 (requeue).",
    )
    max_bad_steps: int = doc(
        5, "Non-finite loss/grad-norm steps are skipped; after this many in a row, roll back to the last "
        "checkpoint. 0 = never roll back.", ge=0,
    )
    spike_factor: float = doc(
        0.0, "Roll back when the loss exceeds this factor x the mean of the last train.spike_window losses; 0 = off.",
        ge=0,
    )
    spike_window: int = doc(50, "Accepted steps in the running loss mean used by train.spike_factor.", gt=0)
    max_rollbacks: int = doc(3, "Give up (exit 3, training diverged) after this many rollbacks in one process.", ge=0)
    rollback_skip_data: bool = doc(
        True, "After a rollback, skip the samples of the offending step(s) when the stream reaches them again."
    )


@dataclass
class DataConfig:
    dir: str = doc("data/digits", "Dataset root holding webdataset shards (written here when missing and source allows).")
    source: Literal["digits", "stdlib_text", "none"] = doc(
        "digits",
        "What to write into data.dir if it has no shards: 'digits' (embedded sklearn digits), 'stdlib_text' "
        "(byte-level token sequences of CPython's standard library sources) or 'none' (error).",
    )
    text_max_bytes: int = doc(2_000_000, "stdlib_text: bytes of source text to tokenize.", gt=0)
    train_split: str = doc("train", "Split name (shard prefix) used for training.")
    eval_split: str = doc("test", "Split name (shard prefix) used for evaluation.")
    image_size: int = doc(32, "Images are resized to this square size.", gt=0)
    channels: Literal[1, 3] = doc(1, "1 = grayscale, 3 = RGB.")
    mean: list[float] = doc([0.5], "Per-channel normalisation mean (one value broadcasts).")
    std: list[float] = doc([0.5], "Per-channel normalisation std (one value broadcasts).", gt=0)
    augment: Literal["none", "crop", "crop_flip"] = doc("crop", "Training augmentation: random crop after padding, optional flip.")
    crop_padding: int = doc(2, "Pixels of padding before the random crop.", ge=0)
    shuffle_window: int = doc(
        4, "Samples are shuffled within windows of this many consecutive shards (after shuffling shard order).", gt=0
    )
    num_workers: int = doc(0, "DataLoader worker processes per rank.", ge=0)
    on_error: Literal["skip", "raise"] = doc("skip", "Corrupt/undecodable samples: count and skip, or stop with an error.")
    max_error_fraction: float = doc(
        0.05, "With on_error=skip, stop if more than this fraction of samples read were bad.", ge=0, le=1
    )
    error_budget_min_samples: int = doc(
        1000, "Judge data.max_error_fraction only once a rank has read this many samples (early batches are small evidence).",
        ge=0,
    )
    samples_per_shard: int = doc(256, "Shard size used when writing the embedded data set.", gt=0)
    max_member_bytes: int = doc(
        16 * 2**20, "Largest tar member the reader accepts (bytes); a larger one is a bad sample (counted, skipped "
        "or raised per data.on_error), so a crafted shard cannot make a worker read gigabytes. 0 = no cap.", ge=0,
    )


@dataclass
class ModelConfig:
    name: Literal["vit", "llama"] = doc("vit", "Model family: ViT, or a decoder-only LM built from HF LlamaForCausalLM.")
    variant: str = doc("Ti", "Size from 'Scaling Vision Transformers' (Ti,S,M,B,L,H,g,G) or 'custom'.")
    width: int = doc(0, "Hidden size; 0 = from variant.", ge=0)
    depth: int = doc(0, "Number of blocks; 0 = from variant.", ge=0)
    mlp_dim: int = doc(0, "MLP hidden size; 0 = from variant.", ge=0)
    num_heads: int = doc(0, "Attention heads; 0 = from variant.", ge=0)
    num_kv_heads: int = doc(0, "llama: key/value heads (grouped-query attention); 0 = num_heads.", ge=0)
    vocab_size: int = doc(257, "llama: vocabulary size (257 = bytes + end-of-text, the stdlib_text tokenizer).", gt=0)
    seq_len: int = doc(128, "llama: tokens per training sequence.", gt=0)
    patch_size: int = doc(4, "Square patch size in pixels.", gt=0)
    image_size: int = doc(32, "Input resolution (must equal data.image_size).", gt=0)
    in_channels: int = doc(1, "Input channels (must equal data.channels).")
    num_classes: int = doc(10, "Classifier outputs.", gt=0)
    head: Literal["cls", "gap", "map"] = doc("map", "Pooling: class token, global average pool, or multihead attention pooling.")
    posemb: Literal["learned", "sincos2d"] = doc("learned", "Position embedding type.")
    dropout: float = doc(0.0, "Dropout on attention output, MLP output and before the classifier.", ge=0, le=0.99)
    head_zero_init: bool = doc(True, "Zero-init the classifier (big_vision default).")


@dataclass
class OptimConfig:
    name: str = doc("adamw", "Optimizer, by its registered name (built in: adamw, sgd; see bigtrain.optim.register_optimizer).")
    lr: float = doc(1e-3, "Peak learning rate.", ge=0)
    beta1: float = doc(0.9, "Adam beta1 / SGD momentum.")
    beta2: float = doc(0.999, "Adam beta2.")
    eps: float = doc(1e-8, "Adam epsilon.", gt=0)
    weight_decay: float = doc(1e-4, "Decoupled weight decay of body weights (not norms/biases/position embeddings).")
    head_weight_decay: float = doc(
        -1.0, "Decoupled weight decay of the classifier head (paper: much larger than body); -1 = same as weight_decay."
    )
    head_lr_mult: float = doc(1.0, "Learning-rate multiplier of the classifier head.", ge=0)
    grad_clip_norm: float = doc(1.0, "Clip global gradient norm to this value; 0 = no clipping.", ge=0)


@dataclass
class ScheduleConfig:
    warmup_steps: int = doc(0, "Linear warmup from 0 to optim.lr over this many steps.", ge=0)
    decay: Literal["constant", "cosine", "linear", "rsqrt"] = doc("cosine", "Shape after warmup.")
    rsqrt_timescale: int = doc(10000, "rsqrt decay: lr * 1/sqrt(1 + (step - warmup) / timescale).", gt=0)
    cooldown_steps: int = doc(0, "Linear cooldown to zero over the last N steps (multiplies the decay shape).", ge=0)
    final_lr_ratio: float = doc(0.0, "cosine/linear: end value as a fraction of optim.lr.", ge=0)


@dataclass
class EvalConfig:
    every_steps: int = doc(0, "Evaluate every N steps; 0 = only at the end of training.", ge=0)
    batch_size: int = doc(256, "Evaluation batch size (per rank).", gt=0)
    fewshot: bool = doc(True, "Run few-shot linear probes on frozen pre-logit features.")
    fewshot_shots: list[int] = doc([1, 5, 10], "Shots per class for the few-shot probes.", gt=0)
    fewshot_seeds: int = doc(3, "Random draws of the shot set per shot count (results averaged).", gt=0)
    fewshot_l2: list[float] = doc(
        [2.0**k for k in range(-10, 11, 2)], "Ridge regularisation grid (picked on held-out train samples).", gt=0
    )
    fewshot_max_train: int = doc(5000, "Cap on train-split samples whose features are extracted for the probes.", gt=0)


@dataclass
class CheckpointConfig:
    every_steps: int = doc(0, "Save every N steps; 0 = only at the end.", ge=0)
    keep_last: int = doc(3, "Keep this many most recent checkpoints (older complete ones are deleted); 0 = keep all.", ge=0)
    keep_every: int = doc(0, "Also keep every checkpoint whose step is a multiple of this; 0 = none.", ge=0)
    keep_aside: int = doc(
        4, "Checkpoints moved to run.dir/checkpoints-aside (failed verification, abandoned branch, replaced) that are "
        "kept; older ones there are deleted. 0 = keep all.", ge=0,
    )
    save_final: bool = doc(True, "Save a checkpoint after the last step.")
    every_minutes: float = doc(0.0, "Also save when this many minutes passed since the last save; 0 = off.", ge=0)
    write_threads: int = doc(2, "Threads (and files) each rank writes a checkpoint with.", gt=0)
    async_save: bool = doc(
        False, "Write checkpoints in a background thread: training resumes once the state is copied to memory; "
        "the checkpoint is committed (marker + rename) after every rank finished writing."
    )


@dataclass
class EMAConfig:
    decay: float = doc(
        0.0, "Keep an exponential moving average of the weights with this decay (e.g. 0.9999; checkpoint key "
        "'ema'); 0 = off.", ge=0, le=0.999999,
    )
    eval: bool = doc(True, "Evaluate with the EMA weights (swapped in for the evaluation) instead of the raw ones.")


@dataclass
class LogConfig:
    every_steps: int = doc(10, "Write a training record to metrics.jsonl every N steps.", gt=0)
    progress: Literal["auto", "on", "off"] = doc("auto", "Progress bar: auto = only when stderr is a terminal.")
    wandb: bool = doc(False, "Also log to Weights & Biases (set WANDB_MODE=offline to log locally).")
    wandb_project: str = doc("bigtrain", "wandb project name.")


@dataclass
class ParallelConfig:
    dp: int = doc(0, "Data-parallel degree; 0 = inferred from the world size (see README: degrees).", ge=0)
    tp: int = doc(0, "Tensor-parallel degree; 0 = inferred (1 unless it is the only unset degree).", ge=0)
    pp: int = doc(0, "Pipeline-parallel degree; 0 = inferred (1 unless it is the only unset degree).", ge=0)
    zero: Literal[0, 1, 2, 3] = doc(
        0, "0 replicated (DDP-like), 1 optimizer state sharded, 2 + gradients sharded, 3 + parameters sharded."
    )
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zbv"] = doc("1f1b", "Pipeline schedule.")
    pp_stages_per_rank: int = doc(0, "Model chunks per pipeline rank; 0 = 1 (gpipe/1f1b) or 2 (interleaved_1f1b/zbv).", ge=0)
    pp_split: list[int] = doc([], "First block of each pipeline stage after the first (e.g. [3] for 2 stages); [] = balanced.", gt=0)
    microbatches: int = doc(
        0, "Pipeline micro-batches per step on each data-parallel rank; 0 = per-rank batch / train.micro_batch_size.", ge=0
    )
    sequence_parallel: bool = doc(True, "With tp > 1, also shard norms/dropout along the sequence (Megatron SP).")
    activation_checkpointing: Literal["none", "full", "selective"] = doc(
        "none", "Recompute block activations in backward: all blocks, or every parallel.ac_every-th block."
    )
    ac_every: int = doc(2, "With activation_checkpointing=selective, checkpoint every k-th block.", gt=0)
    compile: bool = doc(
        False, "torch.compile each block (after TP/SP and checkpointing, before FSDP); identical blocks share one "
        "compiled graph. The first steps are slower while it compiles (tens of seconds on CPU)."
    )
    device: Literal["auto", "cpu", "cuda"] = doc(
        "auto", "Where this process trains: auto = cuda:LOCAL_RANK when CUDA is available, else cpu."
    )
    backend: Literal["auto", "gloo", "nccl"] = doc("auto", "Process-group backend; auto = nccl on CUDA devices, else gloo.")
    timeout_s: int = doc(600, "Collective timeout: a dead rank makes the others fail after this, not hang.", gt=0)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "Run output."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Training loop."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Model."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer."})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "LR schedule."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation."})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "Checkpoints."})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "Logging."})
    ema: EMAConfig = field(default_factory=EMAConfig, metadata={"help": "EMA of the weights (a training component)."})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"help": "Parallel layout."})
    task: Literal["classification", "causal_lm"] = doc("classification", "Training objective (must suit model.name).")
    resume: str = doc(
        "auto", "'auto' = newest checkpoint of this run's current branch that verifies (damaged ones are moved "
        "aside, the next older is used), 'never' = start over (existing checkpoints are moved aside), or a checkpoint "
        "path (must verify and fit this run; if it is not the newest, a new branch starts from it).",
    )
    resume_allow_changes: list[str] = doc(
        [], "Config keys allowed to differ from the checkpoint's config on resume (e.g. [train.steps] to train "
        "longer). Without them, a resume that changes the model, task, global batch size, seed, optimizer or "
        "schedule is refused.",
    )
    init: str = doc(
        "", "Load model weights only (no optimizer, step or data position) from this checkpoint into a new run; "
        "used only when there is nothing to resume. Tensors of different shape are refused; tensors only one side "
        "has are logged. '' = off.",
    )

    def validate(self) -> None:
        """Cross-field checks that need more than one section (single-key bounds live in the schema)."""
        m = self.model
        plan_batches(self)  # the one place batch divisibility is checked (dp = pp = 1 here)
        expected_task = {"vit": "classification", "llama": "causal_lm"}[m.name]
        if self.task != expected_task:
            raise ConfigError(f"config key 'task' ({self.task}) does not suit model.name={m.name}; use task={expected_task}")
        if m.name == "vit":
            self._validate_vit()
        self._validate_rest()

    def _validate_vit(self) -> None:
        m, d = self.model, self.data
        if m.image_size != d.image_size:
            raise ConfigError(f"config key 'model.image_size' ({m.image_size}) must equal 'data.image_size' ({d.image_size})")
        if m.in_channels != d.channels:
            raise ConfigError(f"config key 'model.in_channels' ({m.in_channels}) must equal 'data.channels' ({d.channels})")
        if m.image_size % m.patch_size:
            raise ConfigError(f"config key 'model.patch_size' ({m.patch_size}) must divide model.image_size ({m.image_size})")
        for key in ("mean", "std"):
            vals = getattr(d, key)
            if len(vals) not in (1, d.channels):
                raise ConfigError(f"config key 'data.{key}' needs 1 or {d.channels} values, got {len(vals)}")

    def _validate_rest(self) -> None:
        t, s = self.train, self.schedule
        if s.warmup_steps + s.cooldown_steps > t.steps:
            raise ConfigError(
                f"config keys 'schedule.warmup_steps' + 'schedule.cooldown_steps' "
                f"({s.warmup_steps}+{s.cooldown_steps}) exceed 'train.steps' ({t.steps})"
            )
        for name in t.preempt_signals:
            if not name.startswith("SIG") or not hasattr(signal, name):
                raise ConfigError(f"config key 'train.preempt_signals': {name!r} is not a signal name (e.g. SIGUSR1)")
        if self.resume == "":
            raise ConfigError("config key 'resume' must be 'auto', 'never' or a checkpoint path")
        valid = set(all_keys(Config))
        for key in self.resume_allow_changes:
            if key not in valid:
                raise ConfigError(f"config key 'resume_allow_changes': {key!r} is not a config key")
