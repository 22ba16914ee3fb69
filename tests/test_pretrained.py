"""``model.pretrained: DIR``: Hugging Face causal LMs (Llama, Qwen2 with its q/k/v biases, Mistral,
tied embeddings) built from local configs, saved with ``save_pretrained``, loaded into bigtrain
shard by shard, trained under several layouts, exported back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, parity
from test_resume import model_params

LM_CONFIG = ROOT / "configs" / "llm" / "stdlib_test.yaml"
# the test config sets the sizes; a pretrained directory brings its own
FROM_DIR = [f"model.{k}=0" for k in ("width", "depth", "num_heads", "num_kv_heads", "mlp_dim", "vocab_size")]
SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    root = tmp_path_factory.mktemp("hf")
    kinds = {"llama": LlamaConfig(**SHAPE), "qwen2": Qwen2Config(**SHAPE, tie_word_embeddings=False),
             "mistral": MistralConfig(**SHAPE, sliding_window=128),
             "tied": LlamaConfig(**SHAPE, tie_word_embeddings=True)}
    out = {}
    for i, (name, config) in enumerate(kinds.items()):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # norms and biases away from their 1 / 0 init, so a missed tensor shows
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model.save_pretrained(root / name)
        out[name] = root / name
    from data_pipeline.text import stdlib_files, train_bpe

    train_bpe(stdlib_files(100_000), SHAPE["vocab_size"]).hf.save(str(root / "qwen2" / "tokenizer.json"))
    return out


def _cfg(hf_dir: Path, data: str, *extra: str):
    from bigtrain.config import load_config

    return load_config(LM_CONFIG, [f"model.pretrained={hf_dir}", f"data.dir={data}", *FROM_DIR, *extra])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "tied"])
def test_logits_equal_transformers(kind: str, hf_dirs: dict[str, Path], lm_data_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    from bigtrain.distributed import LaunchEnv, ParallelState
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_parallel

    cfg = _cfg(hf_dirs[kind], lm_data_dir)
    assert (cfg.model.width, cfg.model.depth, cfg.model.vocab_size) == (64, 3, 300)  # from config.json
    model = build_parallel(RunSpec.of(cfg), ParallelState.create(cfg.parallel, LaunchEnv()), None)
    ref = AutoModelForCausalLM.from_pretrained(hf_dirs[kind], attn_implementation="sdpa")
    x = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - ref(x).logits).abs().max().item()
    assert diff <= 1e-5, diff
    assert type(model.to_hf()).__name__ == type(ref).__name__


def test_bad_pretrained_sources_are_refused(hf_dirs: dict[str, Path], lm_data_dir: str, tmp_path: Path) -> None:
    from bigtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"'model.depth' \(4\) contradicts .*, which has 3"):
        _cfg(hf_dirs["llama"], lm_data_dir, "model.depth=4")
    with pytest.raises(ConfigError, match="ties its input and output embeddings, which parallel.tp > 1 would"):
        _cfg(hf_dirs["tied"], lm_data_dir, "parallel.tp=2")
    with pytest.raises(ConfigError, match="has neither a config.json"):
        _cfg(tmp_path, lm_data_dir)
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="is a GPT2LMHeadModel; supported: LlamaForCausalLM"):
        _cfg(other, lm_data_dir)
    pickled = tmp_path / "bin_only"
    pickled.mkdir()
    (pickled / "config.json").write_text((hf_dirs["llama"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    from bigtrain.families.llama.pretrained import weight_files

    with pytest.raises(ConfigError, match="only pytorch_model.bin, a pickle, which is never loaded"):
        weight_files(str(pickled))


def test_sharded_loading_matches_one_process_under_fsdp_tp_pp(hf_dirs: dict[str, Path], lm_data_dir: str,
                                                             tmp_path: Path) -> None:
    """Every layout starts from exactly the pretrained weights (initial parameters equal to the
    single-process load, bit for bit) and trains like one process; under ZeRO-3 each rank reads
    half of the elements."""
    overrides = [f"model.pretrained={hf_dirs['qwen2']}", f"data.dir={lm_data_dir}", *FROM_DIR, "train.steps=3",
                 "checkpoint.every_steps=0", "parallel.timeout_s=120"]
    layouts = [["parallel.zero=3"], ["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.pp=2"]]
    results, ref, stderr = parity(LM_CONFIG, overrides, layouts, tmp_path)
    for name, r in results.items():
        assert r["initial_param_max_abs_diff"] == 0.0, name
        assert r["max_loss_rel_diff"] <= 1e-5 and r["param_update_rel_diff"] <= 2e-5, (name, r)
    total = sum(p.numel() for p in torch.load(ref, weights_only=False)["initial"].values())
    # rank 0 logs what it read, layout by layout: under ZeRO-3 its half of every tensor's rows
    read = [int(n) for n in re.findall(r"loaded .*?: \d+ tensors, (\d+) elements on this rank", stderr)]
    assert len(read) == len(layouts) and 0.45 * total <= read[0] <= 0.55 * total, (read, total)


def test_train_and_export_back_to_hugging_face(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from bigtrain.models.causal_lm import CausalLM
    from bigtrain.families.llama.pretrained import hf_config

    """configs/llm/from_hf.yaml: the model's own tokenizer.json writes the data (qwen2), or bytes (tied)."""
    for kind, tokenizer in (("qwen2", "model"), ("tied", "bytes")):
        run = tmp_path / kind
        common = [f"model.pretrained={hf_dirs[kind]}", f"data.dir={tmp_path / kind}_data", f"run.dir={run}",
                  f"data.tokenizer={tokenizer}", "train.steps=3", "checkpoint.every_steps=0", "eval.final=false",
                  "log.progress=false"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", str(ROOT / "configs" / "llm" / "from_hf.yaml"),
                               *common], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if tokenizer == "model":  # the shards were written with the model's BPE (fewer, 300-token sequences)
            assert (Path(f"{tmp_path / kind}_data") / "index.json").read_text().count("tokenizer.json") >= 1
        ckpt, out = run / "checkpoints" / "step_00000003", tmp_path / f"{kind}_hf"
        proc = subprocess.run([sys.executable, "-m", "bigtrain", "export", str(ckpt), "--format", "hf", "--out",
                               str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        exported = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa")
        original = AutoModelForCausalLM.from_pretrained(hf_dirs[kind])
        assert type(exported) is type(original)
        assert exported.config.tie_word_embeddings == original.config.tie_word_embeddings
        trained = CausalLM(hf_config(type("M", (), {"pretrained": str(hf_dirs[kind])})()))
        state = model_params(ckpt)
        missing, _ = trained.load_state_dict(state, strict=False)
        assert set(missing) <= {"lm_head.weight"}  # tied: one tensor under two names
        x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            diff = (exported(x).logits - trained(x)).abs().max().item()
            moved = (exported(x).logits - original(x).logits).abs().max().item()
        assert diff <= 1e-5 and moved > 1e-4, (kind, diff, moved)
