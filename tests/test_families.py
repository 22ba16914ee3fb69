"""Model families: one defined here the way an outside user would, and every registered one on its
``debug`` preset (build on meta, train, save and resume, 2-rank data-parallel parity)."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import ROOT, launch
from bigtrain.config import ConfigError, load_config
from bigtrain.config.core import doc
from bigtrain.config.schema import ModelConfig
from bigtrain.families import Family, RunSpec, family_names, get_family, register_family
from bigtrain.families.image_classification import classification_evaluator, image_train_data, write_digits_source
from bigtrain.tasks import ClassificationTask

LOSS_RTOL = 1e-5  # the parity tolerance of tests/test_parallel.py
TESTS = Path(__file__).resolve().parent


# --- a family written outside bigtrain: an MLP classifier on the digits ------------------------------
@dataclass
class MLPConfig(ModelConfig):
    family: str = doc("test_families:FAMILY", "this family")
    variant: str = doc("debug", "size preset")
    hidden: int = doc(0, "hidden width; 0 = from variant", ge=0)
    depth: int = doc(0, "hidden layers; 0 = from variant", ge=0)
    image_size: int = doc(16, "input resolution", gt=0)
    in_channels: int = doc(1, "input channels", gt=0)
    num_classes: int = doc(10, "classes", gt=0)


class MLP(nn.Module):
    def __init__(self, m: MLPConfig) -> None:
        super().__init__()
        dims = [m.in_channels * m.image_size**2] + [m.hidden] * m.depth
        self.blocks = nn.ModuleDict({str(i): nn.Sequential(nn.Linear(a, b), nn.GELU()) for i, (a, b) in
                                     enumerate(zip(dims[:-1], dims[1:]))})
        self.head = nn.Linear(dims[-1], m.num_classes)

    def forward(self, x: torch.Tensor, with_features: bool = False) -> Any:
        h = x.flatten(1)
        for block in self.blocks.values():
            h = block(h)
        logits = self.head(h)
        return (logits, h) if with_features else logits


def mlp_info(argv: list[str]) -> int:
    """A family subcommand: ``bigtrain mlp-info [key=value ...]`` prints the parameter count."""
    cfg = load_config(None, ["model.family=test_families:FAMILY", *argv])
    with torch.device("meta"):
        print(sum(p.numel() for p in MLP(cfg.model).parameters()))
    return 0


FAMILY = Family(
    name="mlp",
    config=MLPConfig,
    build=MLP,
    tasks={"classification": lambda cfg, model: ClassificationTask(model)},
    train_data=image_train_data,
    evaluator=classification_evaluator,
    flops_per_sample=lambda model, m: 6.0 * sum(p.numel() for p in model.parameters()),
    data_sources={"digits": write_digits_source},
    presets={"debug": {"hidden": 32, "depth": 2}, "wide": {"hidden": 256, "depth": 2}},
    debug_overrides=("model.variant=debug", "data.image_size=16", "train.global_batch_size=32"),
    commands={"mlp-info": mlp_info},
    benchmarks={"mlp-forward": lambda argv: mlp_info(argv)},
)


FAMILY_EP = dataclasses.replace(FAMILY, name="mlp_ep", commands={}, benchmarks={})  # installed as an entry point


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}


def _train(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    proc = launch("train", *args, nproc=nproc, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _yaml(tmp_path: Path, family: str) -> str:
    path = tmp_path / "family.yaml"
    path.write_text(f"model:\n  family: {family}\n")
    return str(path)


def test_outside_family_trains_one_process_and_dp2(digits_dir: str, tmp_path: Path) -> None:
    """A family defined in this file, named as module:attribute, trains through `bigtrain train`
    (1 process and 2-rank ZeRO-3 data parallel, equal losses), evaluates, and exports."""
    common = [_yaml(tmp_path, "test_families:FAMILY"), *FAMILY.debug_overrides, f"data.dir={digits_dir}",
              "train.steps=4", "log.every_steps=1", "eval.fewshot_shots=[1]", "eval.fewshot_seeds=1",
              "checkpoint.every_steps=2", "parallel.timeout_s=120"]
    _train([*common, f"run.dir={tmp_path / 'one'}"])
    _train([*common, f"run.dir={tmp_path / 'dp2'}", "parallel.zero=3"], nproc=2)
    one, dp2 = _losses(tmp_path / "one"), _losses(tmp_path / "dp2")
    assert sorted(one) == sorted(dp2) == [1, 2, 3, 4]
    assert max(abs(dp2[s] - one[s]) / one[s] for s in one) <= LOSS_RTOL
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert results["status"] == 0 and 0.0 <= results["eval/top1"] <= 1.0
    import yaml

    saved = yaml.safe_load((tmp_path / "dp2" / "checkpoints" / "step_00000004" / "config.yaml").read_text())
    assert saved["model"] == {"family": "test_families:FAMILY", "variant": "debug", "hidden": 32, "depth": 2,
                              "image_size": 16, "in_channels": 1, "num_classes": 10}
    out = tmp_path / "mlp.safetensors"
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "export", str(tmp_path / "dp2" / "checkpoints" / "step_00000004"),
                           "--out", str(out)], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    assert set(load_file(out)) == {"blocks.0.0.weight", "blocks.0.0.bias", "blocks.1.0.weight", "blocks.1.0.bias",
                                   "head.weight", "head.bias"}


def test_registered_family_gets_its_schema_presets_and_commands(capsys: pytest.CaptureFixture) -> None:
    register_family(FAMILY)
    assert "mlp" in family_names() and get_family("mlp") is FAMILY
    cfg = load_config(None, ["model.family=mlp", "model.variant=wide"])
    assert (cfg.model.hidden, cfg.model.depth, cfg.task, cfg.data.source) == (256, 2, "classification", "digits")
    with pytest.raises(ConfigError, match=r"'model.patch_size' is not a key of model.family=mlp; valid keys: "
                                          r"model.depth, model.family"):
        load_config(None, ["model.family=mlp", "model.patch_size=4"])
    with pytest.raises(ConfigError, match=r"'model.variant': 'huge' is not a preset of family 'mlp'; choose from "
                                          r"\['debug', 'wide'\] or 'custom'"):
        load_config(None, ["model.family=mlp", "model.variant=huge"])
    with pytest.raises(ConfigError, match="declares no tensor-parallel plan: parallel.tp must be 1"):
        from bigtrain.distributed import ParallelState, parallelize_blocks
        from bigtrain.distributed.mesh import LaunchEnv

        cfg = load_config(None, ["model.family=mlp"])
        parallelize_blocks(MLP(cfg.model), ParallelState(cfg.parallel, LaunchEnv(), pp=1, dp=1, tp=2), cfg.parallel, None)
    from bigtrain.cli import main

    wide = str(256 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10)
    assert main(["mlp-info", "model.variant=wide"]) == 0
    assert capsys.readouterr().out.strip() == wide
    assert main(["bench", "mlp-forward", "model.variant=wide"]) == 0 and capsys.readouterr().out.strip() == wide
    assert main(["bench"]) == 0 and "mlp-forward  (model.family=mlp)" in capsys.readouterr().out
    assert main(["families"]) == 0 and "commands: mlp-info; benchmarks: mlp-forward" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already registered"):
        register_family(Family(**{**FAMILY.__dict__, "commands": {}}))


def test_family_from_an_entry_point(tmp_path: Path) -> None:
    """An installed package declaring ``[project.entry-points."bigtrain.families"]`` is found by name."""
    dist = tmp_path / "mlp_family-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mlp-family\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[bigtrain.families]\nmlp_ep = test_families:FAMILY_EP\n")
    code = ("from bigtrain.config import load_config; from bigtrain.families import family_names; "
            "c = load_config(None, ['model.family=mlp_ep']); print(c.model.hidden, c.task, family_names())")
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), _env()["PYTHONPATH"]])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    hidden, task, names = proc.stdout.strip().split(" ", 2)
    assert (hidden, task) == ("32", "classification")
    assert {"mlp_ep", "dit", "llama", "unet", "vit"} <= set(ast.literal_eval(names)), names  # with the built-in ones


def test_unknown_family_and_old_model_name_fail_before_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown model family 'resnet'; registered families: .*llama.*vit"):
        load_config(None, ["model.family=resnet"])
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  name: llama\n  width: 64\n")
    with pytest.raises(ConfigError, match=r"'model.name' is no longer read: the model family is named by 'model.family'"):
        load_config(old)
    with pytest.raises(ConfigError, match=r"'model.family': cannot import 'no_such_module'"):
        load_config(None, ["model.family=no_such_module:FAMILY"])
    with pytest.raises(ConfigError, match=r"'teacher.depth' is not a key of teacher.family=None"):
        load_config(None, ["teacher.depth=3"])
    with pytest.raises(ConfigError, match="task=classification uses no teacher"):
        load_config(None, ["teacher.family=vit"])
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", str(ROOT / "configs" / "vit" / "digits_test.yaml"),
                           "model.family=llama", f"run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "is not a key of model.family=llama; valid keys: model.depth" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_checkpoint_config_of_the_flat_model_section_is_migrated(tmp_path: Path) -> None:
    """Configs saved before families (``model.name`` and every family's keys) still resume and export."""
    from bigtrain.config import dump_yaml, load_saved_config
    from bigtrain.config.compat import resume_mismatches
    import yaml

    now = load_config(ROOT / "configs" / "llm" / "stdlib_test.yaml")
    legacy = yaml.safe_load(dump_yaml(now))  # what the run saved then: the same, but the model section flat
    legacy["model"] = {
        "name": "llama", "variant": "Ti", "width": 64, "depth": 4, "mlp_dim": 128, "num_heads": 4, "num_kv_heads": 2,
        "vocab_size": 257, "seq_len": 64, "patch_size": 4, "image_size": 32, "in_channels": 1, "num_classes": 10,
        "head": "map", "posemb": "learned", "dropout": 0.0, "head_zero_init": True}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(legacy))
    cfg = load_saved_config(tmp_path / "config.yaml")
    assert cfg.model.family == "llama" and (cfg.model.width, cfg.model.depth) == (64, 4)
    assert resume_mismatches(legacy, yaml.safe_load(dump_yaml(now)), []) == []
    changed = load_config(ROOT / "configs" / "llm" / "stdlib_test.yaml", ["model.depth=2"])
    assert resume_mismatches(legacy, yaml.safe_load(dump_yaml(changed)), []) == ["model.depth: 4 -> 2"]


