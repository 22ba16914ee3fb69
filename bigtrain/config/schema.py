"""The config schema: every key a run accepts, its type, default and meaning.

``bigtrain config describe`` prints this table; ``configs/*.yaml`` files and
``key=value`` overrides are validated against it before any work starts.
"""

from __future__ import annotations

import difflib
import re
import signal
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from bigtrain.config.batching import plan_batches
from bigtrain.config.core import ConfigError, all_keys, doc
from bigtrain.config.registry import ModelConfig


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
    memory_check: bool = doc(
        True, "Before allocating, estimate the memory per rank (`bigtrain estimate`) and refuse the run (exit 2) when "
        "it exceeds the device's (GPU memory; on CPU, host RAM / the ranks on the node). false = try anyway.")
    host_memory_release: Literal["auto", "on", "off"] = doc(
        "auto", "Fix glibc's mmap threshold at 4 MiB so freed large temporaries leave RSS (docs/memory.md): less "
        "host memory, but slower steps for small models (page faults: +31% step time on the default job). auto = on "
        "for CPU runs whose estimate exceeds half of the memory per rank.")
    tf32: bool = doc(True, "CUDA: allow TF32 tensor cores for fp32 matmuls and convolutions (no effect on CPU).")
    max_minutes: float = doc(
        0.0, "Stop once this wall time is used: save a checkpoint and exit with code 75 (requeue); 0 = no limit.", ge=0
    )
    deadline: float = doc(
        0.0, "Unix time (s) by which this run must have saved and stopped (exit 75, requeue): it stops once the next "
        "step plus a save (both measured as it runs) would pass it. 0 = none. The Slurm launchers (slurm/*.sh) set "
        "it from the job's end time.", ge=0,
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
class DataSource:
    spec: str = doc("", "The source's shards: a spec as data.train takes (brace patterns, '::').")
    weight: float = doc(1.0, "Its share of the training stream (weights are normalised over the sources).", gt=0)


@dataclass
class DataConfig:
    dir: str = doc("data/digits", "Dataset root holding webdataset shards (written here when missing and source allows).")
    source: str = doc(
        "", "What to write into data.dir if it has no shards: one of the model family's data sources (built in: "
        "'digits', embedded sklearn digits, for vit; 'stdlib_text', byte-level token sequences of CPython's "
        "standard library, for llama), '' = the family's first, or 'none' (error).",
    )
    text_max_bytes: int = doc(2_000_000, "stdlib_text: bytes of source text to tokenize.", gt=0)
    text_val_split: Literal["sequence", "file"] = doc(
        "sequence", "stdlib_text: which sequences are held out (5%): every 20th sequence, or whole files (chosen by a "
        "hash of their file name), so no validation text has a near-copy in training.")
    tokenizer: str = doc(
        "bytes", "stdlib_text: 'bytes' (256 byte values + end-of-text), 'bpe' (a byte-level BPE of model.vocab_size "
        "tokens trained on the corpus with the tokenizers package, saved as data.dir/tokenizer.json), 'model' "
        "(model.pretrained's tokenizer.json), or the path of a tokenizer.json or of a directory holding one. Ids over 65,535 are stored as "
        "32-bit tokens.")
    train_split: str = doc("train", "Split name (shard prefix) used for training.")
    eval_split: str = doc("test", "Split name (shard prefix) used for evaluation.")
    train: str = doc(
        "", "Training shards named by a webdataset spec instead of data.dir + data.train_split: brace patterns "
        "('/data/digits-{000000..000009}.tar'), several joined with '::', or shard paths joined so; local paths. "
        "Counts come from an index.json beside the shards, else one header scan, stored for the next run. "
        "'' = data.dir.")
    eval: str = doc("", "Evaluation shards as a spec (see data.train); '' = data.dir + data.eval_split.")
    sources: list[DataSource] = doc(
        [], "Training shards as a weighted mixture instead of data.train: [{spec: ..., weight: 0.75}, {spec: ..., "
        "weight: 0.25}]. Every step draws each source's share to within a sample, the same for any layout; a "
        "source repeats over its own epochs.")
    cache_dir: str = doc(
        "", "Where shard counts of data.train/data.eval go when the shards' directory is not writable; "
        "'' = $XDG_CACHE_HOME/bigtrain (~/.cache/bigtrain).")
    image_size: int = doc(32, "Images are resized to this square size.", gt=0)
    channels: Literal[1, 3] = doc(1, "1 = grayscale, 3 = RGB.")
    mean: list[float] = doc([0.5], "Per-channel normalisation mean (one value broadcasts).")
    std: list[float] = doc([0.5], "Per-channel normalisation std (one value broadcasts).", gt=0)
    augment: Literal["none", "crop", "crop_flip"] = doc("crop", "Training augmentation: random crop after padding, optional flip.")
    crop_padding: int = doc(2, "Pixels of padding before the random crop.", ge=0)
    shuffle_window: int = doc(
        4, "Samples are shuffled within windows of this many consecutive shards (after shuffling shard order).", gt=0
    )
    num_workers: int = doc(-1, "DataLoader worker processes per rank; -1 = auto: on a GPU the node's cores per rank "
                           "minus one (at most 8), so decoding overlaps the device's work; on the CPU 0 (the rank's "
                           "cores do the math).", ge=-1)
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

    def validate(self) -> None:
        if self.sources and self.train:
            raise ConfigError("config keys 'data.train' and 'data.sources' both name the training shards: set one")
        for i, source in enumerate(self.sources):
            if not source.spec:
                raise ConfigError(f"config key 'data.sources[{i}].spec' is empty: name the source's shards")


def _model_section(default_family: str) -> Any:
    """``resolve(data, key)`` for a model section: the family named in it gives the schema."""

    def resolve(data: dict[str, Any], key: str) -> tuple[type, dict[str, Any]]:
        if "name" in data:
            raise ConfigError(f"config key '{key}.name' is no longer read: the model family is named by "
                              f"'{key}.family' (e.g. {key}.family: vit); rename the key")
        ref = data.get("family", default_family)
        if not isinstance(ref, str):
            raise ConfigError(f"config key '{key}.family': expected a family name, got {ref!r}")
        data = {**data, "family": ref}
        if ref == "":
            section: type = ModelConfig  # no model (an unused teacher)
        else:
            from bigtrain.config.registry import get_family

            section = get_family(ref, f"{key}.family").config
        valid = {f.name for f in fields(section)}
        unknown = sorted(set(data) - valid)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(valid), n=1, cutoff=0.75)
            hint = f" (did you mean '{key}.{close[0]}'?)" if close else ""
            raise ConfigError(
                f"config key '{key}.{unknown[0]}' is not a key of {key}.family={ref or None}{hint}; valid keys: "
                + ", ".join(f"{key}.{n}" for n in sorted(valid)))
        return section, data

    return resolve


