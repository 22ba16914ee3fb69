"""``bigtrain bench minitron [--out DIR] [--seeds N] [--lrs A,B,C] [--quick]``: the Minitron recipe
in miniature, on CPython's standard library (byte-level, validation held out by file).

Stages (each skipped when its output exists, so an interrupted benchmark continues where it stopped):

1. the teacher (``configs/llm/minitron_teacher.yaml``);
2. two prunings of it with ``bigtrain prune``: by width (hidden 192 -> 144, MLP 512 -> 320; heads,
   layers and head_dim kept) and by depth (4 -> 2 layers), each about 55% of the parameters;
3. for each, three students with the same architecture and token budget
   (``configs/llm/minitron_student.yaml``):

   * A: pruned + distilled (forward KL, tau = 1, KD only),
   * B: random init + cross-entropy (training from scratch),
   * C: pruned + cross-entropy;

   each arm's learning rate picked by a sweep on seed 0, then more seeds at that rate;
4. B and C again with the FLOPs A spent (its teacher forward included): equal compute.

Reported: validation bits per byte (= nats per byte-level token / ln 2) of the teacher, right after
pruning, and per arm (mean, std over seeds) at equal tokens and at equal FLOPs; written to
``DIR/results.json`` and ``DIR/table.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bigtrain.config.core import help_text

ROOT = Path(__file__).resolve().parents[3]
TEACHER_CONFIG = ROOT / "configs" / "llm" / "minitron_teacher.yaml"
STUDENT_CONFIG = ROOT / "configs" / "llm" / "minitron_student.yaml"
# ~55% of the teacher's parameters each (width keeps heads, layers and head_dim; a Llama config needs
# the width divisible by the heads)
PRUNINGS = {"width": ["--hidden", "144", "--ffn", "320"], "depth": ["--layers", "2"]}
ARMS = {"A": "pruned + distilled", "B": "random init + CE", "C": "pruned + CE"}
LN2 = math.log(2.0)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bigtrain bench minitron", description=help_text(__doc__.split("\n\n")[0]))
    p.add_argument("--out", default="runs/minitron")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="the learning rates each arm sweeps on seed 0")
    p.add_argument("--teacher-steps", type=int, default=0, help="0 = the teacher config's")
    p.add_argument("--student-steps", type=int, default=0, help="0 = the student config's")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny budgets, 1 seed, 1 learning rate")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.out = Path(args.out).resolve()
        self.data = self.out / "data"
        self.quick = args.quick
        self.seeds = 1 if args.quick else args.seeds
        self.lrs = [float(x) for x in args.lrs.split(",")][: 1 if args.quick else None]
        self.teacher_steps = args.teacher_steps or (40 if args.quick else 0)
        self.student_steps = args.student_steps or (10 if args.quick else 0)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "bench.log", "a")

    def say(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def bigtrain(self, *args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "bigtrain", *args], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"bigtrain {' '.join(args[:3])} ... failed ({proc.returncode}): {proc.stderr[-2000:]}")

    def train(self, name: str, config: Path, *overrides: str) -> dict[str, Any]:
        """One run (skipped when its results exist): final validation loss, seconds, tokens."""
        run = self.out / "runs" / name
        results = run / "results.json"
        if not results.is_file():
            t0 = time.monotonic()
            self.bigtrain("train", str(config), f"run.dir={run}", f"data.dir={self.data}", "log.progress=false",
                          "resume=never", *overrides)
            self.say(f"{name}: {time.monotonic() - t0:.0f} s")
        r = json.loads(results.read_text())
        cfg_text = (run / "config.yaml").read_text()
        return {"loss": r["eval/loss"], "bpb": r["eval/loss"] / LN2, "seconds": r["train_seconds"], "config": cfg_text}

    def teacher(self) -> Path:
        steps = [f"train.steps={self.teacher_steps}", "checkpoint.every_steps=0",
                 f"schedule.warmup_steps={max(1, self.teacher_steps // 10)}"] if self.teacher_steps else []
        r = self.train("teacher", TEACHER_CONFIG, *steps)
        ckpts = sorted((self.out / "runs" / "teacher" / "checkpoints").glob("step_*"))
        self.results["teacher"] = {k: r[k] for k in ("loss", "bpb", "seconds")}
        return ckpts[-1]

    def prune(self, teacher: Path, kind: str) -> Path:
        out = self.out / f"pruned_{kind}"
        if not (out / "prune_report.json").is_file():
            self.bigtrain("prune", str(teacher), "--out", str(out), *PRUNINGS[kind], "--data", str(self.data),
                          "--calib-samples", "64")
            self.say(f"pruned by {kind}")
        return out

    def random_init(self, pruned: Path, seed: int) -> Path:
        """Arm B's start: the pruned architecture (explicit head_dim and all), freshly initialised."""
        out = self.out / f"{pruned.name}_random_seed{seed}"
        if not (out / "config.json").is_file():
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pruned, local_files_only=True))
            model.save_pretrained(out, safe_serialization=True)
        return out

    def arm(self, kind: str, arm: str, pruned: Path, teacher: Path, lr: float, seed: int, steps: int,
            tag: str = "") -> dict[str, Any]:
        start = self.random_init(pruned, seed) if arm == "B" else pruned
        distill = ["task=distill", "teacher.family=llama", f"teacher.pretrained={teacher}"] if arm == "A" else []
        budget = [f"train.steps={steps}", f"schedule.warmup_steps={max(1, steps // 10)}"]
        return self.train(f"{kind}_{arm}{tag}_lr{lr:g}_seed{seed}", STUDENT_CONFIG, f"model.pretrained={start}",
                          f"optim.lr={lr}", f"train.seed={seed}", *budget, *distill)

    def run(self) -> dict[str, Any]:
        self.results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "quick": self.quick, "seeds": self.seeds,
                                        "lrs": self.lrs}
        self.bigtrain("config", "show", str(TEACHER_CONFIG), f"data.dir={self.data}")  # fails fast on a bad config
        teacher = self.teacher()
        student = _student()
        steps = self.student_steps or student.train.steps
        for kind in PRUNINGS:
            pruned = self.prune(teacher, kind)
            report = json.loads((pruned / "prune_report.json").read_text())
            flops = _flops(teacher, pruned, student.model.seq_len)
            eq_steps = round(steps * (flops["student_train"] + flops["teacher_forward"]) / flops["student_train"])
            res: dict[str, Any] = {"params": report["after"]["params"], "teacher_params": report["before"]["params"],
                                   "shape": report["after"], "kept_layers": report["kept_layers"],
                                   "bpb_after_pruning": val_loss(pruned, self.data) / LN2, "flops_per_token": flops,
                                   "steps": steps,
                                   "tokens": steps * student.train.global_batch_size * student.model.seq_len,
                                   "equal_flop_steps": eq_steps, "arms": {}}
            for arm in ARMS:
                sweep = {lr: self.arm(kind, arm, pruned, teacher, lr, 0, steps)["bpb"] for lr in self.lrs}
                best = min(sweep, key=sweep.get)
                seeds = [sweep[best]] + [self.arm(kind, arm, pruned, teacher, best, s, steps)["bpb"]
                                         for s in range(1, self.seeds)]
                entry = {"sweep": sweep, "lr": best, "bpb": seeds, **_stats(seeds)}
                if arm != "A":  # equal compute: A's teacher forwards buy B and C more steps
                    eq = [self.arm(kind, arm, pruned, teacher, best, s, eq_steps, "eqflops")["bpb"]
                          for s in range(self.seeds)]
                    entry["equal_flops"] = {"bpb": eq, **_stats(eq)}
                res["arms"][arm] = entry
                self.say(f"{kind} {arm} ({ARMS[arm]}): lr {best:g}, bpb {entry['mean']:.4f} +- {entry['std']:.4f}")
            self.results[kind] = res
            (self.out / "results.json").write_text(json.dumps(self.results, indent=1))
        self.results["stored"] = self.stored_logits(teacher, steps)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))
        (self.out / "table.md").write_text(table(self.results))
        return self.results

    def stored_logits(self, teacher: Path, steps: int, top_k: int = 16) -> dict[str, Any]:
        """Arm A of the width pruning (its best LR, seed 0) again, from the teacher's top-k logits
        stored once: the training time with and without the teacher forward, and the store's fidelity."""
        pruned = self.out / "pruned_width"
        lr = self.results["width"]["arms"]["A"]["lr"]
        store = self.out / f"logits_top{top_k}"
        common = [f"model.pretrained={pruned}", "task=distill", f"optim.lr={lr}", "train.seed=0",
                  f"train.steps={steps}", f"schedule.warmup_steps={max(1, steps // 10)}"]
        if not (store / "logits.json").is_file():
            t0 = time.monotonic()
            self.bigtrain("distill-logits", str(STUDENT_CONFIG), f"data.dir={self.data}", *common,
                          "teacher.family=llama", f"teacher.pretrained={teacher}", "--out", str(store),
                          "--top-k", str(top_k))
            self.say(f"stored top-{top_k} logits: {time.monotonic() - t0:.0f} s")
        meta = json.loads((store / "logits.json").read_text())
        stored = self.train(f"width_A_stored_top{top_k}_lr{lr:g}_seed0", STUDENT_CONFIG, *common,
                            f"distill.logits={store}")
        live = self.train(f"width_A_lr{lr:g}_seed0", STUDENT_CONFIG, *common, "teacher.family=llama",
                          f"teacher.pretrained={teacher}")
        ce = self.train(f"width_C_lr{self.results['width']['arms']['C']['lr']:g}_seed0", STUDENT_CONFIG,
                        f"model.pretrained={pruned}", f"optim.lr={self.results['width']['arms']['C']['lr']}",
                        "train.seed=0", f"train.steps={steps}", f"schedule.warmup_steps={max(1, steps // 10)}")
        return {"top_k": top_k, "store_bytes": sum(e["bytes"] for e in meta["shards"]), "store_stats": meta["stats"],
                "seconds_live": live["seconds"], "seconds_stored": stored["seconds"], "seconds_ce": ce["seconds"],
                "bpb_live": live["bpb"], "bpb_stored": stored["bpb"]}


