"""Minitron pruning core (bigtrain/families/llama/prune.py): importance from calibration forward
passes, slicing that keeps the model's function when everything is kept, GQA-aware head choice,
and a pruned model that survives the Hugging Face round trip (explicit head_dim)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from conftest import refused

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _model(kind: str = "qwen2", **extra: object):
    from transformers import LlamaConfig, Qwen2Config

    from bigtrain.models.causal_lm import CausalLM

    torch.manual_seed(0)
    config = (Qwen2Config if kind == "qwen2" else LlamaConfig)(**SHAPE, **extra)
    config.architectures = ["Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"]
    config._attn_implementation = "sdpa"
    model = CausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _batches(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (4, 32), generator=g) for _ in range(n)]


def test_keeping_everything_reproduces_the_model() -> None:
    from bigtrain.families.llama.prune import Plan, apply_plan

    model = _model()
    plan = Plan(layers=[0, 1, 2, 3], heads={i: [0, 1, 2, 3] for i in range(4)},
                neurons={i: list(range(96)) for i in range(4)}, channels=list(range(64)))
    small = apply_plan(model, plan)
    x = _batches(1)[0]
    with torch.no_grad():
        assert torch.equal(small(x), model(x))


def test_llama_attention_and_mlp_biases_are_pruned_with_their_rows(tmp_path: Path) -> None:
    """Llama's attention_bias / mlp_bias (q/k/v/o and gate/up/down biases): keeping everything
    reproduces the logits exactly; a real prune slices every bias and reloads in transformers."""
    from transformers import AutoModelForCausalLM

    from bigtrain.families.llama.prune import Plan, apply_plan, estimate_importance, make_plan

    model = _model("llama", attention_bias=True, mlp_bias=True)
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert {n.split(".", 2)[2] for n in biases} == {f"self_attn.{p}_proj.bias" for p in "qkvo"} | {
        f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")}
    everything = Plan(layers=[0, 1, 2, 3], heads={i: [0, 1, 2, 3] for i in range(4)},
                      neurons={i: list(range(96)) for i in range(4)}, channels=list(range(64)))
    x = _batches(1)[0]
    with torch.no_grad():
        assert torch.equal(apply_plan(model, everything)(x), model(x))
    small = apply_plan(model, make_plan(estimate_importance(model, _batches()), model.config, hidden=48, ffn=64,
                                        heads=2, layers=3))
    layer = small.layers["0"]
    assert layer.self_attn.o_proj.bias.shape == (48,) and layer.mlp.down_proj.bias.shape == (48,)
    assert layer.mlp.gate_proj.bias.shape == (64,) and layer.mlp.up_proj.bias.shape == (64,)
    small.to_hf().save_pretrained(tmp_path / "pruned")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", attn_implementation="sdpa",
                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert (loaded(x).logits - small(x)).abs().max() <= 1e-5


def test_importance_finds_dead_neurons_heads_and_identity_layers() -> None:
    from bigtrain.families.llama.prune import estimate_importance, keep_heads, layer_loss_importance, make_plan

    model = _model("llama")
    with torch.no_grad():
        layer0 = model.layers["0"]
        layer0.mlp.gate_proj.weight[5].zero_()  # silu(0) * up = 0: neuron 5 never fires
        layer0.self_attn.q_proj.weight[16:32].zero_()  # head 1 attends uniformly...
        layer0.self_attn.v_proj.weight[0:16].zero_()  # ...to zero values (KV head 0 serves heads 0, 1)
        layer2 = model.layers["2"]
        layer2.self_attn.o_proj.weight.zero_()
        layer2.mlp.down_proj.weight.zero_()  # block 2 is the identity
    imp = estimate_importance(model, _batches())
    assert imp.samples == 16
    assert imp.neurons[0, 5] == 0 and imp.neurons[0].min() == 0 and (imp.neurons[0] > 0).sum() == 95
    assert imp.heads[0, 0] == 0 and imp.heads[0, 1] == 0  # both heads of KV group 0 read zero values
    assert imp.layers[2] < 1e-6 < imp.layers[[0, 1, 3]].min()
    by_loss = layer_loss_importance(model, _batches())  # skipping the identity block changes no logit
    assert by_loss[2] == 0 and (by_loss[[0, 1, 3]] != 0).all() and list(model.layers) == ["0", "1", "2", "3"]
    plan = make_plan(imp, model.config, hidden=48, ffn=64, heads=2, layers=3)
    assert plan.layers == [0, 1, 3] and 5 not in plan.neurons[0]
    # GQA: one head from each KV group, even where group 0's are both dead
    assert plan.heads[0] == keep_heads(imp.heads[0], 2, 2) and plan.heads[0][0] in (0, 1) and plan.heads[0][1] in (2, 3)
    with pytest.raises(ValueError, match="multiple of the 2 key/value heads"):
        keep_heads(imp.heads[0], 3, 2)


def test_pruned_model_round_trips_through_hugging_face(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from bigtrain.families.llama.prune import apply_plan, estimate_importance, make_plan

    model = _model()
    imp = estimate_importance(model, _batches())
    small = apply_plan(model, make_plan(imp, model.config, hidden=48, ffn=64, heads=2, layers=3))
    c = small.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers,
            c.head_dim) == (48, 64, 2, 2, 3, 16)
    assert small.layers["1"].self_attn.q_proj.bias.shape == (32,)
    small.to_hf().save_pretrained(tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", attn_implementation="sdpa")
    assert loaded.config.head_dim == 16 and len(loaded.model.layers) == 3
    x = _batches(1)[0]
    with torch.no_grad():
        out, ref, full = loaded(x).logits, small(x), model(x)
    assert (out - ref).abs().max() <= 1e-5
    assert (out - full).abs().max() > 1e-3  # it did remove something
    assert [layer.self_attn.layer_idx for layer in loaded.model.layers] == [0, 1, 2]


def test_prune_command_end_to_end(tmp_path: Path) -> None:
    """``bigtrain prune`` on an HF directory with a tokenizer: explicit shape, then a parameter
    budget reusing the saved scores; the output loads in transformers and trains in bigtrain."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import ROOT, assert_shared_modes
    from data_pipeline.text import stdlib_files, train_bpe

    src = tmp_path / "src"
    _model().to_hf().save_pretrained(src)
    train_bpe(stdlib_files(100_000), 300).hf.save(str(src / "tokenizer.json"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def prune(out: Path, *args: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "bigtrain", "prune", str(src), "--out", str(out),
                               "--calib-samples", "32", "--seq-len", "64", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "parameters; hidden" in proc.stdout
        return json.loads((out / "prune_report.json").read_text())

    report = prune(tmp_path / "a", "--hidden", "48", "--ffn", "64", "--heads", "2", "--layers", "3")
    assert report["after"] | {"params": 0, "calib_loss": 0} == {"hidden": 48, "ffn": 64, "heads": 2, "kv_heads": 2,
                                                                  "layers": 3, "head_dim": 16, "params": 0,
                                                                  "calib_loss": 0}
    assert report["calib_samples"] == 32 and len(report["kept_layers"]) == 3
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    assert_shared_modes(tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert sum(p.numel() for p in loaded.parameters()) == report["after"]["params"]
    again = prune(tmp_path / "b", "--hidden", "48", "--ffn", "64", "--heads", "2", "--layers", "3",
                  "--scores", str(tmp_path / "a" / "importance.json"))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and again["after"] == report["after"]  # the scores are reused
    budget = prune(tmp_path / "c", "--params", "1.3e5", "--layer-importance", "loss")  # layers ranked by loss
    assert budget["after"]["params"] <= 1.3e5 * 1.01 and len(budget["candidates"]) >= 2
    assert budget["layer_importance"] == "loss"
    assert budget["after"]["calib_loss"] == min(c["calib_loss"] for c in budget["candidates"])
    # the pruned directory is a starting point like any other (its own tokenizer, explicit head_dim)
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", str(ROOT / "configs" / "llm" / "from_hf.yaml"),
                           f"model.pretrained={tmp_path / 'a'}", f"data.dir={tmp_path / 'data'}",
                           f"run.dir={tmp_path / 'run'}", "train.steps=2", "eval.final=false", "log.progress=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a bigtrain checkpoint is a source too; a bad target fails before any calibration pass
    src = tmp_path / "run" / "checkpoints" / "step_00000002"
    report = prune(tmp_path / "d", "--layers", "2")
    assert report["before"]["layers"] == 3 and report["after"]["layers"] == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "d").config.num_hidden_layers == 2
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "prune", str(src), "--out", str(tmp_path / "e"),
                           "--heads", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--heads 1: must be a multiple of the 2 key/value heads" in proc.stderr
    llama = tmp_path / "llama"
    _model("llama").to_hf().save_pretrained(llama)
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "prune", str(llama), "--out", str(tmp_path / "f"),
                           "--hidden", "50"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "e.g. --hidden 48 or 52" in proc.stderr, proc.stderr[-2000:]


def _prune_cli(src: Path, *args: str) -> subprocess.CompletedProcess:
    import os
    import sys

    from conftest import ROOT

    return subprocess.run([sys.executable, "-m", "bigtrain", "prune", str(src), "--calib-samples", "8", "--seq-len", "32",
                           *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


def _refused_in_process(capsys: pytest.CaptureFixture, src: Path, needle: str, *args: str) -> None:
    from bigtrain.cli import _main
    from conftest import refused_in_process

    last = refused_in_process(capsys, _main, "prune", str(src), "--calib-samples", "8", "--seq-len", "32", *args)
    assert needle in last, last


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("prune_src") / "src"
    _model().to_hf().save_pretrained(src)
    return src


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_prune_never_writes_over_its_source_or_a_users_files(hf_src: Path, tmp_path: Path) -> None:
    before = _tree(hf_src)
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    other = tmp_path / "ckpt"
    other.mkdir()
    (other / "config.yaml").write_text("model: {}")
    refused(_prune_cli(hf_src, "--out", str(hf_src), "--layers", "3"), "overlaps the input")
    refused(_prune_cli(hf_src, "--out", str(hf_src / "sub"), "--layers", "3"), "overlaps the input")
    refused(_prune_cli(hf_src, "--out", str(mine), "--layers", "3"), "is an existing file")
    refused(_prune_cli(hf_src, "--out", str(other), "--layers", "3"), "not this command's own earlier output")
    assert _tree(hf_src) == before and mine.read_text() == "mine" and _tree(other) == {"config.yaml": b"model: {}"}
    out = tmp_path / "pruned"
    for _ in range(2):  # its own complete earlier output is replaced
        proc = _prune_cli(hf_src, "--out", str(out), "--layers", "3")
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "notes.txt", "pruned"]


@pytest.mark.parametrize("args,needle", [
    (["--ffn", "0"], "--ffn 0: must be at least 1"), (["--hidden", "0"], "--hidden 0"), (["--heads", "0"], "--heads 0"),
    (["--layers", "0"], "--layers 0"), (["--params", "nan"], "--params nan"), (["--params", "inf"], "--params inf"),
    (["--calib-samples", "0"], "--calib-samples 0"), (["--calib-samples", "-1"], "--calib-samples -1"),
    (["--seq-len", "0"], "--seq-len 0"),
])
def test_prune_arguments_are_checked_before_work(args: list[str], needle: str, hf_src: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    _refused_in_process(capsys, hf_src, needle, "--out", str(tmp_path / "out"), *args)
    assert not any(tmp_path.iterdir())


def test_prune_scores_of_another_model_or_garbage_are_refused(hf_src: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    import json

    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"heads": [[1.0] * 4] * 2, "neurons": [[1.0] * 96] * 4, "channels": [1.0] * 64,
                                 "layers": [1.0] * 4}))
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps({"heads": [[1.0] * 4] * 4, "neurons": [[1.0] * 96] * 4, "channels": [float("nan")] * 64,
                               "layers": [1.0] * 4}))
    missing = tmp_path / "missing.json"
    missing.write_text("{}")
    for path, needle in ((garbage, "not an importance.json"), (other, "scores of another model"),
                         (nan, "non-finite"), (missing, "not an importance.json")):
        _refused_in_process(capsys, hf_src, needle, "--out", str(tmp_path / "out"), "--layers", "3", "--scores", str(path))
    assert not (tmp_path / "out").exists()


def _broken_copy(src: Path, dest: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dest)
    edit(dest)
    return dest


def _config_edit(**fields):
    import json

    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(fields)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _write(name: str, data: bytes):
    def edit(d: Path) -> None:
        (d / name).unlink(missing_ok=True)
        (d / name).write_bytes(data)
    return edit


def _symlink_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to("/etc/passwd")


def _truncate_weights(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("edit,needle", [
    (_config_edit(hidden_size="64"), "'hidden_size' must be an integer"),
    (_config_edit(hidden_size=-64), "'hidden_size' must be an integer"),
    (_config_edit(hidden_size=64.5), "'hidden_size' must be an integer"),
    (_config_edit(num_attention_heads=0), "'num_attention_heads' must be an integer"),
    (_config_edit(head_dim=0), "'head_dim' must be an integer"),
    (_config_edit(rope_scaling={"type": "weird"}), "rope_scaling type 'weird' is unknown"),
    (_config_edit(num_hidden_layers=1000000), "'num_hidden_layers' must be an integer between 1 and 4096"),
    (_config_edit(auto_map={"AutoModelForCausalLM": "modeling.Evil"}), "custom modelling code"),
    (_write("config.json", b"[1, 2]"), "expected a JSON object, got list"),
    (_write("config.json", b"null"), "expected a JSON object, got NoneType"),
    (_write("model.safetensors", b"\xff" * 8 + b"{}"), "not a safetensors file"),
    (_write("model.safetensors", (64).to_bytes(8, "little") + b"garbage" * 10), "not a safetensors file"),
    (_truncate_weights, "do not fit its shape or the file"),
    (_symlink_weights, "links outside"),
    (_write("model.safetensors.index.json", b"{garbage"), "model.safetensors.index.json: unreadable"),
    (_write("tokenizer.json", b"{garbage"), "not a tokenizers tokenizer.json"),
])
@pytest.mark.filterwarnings("ignore")
def test_hostile_or_broken_hugging_face_directories_are_one_line_errors(edit, needle: str, hf_src: Path,
                                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _broken_copy(hf_src, tmp_path / "src", edit)
    _refused_in_process(capsys, src, needle, "--out", str(tmp_path / "out"), "--layers", "3")
    assert not (tmp_path / "out").exists()