@dataclass
class OptimConfig:
    name: str = doc("adamw", "Optimizer, by its registered name (built in: adamw, adamw8bit, factored, sgd; see bigtrain.optim.register_optimizer).")
    lr: float = doc(1e-3, "Peak learning rate.", ge=0)
    beta1: float = doc(0.9, "Adam beta1 / SGD momentum (factored: its momentum's EMA rate).", ge=0, lt=1)
    beta2: float = doc(0.999, "Adam beta2.", ge=0, lt=1)
    eps: float = doc(1e-8, "Adam epsilon.", gt=0)
    weight_decay: float = doc(
        1e-4, "Weight decay of body weights (not norms/biases/position embeddings). adamw/adamw8bit: decoupled, "
        "relative to the LR (p *= 1 - lr_t * wd, torch's convention); sgd: L2, added to the gradient (torch's SGD); factored: absolute, scaled by the schedule only "
        "(p *= 1 - s_t * wd, s_t = lr_t / optim.lr; big_vision's convention: ViT-G uses 0.03 * lr).", ge=0)
    head_weight_decay: float = doc(
        -1.0, "Decoupled weight decay of the classifier head (paper: much larger than body), in the optimizer's "
        "convention above; -1 = same as weight_decay. Ignored when optim.wd_mults is set."
    )
    wd_mults: list[str] = doc(
        [], "factored: big_vision's per-parameter weight decay, 'REGEX=MULT' (first match on the parameter name; "
        "a parameter matching none gets no decay), e.g. ['head\\..*weight=100', '.*weight=1']; decay = "
        "optim.weight_decay x MULT. [] = the groups above.")
    momentum_dtype: Literal["bfloat16", "float32"] = doc("bfloat16", "factored: storage dtype of the momentum.")
    momentum_decay: Literal["momentum_dtype", "float32"] = doc(
        "momentum_dtype", "factored: arithmetic of beta1 * m. momentum_dtype = big_vision's (JAX rounds beta1 and the "
        "product to the bf16 state's dtype: 0.9 acts as 0.8984375); float32 = exact beta1 in fp32.")
    min_dim_size_to_factor: int = doc(
        32, "factored: factor the second moment of tensors whose second-largest dim is at least this.", gt=0)
    beta2_cap: float = doc(0.999, "factored: beta2(t) = min(beta2_cap, 1 - t^-beta2_decay_rate).", gt=0, le=1)
    beta2_decay_rate: float = doc(0.8, "factored: see optim.beta2_cap.", gt=0)
    update_clip: float = doc(0.0, "factored: divide each update by max(1, RMS(update) / this); 0 = off.", ge=0)
    head_lr_mult: float = doc(1.0, "Learning-rate multiplier of the classifier head.", ge=0)
    grad_clip_norm: float = doc(1.0, "Clip global gradient norm to this value; 0 = no clipping.", ge=0)