def _stats(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def _student() -> Any:
    from bigtrain.config import load_config

    return load_config(STUDENT_CONFIG)


def _flops(teacher: Path, pruned: Path, seq: int) -> dict[str, float]:
    """Per token: the student's training FLOPs and the teacher's forward (a third of its training FLOPs)."""
    from types import SimpleNamespace

    import torch

    from bigtrain.families.llama.pretrained import hf_config
    from bigtrain.models.causal_lm import CausalLM

    with torch.device("meta"):
        t = CausalLM(hf_config(SimpleNamespace(pretrained=str(teacher))))
        s = CausalLM(hf_config(SimpleNamespace(pretrained=str(pruned))))
    return {"student_train": s.train_flops_per_token(seq), "teacher_forward": t.train_flops_per_token(seq) / 3}


def val_loss(model_dir: Path, data: Path) -> float:
    """Mean next-token loss (nats) of an HF directory on the validation split, in one process."""
    from bigtrain.families.llama.prune import lm_loss
    from bigtrain.families.llama.prune_cli import load_source
    from data_pipeline import GlobalOrder, load_split
    from data_pipeline.loader import TokenBatchDataset

    model = load_source(str(model_dir))
    split = load_split(str(data), "val")
    seq = int(json.loads((data / "index.json").read_text())["splits"]["val"].get("seq_len", 128))
    ds = TokenBatchDataset(split, GlobalOrder([s.num_samples for s in split.shards], 0, shuffle=False), seq,
                           model.config.vocab_size, 0, "raise")
    n = split.num_samples
    return lm_loss(model, (ds[list(range(lo, min(lo + 64, n)))]["tokens"] for lo in range(0, n, 64)))


def table(r: dict[str, Any]) -> str:
    lines = [f"Teacher: {r['teacher']['bpb']:.3f} bits/byte on held-out files ({r['teacher']['seconds']:.0f} s of training).",
             "", "| pruning | params (teacher -> student) | right after pruning | arm | LR | equal tokens | equal FLOPs |",
             "|---|---|---|---|---|---|---|"]
    for kind in PRUNINGS:
        if kind not in r:
            continue
        k = r[kind]
        for arm, e in k["arms"].items():
            eq = e.get("equal_flops")
            eq_text = f"{eq['mean']:.3f} ± {eq['std']:.3f}" if eq else f"{e['mean']:.3f} ± {e['std']:.3f} (its own)"
            lines.append(f"| {kind} | {k['teacher_params']:,} -> {k['params']:,} | {k['bpb_after_pruning']:.3f} | "
                         f"{arm}: {ARMS[arm]} | {e['lr']:g} | {e['mean']:.3f} ± {e['std']:.3f} | {eq_text} |")
    st = r.get("stored")
    if st:
        lines += ["", f"Stored top-{st['top_k']} logits (width, arm A, seed 0): training {st['seconds_live']:.1f} s with "
                  f"the live teacher, {st['seconds_stored']:.1f} s from the store ({st['seconds_live'] / st['seconds_stored']:.2f}x; "
                  f"cross-entropy alone {st['seconds_ce']:.1f} s); validation {st['bpb_live']:.3f} vs "
                  f"{st['bpb_stored']:.3f} bits/byte; store {st['store_bytes'] / 2**20:.1f} MiB, KL(dense || stored) per "
                  f"token mean {st['store_stats']['kl_mean']:.4f} (max {st['store_stats']['kl_max']:.3f}), top-k mass "
                  f"{st['store_stats']['topk_mass_mean']:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    bench = Bench(_parse(argv))
    results = bench.run()
    print(table(results))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
