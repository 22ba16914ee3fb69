"""``python -m data_pipeline`` (also ``bigtrain data``): write and inspect shard sets."""

from __future__ import annotations

import argparse
import json
import os
import sys

from data_pipeline.index import DataError, load_split, read_index
from data_pipeline.text import BYTES, load_tokenizer, stdlib_files, train_bpe, write_text_shards
from data_pipeline.writer import write_digits, write_imagefolder


def build_parser(prog: str = "python -m data_pipeline") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Write and inspect webdataset shard sets.")
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write shards from a source")
    wsub = write.add_subparsers(dest="source", required=True)
    dig = wsub.add_parser("digits", help="scikit-learn's bundled 8x8 digits, upsampled (no download)")
    dig.add_argument("--out", required=True, help="output directory")
    dig.add_argument("--image-size", type=int, default=32)
    dig.add_argument("--samples-per-shard", type=int, default=256)
    dig.add_argument("--test-fraction", type=float, default=0.2)
    dig.add_argument("--seed", type=int, default=0)
    imf = wsub.add_parser("imagefolder", help="an ImageFolder tree SRC/<class>/<image>")
    imf.add_argument("src", help="source directory")
    imf.add_argument("--out", required=True, help="output directory")
    imf.add_argument("--split", default="train", help="split name (shard prefix)")
    imf.add_argument("--samples-per-shard", type=int, default=1000)
    imf.add_argument("--seed", type=int, default=0)
    txt = wsub.add_parser("text", help="token shards of CPython's standard-library sources (byte-level tokens)")
    txt.add_argument("--out", required=True, help="output directory")
    txt.add_argument("--seq-len", type=int, default=128)
    txt.add_argument("--max-bytes", type=int, default=2_000_000)
    txt.add_argument("--tokenizer", default="bytes", help="bytes, bpe:N (byte-level BPE of N tokens trained on the corpus, saved as OUT/tokenizer.json) or a tokenizer.json / directory holding one")
    txt.add_argument("--samples-per-shard", type=int, default=512)
    ins = sub.add_parser("inspect", help="print the splits, shard and sample counts of a data directory")
    ins.add_argument("dir")
    ins.add_argument("--split", action="append", help="split(s) to inspect; default: all in index.json")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m data_pipeline") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "write" and args.source == "digits":
            out = write_digits(args.out, args.image_size, args.samples_per_shard, args.test_fraction, args.seed)
            for split, shards in out.items():
                print(f"{split}: {sum(s.num_samples for s in shards)} samples in {len(shards)} shards -> {args.out}")
        elif args.command == "write" and args.source == "text":
            files = stdlib_files(args.max_bytes)
            spec = args.tokenizer
            tok = BYTES if spec == "bytes" else train_bpe(files, int(spec[4:])) if spec.startswith("bpe:") \
                else load_tokenizer(spec)
            out = write_text_shards(args.out, args.seq_len, samples_per_shard=args.samples_per_shard, files=files,
                                    tokenizer=tok)
            for split, shards in out.items():
                print(f"{split}: {sum(s.num_samples for s in shards)} sequences in {len(shards)} shards -> {args.out}")
        elif args.command == "write":
            shards = write_imagefolder(args.src, args.out, args.split, args.samples_per_shard, args.seed)
            print(f"{args.split}: {sum(s.num_samples for s in shards)} samples in {len(shards)} shards -> {args.out}")
        else:
            index = read_index(args.dir) if os.path.isdir(args.dir) else None
            splits = args.split or (sorted(index["splits"]) if index else [])
            if not splits:
                raise DataError(f"{args.dir}: no index.json; name the split(s) with --split")
            report = {}
            for split in splits:
                info = load_split(args.dir, split)
                report[split] = {
                    "shards": len(info.shards),
                    "samples": info.num_samples,
                    "num_classes": info.num_classes,
                    "damaged_shards": info.damaged_shards,
                }
            print(json.dumps(report, indent=1))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
