"""Token shards from a real text corpus on disk, with a byte-level tokenizer.

The default corpus is CPython's own standard library (``*.py`` under
``sysconfig``'s stdlib path): several MB of real text on every machine with
Python, no download. Documents are joined with an end-of-text token, the token
stream is cut into sequences of ``seq_len + 1`` tokens (inputs and shifted
targets), and each sequence is one webdataset sample ``key.tok`` (uint16 LE).
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator

import numpy as np

from data_pipeline.index import DataError, ShardInfo
from data_pipeline.writer import write_member_shards

EOT = 256  # end-of-text token after the 256 byte values
BYTE_VOCAB = 257


def encode_bytes(text: bytes) -> np.ndarray:
    """Byte-level tokenizer: token id = byte value."""
    return np.frombuffer(text, dtype=np.uint8).astype(np.uint16)


def decode_bytes(tokens: np.ndarray) -> str:
    return bytes(int(t) for t in tokens if t < 256).decode("utf-8", errors="replace")


def stdlib_files(max_bytes: int) -> list[str]:
    """Sorted stdlib ``*.py`` files (tests and site-packages excluded) up to ``max_bytes`` in total."""
    root = sysconfig.get_paths()["stdlib"]
    found, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idle_test", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                size = os.path.getsize(path)
                if total + size > max_bytes:
                    return found
                found.append(path)
                total += size
    return found


def token_sequences(files: list[str], seq_len: int) -> Iterator[np.ndarray]:
    buf = np.zeros(0, dtype=np.uint16)
    for path in files:
        with open(path, "rb") as f:
            buf = np.concatenate([buf, encode_bytes(f.read()), np.array([EOT], dtype=np.uint16)])
        while len(buf) >= seq_len + 1:
            yield buf[: seq_len + 1]
            buf = buf[seq_len + 1 :]


def write_text_shards(
    root: str, seq_len: int = 128, max_bytes: int = 2_000_000, val_fraction: float = 0.05, samples_per_shard: int = 512,
    files: list[str] | None = None,
) -> dict[str, list[ShardInfo]]:
    """Write ``train`` and ``val`` token shards (every 1/val_fraction-th sequence goes to val)."""
    files = files if files is not None else stdlib_files(max_bytes)
    if not files:
        raise DataError("no text files found for the token corpus")
    seqs = list(token_sequences(files, seq_len))
    if len(seqs) < 2:
        raise DataError(f"corpus too small for sequences of {seq_len + 1} tokens")
    every = max(2, round(1 / val_fraction))
    splits: dict[str, list[tuple[str, dict[str, bytes]]]] = {"train": [], "val": []}
    for i, seq in enumerate(seqs):
        split = "val" if i % every == every - 1 else "train"
        splits[split].append((f"seq_{i:08d}", {"tok": seq.astype("<u2").tobytes()}))
    meta = {"vocab_size": BYTE_VOCAB, "seq_len": seq_len, "tokenizer": "bytes+eot"}
    return {name: write_member_shards(items, root, name, samples_per_shard, meta) for name, items in splits.items()}