def parse_wd_mults(rules: list[str]) -> list[tuple[re.Pattern[str], float]]:
    """``optim.wd_mults`` as (compiled pattern, multiplier) pairs, in order (first match wins)."""
    parsed = []
    for rule in rules:
        pattern, sep, mult = rule.rpartition("=")
        try:
            parsed.append((re.compile(pattern), float(mult)))
        except (re.error, ValueError):
            sep = ""
        if not sep:
            raise ConfigError(f"config key 'optim.wd_mults': {rule!r} is not 'REGEX=MULT' (e.g. 'head\\..*weight=100')")
    return parsed


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
    final: bool = doc(True, "Evaluate at the end of training (false: e.g. benchmarks, or a separate `bigtrain eval`).")
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
    warmup_power: float = doc(
        0.0, "Warm the decay up (diffusers' EMAModel): after n updates it is min(ema.decay, 1 - (1 + n)^-power), so "
        "the first update copies the weights; 2/3 reaches 0.999 after ~31.6k updates, 3/4 after 10k. 0 = the fixed "
        "decay from the first step (with 0.9999 an EMA is dominated by the initialisation for ~10k steps).", ge=0)


@dataclass
class DistillConfig:
    """Knowledge distillation from the ``teacher`` section into the model (tasks that use a teacher)."""

    temperature: float = doc(1.0, "Softmax temperature tau of teacher and student in the KD term, which is scaled "
                             "by tau^2 so its gradients keep their size across temperatures.", gt=0)
    kd_weight: float = doc(1.0, "Weight of the forward KL(teacher || student), summed over the vocabulary (classes) "
                           "and averaged over tokens (samples).", ge=0)
    ce_weight: float = doc(0.0, "Weight of the cross-entropy on the data's own targets (Minitron retrains with KD "
                           "only: 0).", ge=0)
    hidden_weight: float = doc(0.0, "Weight of the hidden-state loss: per token, the squared distance between each "
                               "student block's output and its teacher block's over the teacher's squared norm (needs "
                               "equal widths: depth-pruned students).", ge=0)
    hidden_layers: list[int] = doc([], "For each student block, the teacher block whose output it matches "
                                   "(prune_report.json lists the kept layers); [] = evenly spaced, last to last.", ge=0)
    shard_teacher: bool = doc(True, "FSDP-shard the teacher over the data-parallel ranks (gathered block by block "
                              "for each forward, like ZeRO-3); false = a full replica per data-parallel rank (no "
                              "communication, more memory).")
    logits: str = doc("", "A store of the teacher's top-k logits (written by `bigtrain distill-logits` with this "
                      "config) that the student reads instead of running the teacher; '' = run the teacher.")


