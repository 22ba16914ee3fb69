"""Shared fixtures: one small digits shard set per test session, and config helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bigtrain.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = ROOT / "configs" / "vit" / "digits_test.yaml"

# One thread per test process keeps timings stable on the 2-core CI machine and
# results independent of how many tests run at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from data_pipeline.writer import write_digits

    root = str(tmp_path_factory.mktemp("digits16"))
    write_digits(root, image_size=16, samples_per_shard=128, seed=0)
    return root


@pytest.fixture
def tiny_cfg(digits_dir: str, tmp_path: Path):
    """``tiny_cfg("train.steps=4", ...)`` -> Config of the test config in a fresh run dir."""

    def make(*overrides: str) -> Config:
        return load_config(TEST_CONFIG, [f"data.dir={digits_dir}", f"run.dir={tmp_path / 'run'}", *overrides])

    return make
