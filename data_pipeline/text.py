"""Token shards from a real text corpus on disk: a byte-level tokenizer, or a BPE tokenizer
(``tokenizers``) trained on the corpus or loaded from a ``tokenizer.json``.

The default corpus is CPython's own standard library (``*.py`` under
``sysconfig``'s stdlib path): several MB of real text on every machine with
Python, no download. Documents are joined with an end-of-text token, the token
stream is cut into sequences of ``seq_len + 1`` tokens (inputs and shifted
targets), and each sequence is one webdataset sample: ``key.tok`` (uint16 LE)
when every id fits 16 bits (vocabulary <= 65,536), else ``key.tok32`` (uint32 LE).
A BPE tokenizer is saved as ``tokenizer.json`` beside the shards.
"""

from __future__ import annotations

import os
import zlib
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from data_pipeline.index import DataError, ShardInfo
from data_pipeline.writer import write_member_shards

EOT = 256  # end-of-text token after the 256 byte values
BYTE_VOCAB = 257
EOT_TEXT = "<|endoftext|>"
U16_LIMIT = 1 << 16


def encode_bytes(text: bytes) -> np.ndarray:
    """Byte-level tokenizer: token id = byte value."""
    return np.frombuffer(text, dtype=np.uint8).astype(np.uint32)


def decode_bytes(tokens: np.ndarray) -> str:
    return bytes(int(t) for t in tokens if t < 256).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class TextTokenizer:
    """What the shard writer needs of a tokenizer: ids of a document, the end-of-text id, the
    vocabulary size, a name for the index, and the ``tokenizers`` object to save (None: bytes)."""

    encode: Callable[[bytes], np.ndarray]
    eot: int
    vocab_size: int
    name: str
    hf: object | None = None


BYTES = TextTokenizer(encode_bytes, EOT, BYTE_VOCAB, "bytes+eot")


def _wrap(tok: object, name: str) -> TextTokenizer:
    eot = tok.token_to_id(EOT_TEXT)  # type: ignore[attr-defined]
    if eot is None:
        raise DataError(f"tokenizer {name} has no {EOT_TEXT} token to separate documents")

    def encode(text: bytes) -> np.ndarray:
        return np.asarray(tok.encode(text.decode("utf-8", errors="replace")).ids, dtype=np.uint32)  # type: ignore[attr-defined]

    return TextTokenizer(encode, eot, tok.get_vocab_size(), name, tok)  # type: ignore[attr-defined]


def train_bpe(files: list[str], vocab_size: int) -> TextTokenizer:
    """A byte-level BPE tokenizer with ``vocab_size`` tokens (``<|endoftext|>`` included) trained
    on ``files`` with the ``tokenizers`` package: deterministic for the same files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 257:
        raise DataError(f"a BPE vocabulary needs more than the 256 bytes + end-of-text (got {vocab_size})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    return _wrap(tok, f"bpe{vocab_size}")


def load_tokenizer(path: str) -> TextTokenizer:
    """A ``tokenizer.json`` (or a directory holding one, e.g. a Hugging Face model's)."""
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise DataError(f"no tokenizer.json at {path}")
    try:
        tokenizer = Tokenizer.from_file(file)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions for bad files
        raise DataError(f"{file}: not a tokenizers tokenizer.json ({str(exc).splitlines()[0][:200]})") from None
    return _wrap(tokenizer, file)


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


def token_sequences(files: list[str], seq_len: int, tokenizer: TextTokenizer = BYTES) -> Iterator[np.ndarray]:
    buf = np.zeros(0, dtype=np.uint32)
    for path in files:
        with open(path, "rb") as f:
            buf = np.concatenate([buf, tokenizer.encode(f.read()), np.array([tokenizer.eot], dtype=np.uint32)])
        while len(buf) >= seq_len + 1:
            yield buf[: seq_len + 1]
            buf = buf[seq_len + 1 :]


def token_member(seq: np.ndarray, vocab_size: int) -> dict[str, bytes]:
    """One sequence as a shard member: 16-bit ids while the vocabulary fits, else 32-bit."""
    if vocab_size <= U16_LIMIT:
        return {"tok": seq.astype("<u2").tobytes()}
    return {"tok32": seq.astype("<u4").tobytes()}


def write_text_shards(
    root: str, seq_len: int = 128, max_bytes: int = 2_000_000, val_fraction: float = 0.05, samples_per_shard: int = 512,
    files: list[str] | None = None, tokenizer: TextTokenizer = BYTES, val_by: str = "sequence",
) -> dict[str, list[ShardInfo]]:
    """Write ``train`` and ``val`` token shards; ``val_by``: every 1/val_fraction-th sequence goes to
    val, or (``"file"``) whole files whose name hashes into the val fraction, so held-out text has no
    near-duplicate in training. A BPE tokenizer is saved as ``root/tokenizer.json``."""
    files = files if files is not None else stdlib_files(max_bytes)
    if not files:
        raise DataError("no text files found for the token corpus")
    every = max(2, round(1 / val_fraction))
    if val_by == "file":
        held = {f for f in files if zlib.crc32(os.path.basename(f).encode()) % every == 0}
        parts = {"train": token_sequences([f for f in files if f not in held], seq_len, tokenizer),
                 "val": token_sequences([f for f in files if f in held], seq_len, tokenizer)}
        named = [(name, i, seq) for name, seqs in parts.items() for i, seq in enumerate(seqs)]
    else:
        named = [("val" if i % every == every - 1 else "train", i, seq)
                 for i, seq in enumerate(token_sequences(files, seq_len, tokenizer))]
    splits: dict[str, list[tuple[str, dict[str, bytes]]]] = {"train": [], "val": []}
    for split, i, seq in named:
        splits[split].append((f"seq_{i:08d}", token_member(seq, tokenizer.vocab_size)))
    if min(len(v) for v in splits.values()) < 1:
        raise DataError(f"corpus too small for train and val sequences of {seq_len + 1} tokens")
    meta = {"vocab_size": tokenizer.vocab_size, "seq_len": seq_len, "tokenizer": tokenizer.name,
            "token_bits": 16 if tokenizer.vocab_size <= U16_LIMIT else 32}
    if tokenizer.hf is not None:
        os.makedirs(root, exist_ok=True)
        tokenizer.hf.save(os.path.join(root, "tokenizer.json"))  # type: ignore[attr-defined]
    return {name: write_member_shards(items, root, name, samples_per_shard, meta) for name, items in splits.items()}
