"""Causal LM path: token shards from real text, HF Llama re-housing, single-process training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, launch

LM_CONFIG = ROOT / "configs" / "llm" / "stdlib_test.yaml"


def test_text_shards_hold_real_python_source(tmp_path: Path) -> None:
    from data_pipeline import load_split
    from data_pipeline.text import BYTE_VOCAB, EOT, decode_bytes, stdlib_files, write_text_shards

    files = stdlib_files(200_000)
    assert files and all(f.endswith(".py") for f in files)
    out = write_text_shards(str(tmp_path), seq_len=32, max_bytes=200_000, samples_per_shard=100)
    train, val = load_split(str(tmp_path), "train"), load_split(str(tmp_path), "val")
    assert val.num_samples > 0 and train.num_samples > 10 * val.num_samples
    assert sum(s.num_samples for s in out["train"]) == train.num_samples
    from data_pipeline import GlobalOrder
    from data_pipeline.loader import TokenBatchDataset

    ds = TokenBatchDataset(train, GlobalOrder([s.num_samples for s in train.shards], 0, shuffle=False), 32, BYTE_VOCAB, 0, "raise")
    batch = ds[list(range(600))]
    tokens = batch["tokens"].numpy()
    assert tokens.shape == (600, 33) and tokens.max() <= EOT
    text = "".join(decode_bytes(row) for row in tokens)
    assert "def " in text and "import" in text, "these are Python sources"
    assert np.any(tokens == EOT), "documents are separated by end-of-text"


def test_hf_roundtrip_and_gqa() -> None:
    from bigtrain.models.causal_lm import CausalLM, llama_config

    torch.manual_seed(0)
    model = CausalLM(llama_config(257, 32, 2, 4, 2, 64, 32))
    x = torch.randint(0, 257, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 257)
    assert torch.allclose(model.to_hf()(x).logits, logits, atol=1e-5)
    assert list(model.layers.keys()) == ["0", "1"]
    # causal: changing a later token never changes earlier logits
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 257
    assert torch.allclose(model(y)[:, :10], logits[:, :10], atol=1e-6)


def test_lm_trains_and_resumes(tmp_path: Path) -> None:
    from bigtrain.config import load_config
    from bigtrain.metrics import MetricsLogger
    from bigtrain.recipes import build_trainer

    data = tmp_path / "data"
    cfg = load_config(LM_CONFIG, [f"data.dir={data}", f"run.dir={tmp_path / 'run'}"])
    trainer = build_trainer(cfg)
    assert trainer.fit(MetricsLogger(cfg.run.dir, True)) == 0
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert losses[0] == pytest.approx(np.log(257), abs=0.1)
    assert losses[-1] < losses[0] - 1.0, losses
    assert trainer.last_eval["eval/perplexity"] < 100
    # resume from step 10 reproduces steps 11..20 exactly
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000020")
    again = build_trainer(cfg)
    assert again.maybe_resume() == 10
    again.fit(MetricsLogger(cfg.run.dir, True, resume_step=10))
    resumed = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert resumed == losses


def test_export_hf_from_a_tensor_parallel_checkpoint(tmp_path: Path) -> None:
    """Train 2 ranks with tp=2 (sharded weights), export with `bigtrain export --format hf` in one
    process, and load it with plain transformers: logits equal bigtrain's model on the same input."""
    import subprocess
    import sys

    from transformers import LlamaForCausalLM

    from bigtrain.config import load_config
    from bigtrain.export import load_model_state
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_model

    run = tmp_path / "run"
    args = [f"data.dir={tmp_path / 'data'}", f"run.dir={run}", "train.steps=3", "checkpoint.every_steps=0",
            "eval.every_steps=0", "parallel.tp=2", "parallel.timeout_s=60"]
    proc = launch("train", str(LM_CONFIG), *args, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run / "checkpoints" / "step_00000003"
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "export", str(ckpt), "--format", "hf", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    hf = LlamaForCausalLM.from_pretrained(str(out))
    model = build_model(RunSpec.of(load_config(LM_CONFIG, args)))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(load_model_state(str(ckpt)))
    assert not torch.equal(fresh["lm_head.weight"], model.state_dict()["lm_head.weight"]), "trained weights"
    x = torch.randint(0, 257, (2, 32))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-5)


def test_vocabularies_over_65535_are_stored_as_32_bit_tokens(tmp_path: Path) -> None:
    from data_pipeline import GlobalOrder, load_split
    from data_pipeline.loader import TokenBatchDataset
    from data_pipeline.text import BYTES, TextTokenizer, stdlib_files, write_text_shards

    big = TextTokenizer(lambda b: BYTES.encode(b) + 70_000, 70_256, 70_257, "bytes+70000")
    write_text_shards(str(tmp_path), seq_len=32, samples_per_shard=100, files=stdlib_files(50_000), tokenizer=big)
    train = load_split(str(tmp_path), "train")
    order = GlobalOrder([s.num_samples for s in train.shards], 0, shuffle=False)
    tokens = TokenBatchDataset(train, order, 32, 70_257, 0, "raise")[list(range(50))]["tokens"].numpy()
    assert tokens.min() >= 70_000 and tokens.max() <= 70_256  # not wrapped to 16 bits
    ref = np.concatenate([BYTES.encode(open(f, "rb").read()) for f in stdlib_files(50_000)[:1]])[:33] + 70_000
    assert np.array_equal(tokens[0], ref)


def test_bpe_tokenizer_trained_on_the_corpus_feeds_training(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from tokenizers import Tokenizer

    from conftest import ROOT

    data, run = tmp_path / "data", tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", str(LM_CONFIG), f"data.dir={data}",
                           f"run.dir={run}", "data.tokenizer=bpe", "model.vocab_size=512", "train.steps=3",
                           "eval.every_steps=0", "log.progress=false"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((data / "index.json").read_text())
    assert json.dumps(index).count('"bpe512"') >= 1
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    assert tok.get_vocab_size() == 512 and tok.token_to_id("<|endoftext|>") is not None
    from data_pipeline import GlobalOrder, load_split
    from data_pipeline.loader import TokenBatchDataset

    train = load_split(str(data), "train")
    seq = TokenBatchDataset(train, GlobalOrder([s.num_samples for s in train.shards], 0, shuffle=False), 64, 512, 0,
                            "raise")[[0]]["tokens"][0].tolist()
    from data_pipeline.text import stdlib_files

    text = tok.decode(seq)  # the corpus' first 65 tokens: the start of its first file, round-tripped
    assert len(text) > 65 and open(stdlib_files(2_000_000)[0]).read().startswith(text), text
    with pytest.raises(Exception, match="set model.vocab_size above 257"):
        from bigtrain.config import load_config

        load_config(LM_CONFIG, ["data.tokenizer=bpe"])


def test_pipeline_stage_inputs_are_contiguous() -> None:
    """torch 2.11's pipeline schedules check the strides of stage 0's input against the planned
    (T, 1); a ``tokens[:, :-1]`` view has (T + 1, 1) and failed Llama + PP at its first step there."""
    from bigtrain.tasks.causal_lm import CausalLMTask

    tokens = torch.arange(2 * 65).view(2, 65)
    inputs = CausalLMTask.pipeline_inputs(None, {"tokens": tokens})  # type: ignore[arg-type]
    assert inputs.shape == (2, 64) and inputs.is_contiguous() and inputs.stride() == (64, 1)
    assert torch.equal(inputs, tokens[:, :-1])