@dataclass
class DiffusionConfig:
    """The denoising objective, the sampler and the sample metric of diffusion families (dit, unet)."""

    objective: Literal["ddpm", "flow"] = doc(
        "ddpm", "ddpm: discrete timesteps t ~ U{0..T-1}, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; flow: rectified "
        "flow x_s = (1 - s) x0 + s eps (s = 0 data, 1 noise), velocity target eps - x0, timestep input 1000 s.")
    prediction: Literal["epsilon", "v", "sample"] = doc(
        "epsilon", "ddpm: what the network predicts (noise, velocity sqrt(abar) eps - sqrt(1 - abar) x0, or x0).")
    schedule: Literal["linear", "cosine", "scaled_linear"] = doc(
        "linear", "ddpm betas: DDPM linear 1e-4..0.02 (rescaled by 1000/T), cosine (Nichol & Dhariwal), or "
        "scaled_linear (Stable Diffusion, sqrt-spaced 0.00085..0.012).")
    timesteps: int = doc(1000, "ddpm: number of diffusion steps T.", gt=1, le=100_000)
    min_snr_gamma: float = doc(0.0, "ddpm: Min-SNR-gamma loss weights (5 is customary); 0 = unweighted MSE.", ge=0)
    flow_sigma: Literal["logit_normal", "uniform"] = doc(
        "logit_normal", "flow: how the noise level is drawn (SD3's logit-normal: sigmoid(N(mean, std))).")
    flow_mean: float = doc(0.0, "flow: mean of the logit-normal noise-level distribution.")
    flow_std: float = doc(1.0, "flow: std of the logit-normal noise-level distribution.", gt=0)
    label_dropout: float = doc(
        0.1, "Probability that a training sample's label is replaced by the null class (= model.num_classes), which "
        "teaches the unconditional prediction classifier-free guidance needs. Drawn per sample from "
        "(train.seed, sample position), like the noise and the timestep.", ge=0, le=1)
    sampler: Literal["auto", "ddim", "ddpm", "euler"] = doc(
        "auto", "auto = ddim for ddpm models, euler for flow models. ddim: deterministic (eta 0); ddpm: ancestral "
        "(posterior variance); euler: the flow ODE from s = 1 to 0.")
    sample_steps: int = doc(50, "Sampler steps for the samples written during training.", gt=0)
    guidance: float = doc(
        1.5, "Classifier-free guidance scale of the training-time samples: uncond + scale (cond - uncond), on every "
        "output channel (DiT's reference code guided only 3 of 4); 1 = the conditional prediction alone.", ge=0)
    samples: int = doc(
        0, "Samples generated at each evaluation (a grid, one row per class, written to RUN/samples/ and shown in the "
        "report; with eval_classifier also scored); 0 = none.", ge=0)
    eval_classifier: str = doc(
        "", "A bigtrain checkpoint of an image classifier for the data (e.g. the digits ViT) that scores the samples: "
        "its top-1 on the intended classes and the Frechet distance between sample and eval-split features in its "
        "pre-logit space. '' = not scored.")
    eval_max_samples: int = doc(
        1024, "Eval-split images for the denoising loss (fixed noise per position) and the reference features.", gt=0)