@pytest.mark.parametrize("name", family_names())
def test_every_family_debug_preset(name: str, tmp_path: Path) -> None:
    """Build on meta (parameters and FLOPs known), train with checkpoints, resume bit-exactly from
    the middle, and match 2-rank data parallel within the parity tolerance."""
    from bigtrain.recipes import build_model, num_params, train_flops_per_sample

    family = get_family(name)
    common = [_yaml(tmp_path, name), *family.debug_overrides, f"data.dir={tmp_path / 'data'}", "train.steps=4",
              "log.every_steps=1", "checkpoint.every_steps=2", "checkpoint.keep_last=0", "eval.fewshot=false",
              "schedule.warmup_steps=1", "schedule.cooldown_steps=0", "train.micro_batch_size=0", "parallel.timeout_s=120"]
    cfg = load_config(common[0], common[1:])
    with torch.device("meta"):
        model = build_model(RunSpec.of(cfg))
    assert all(p.is_meta for p in model.parameters())
    params, flops = num_params(model), train_flops_per_sample(model, RunSpec.of(cfg))
    assert params > 0 and flops >= 6 * params * 0.5, (params, flops)
    print(f"{name}/debug: {params / 1e6:.3f}M params, {flops / 1e6:.2f} MFLOP per training sample")

    first = _train([*common, f"run.dir={tmp_path / 'one'}"])
    assert "GFLOP/sample" in first.stderr
    ref = _losses(tmp_path / "one")
    again = tmp_path / "again"
    import shutil

    shutil.copytree(tmp_path / "one", again)
    shutil.rmtree(again / "checkpoints" / "step_00000004")
    (again / "metrics.jsonl").unlink()
    resumed = _train([*common, f"run.dir={again}"])
    assert "resumed from" in resumed.stderr
    got = _losses(again)
    assert sorted(got) == [3, 4] and all(got[s] == ref[s] for s in got), (got, ref)
    _train([*common, f"run.dir={tmp_path / 'dp2'}", "parallel.dp=2"], nproc=2)
    dp2 = _losses(tmp_path / "dp2")
    assert max(abs(dp2[s] - ref[s]) / ref[s] for s in ref) <= LOSS_RTOL, (dp2, ref)