@dataclass
class LogConfig:
    every_steps: int = doc(10, "Write a training record to metrics.jsonl every N steps.", gt=0)
    progress: Literal["auto", "on", "lines", "off"] = doc(
        "auto", "Progress of training, evaluation and sampling: auto = a bar on a terminal, else (a Slurm log, a pipe) "
        "a log line (step, loss, throughput, ETA) every log.progress_every_s; on = always the bar; lines = always "
        "lines; off = none.")
    progress_every_s: float = doc(30.0, "Seconds between progress lines where there is no bar.", gt=0)
    wandb: bool = doc(False, "Also log to Weights & Biases (set WANDB_MODE=offline to log locally).")
    wandb_project: str = doc("bigtrain", "wandb project name.")


@dataclass
class ParallelConfig:
    dp: int = doc(0, "Data-parallel degree; 0 = inferred from the world size (see docs/parallelism.md).", ge=0)
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
    sharded_init: bool = doc(
        True, "Build the model on meta, parallelize it, and initialise on each rank only the shards it holds (the "
        "values of a whole-model build from train.seed, bit for bit); false builds the whole model on the host first."
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
    model: ModelConfig = field(default_factory=ModelConfig, metadata={
        "help": "Model (keys depend on model.family).", "resolve": _model_section("vit")})
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(family=""), metadata={
        "help": "A second, frozen model for tasks that use one (distillation); teacher.family '' = none.",
        "resolve": _model_section("")})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer."})
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig, metadata={"help": "LR schedule."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation."})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "Checkpoints."})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "Logging."})
    ema: EMAConfig = field(default_factory=EMAConfig, metadata={"help": "EMA of the weights (a training component)."})
    distill: DistillConfig = field(default_factory=DistillConfig, metadata={
        "help": "Distillation from the teacher section (tasks that use a teacher)."})
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig, metadata={
        "help": "Denoising objective, sampler and sample metric (diffusion families)."})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"help": "Parallel layout."})
    task: str = doc("", "Training objective, one of the model family's tasks; '' = the family's default.")
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
        """Cross-field checks that need more than one section (single-key bounds live in the schema).
        Fills what the family decides: preset sizes, the default task and data source."""
        from bigtrain.config.registry import apply_preset, get_family

        plan_batches(self)  # the one place batch divisibility is checked (dp = pp = 1 here)
        family = get_family(self.model.family)
        apply_preset(self.model, family)
        self.task = self.task or family.default_task
        if self.task not in family.tasks:
            raise ConfigError(f"config key 'task': {self.task!r} is not a task of model.family={self.model.family}; "
                              f"its tasks: {', '.join(family.tasks)}")
        self.data.source = self.data.source or next(iter(family.data_sources), "none")
        if self.data.source not in (*family.data_sources, "none"):
            raise ConfigError(f"config key 'data.source': {self.data.source!r} is not a data source of model.family="
                              f"{self.model.family}; choose from {[*family.data_sources, 'none']}")
        uses_teacher = getattr(family.tasks[self.task], "uses_teacher", False)
        if self.teacher.family:
            teacher = get_family(self.teacher.family, "teacher.family")
            apply_preset(self.teacher, teacher, "teacher")
            if not uses_teacher:
                raise ConfigError(f"config section 'teacher' is set (teacher.family={self.teacher.family}) but "
                                  f"task={self.task} uses no teacher; remove it or pick a distillation task")
        elif uses_teacher and not self.distill.logits:
            raise ConfigError(f"task={self.task} distills from a teacher: set the teacher section (e.g. "
                              "teacher.family=llama teacher.pretrained=DIR, an HF directory or a bigtrain checkpoint) "
                              "or distill.logits (its stored top-k logits)")
        if uses_teacher and self.parallel.pp > 1:
            raise ConfigError(f"task={self.task} runs a teacher beside the student, which the pipeline schedules do not "
                              f"carry: parallel.pp must be 1 (got {self.parallel.pp}); use dp / ZeRO / tp")
        if family.validate is not None:
            family.validate(self)
        if self.distill.logits:  # after the family filled its derived sizes (e.g. the vocabulary)
            self._validate_stored_logits(family, uses_teacher)
        self._validate_rest()

    def _validate_stored_logits(self, family: Any, uses_teacher: bool) -> None:
        """distill.logits must have been written for this run: its temperature, data seed, items per
        sample and at least as many samples as the run reads."""
        from data_pipeline import DataError
        from data_pipeline.logits import read_meta

        d = self.distill
        if not uses_teacher:
            raise ConfigError(f"config key 'distill.logits' is set but task={self.task} uses no teacher")
        if d.hidden_weight > 0:
            raise ConfigError("distill.hidden_weight > 0 needs the live teacher's hidden states; a logit store "
                              "(distill.logits) holds logits only")
        try:
            meta = read_meta(d.logits)
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        needed = self.train.steps * self.train.global_batch_size
        items = family.sample_unit(self.model)[1]
        classes = getattr(self.model, "vocab_size", 0) or getattr(self.model, "num_classes", 0)  # the output width
        if classes and meta.vocab != classes:
            raise ConfigError(f"distill.logits={d.logits} stores logits over {meta.vocab} classes, the student "
                              f"predicts {classes}: the store is for another model")
        for what, stored, here in (("temperature", meta.temperature, d.temperature), ("data seed", meta.seed,
                                   self.train.seed), ("targets per sample", meta.items, items)):
            if stored != here:
                raise ConfigError(f"distill.logits={d.logits} was written with {what} {stored}, this run has {here} "
                                  "(distill.temperature, train.seed, model.seq_len): write it again for this run")
        if meta.samples < needed:
            raise ConfigError(f"distill.logits={d.logits} stores {meta.samples} samples, this run reads {needed} "
                              f"(train.steps x train.global_batch_size): write it for as many steps")

    def _validate_rest(self) -> None:
        t, s = self.train, self.schedule
        parse_wd_mults(self.optim.wd_mults)
        if s.warmup_steps + s.cooldown_steps > t.steps:
            total = s.warmup_steps + s.cooldown_steps
            # the fix a user trying a config small wants: the same warm-up : cool-down split, scaled to fit
            warm = s.warmup_steps * t.steps // total
            raise ConfigError(
                f"config keys 'schedule.warmup_steps' + 'schedule.cooldown_steps' ({s.warmup_steps}+{s.cooldown_steps}) "
                f"exceed 'train.steps' ({t.steps}): set train.steps>={total}, or shorten the schedule, e.g. "
                f"schedule.warmup_steps={warm} schedule.cooldown_steps={t.steps * s.cooldown_steps // total}"
            )
        for name in t.preempt_signals:
            if name not in signal.Signals.__members__:
                raise ConfigError(f"config key 'train.preempt_signals': {name!r} is not a signal name (e.g. SIGUSR1)")
            if name in ("SIGKILL", "SIGSTOP"):
                raise ConfigError(f"config key 'train.preempt_signals': {name} cannot be caught, so it cannot ask for a "
                                  "save; use SIGTERM, SIGUSR1 or SIGUSR2")
        if self.optim.head_weight_decay < 0 and self.optim.head_weight_decay != -1:
            raise ConfigError(f"config key 'optim.head_weight_decay' must be >= 0 or -1 (= optim.weight_decay), got "
                              f"{self.optim.head_weight_decay}")
        d = self.distill
        if d.kd_weight == 0 and d.ce_weight == 0 and d.hidden_weight == 0 and (self.teacher.family or d.logits):
            raise ConfigError("config keys 'distill.kd_weight' and 'distill.ce_weight' are both 0: the objective would "
                              "train nothing")
        if self.log.wandb:
            from bigtrain.optional import require

            require("wandb", "log.wandb=true")
        if self.resume == "":
            raise ConfigError("config key 'resume' must be 'auto', 'never' or a checkpoint path")
        valid = set(all_keys(self))
        for key in self.resume_allow_changes:
            if key not in valid:
                raise ConfigError(f"config key 'resume_allow_changes': {key!r} is not a config key")
