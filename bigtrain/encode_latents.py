"""Precompute the VAE latents of a latent-diffusion config's data, once, into a shard set.

``bigtrain encode-latents CONFIG [key=value ...] --out DIR [--batch 64] [--device cpu|cuda]``

Every sample of the train and eval splits (in stored order, no augmentation) is encoded by the
config's ``model.vae`` exactly as training would encode it on the fly (posterior mean x scale) and
written with its label as ``KEY.latent.npy`` + ``KEY.cls`` webdataset shards with an index. Train
with ``data.dir=DIR`` (and the same ``model.vae``, which still decodes the samples): the loader sees
``latent.npy`` members and skips the encoder, the per-sample noise is drawn as before, so the
losses equal the on-the-fly run's. Augmentation does not apply to stored latents. The set is
written into a temporary directory and renamed when complete; an existing DIR is never touched.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Iterator

import numpy as np
from bigtrain.config import ConfigError, load_config
from bigtrain.config.core import help_text


def main(argv: list[str]) -> int:
    from bigtrain.families import RunSpec
    from bigtrain.families.image_diffusion import diffusion_spec, latent_codec
    from bigtrain.recipes import ensure_data, load_splits
    from data_pipeline import sequential_batches
    from data_pipeline.writer import write_member_shards, write_set_atomically

    ap = argparse.ArgumentParser(prog="bigtrain encode-latents", description=help_text(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value")
    ap.add_argument("--out", required=True, help="the new shard set's directory (must not exist or be empty)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    from bigtrain.outputs import check_output, device_arg

    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: must be at least 1")
    device = device_arg(args.device)
    cfg = load_config(args.config, args.overrides)
    if not getattr(cfg.model, "vae", ""):
        raise ConfigError(f"encode-latents needs a latent-diffusion config (model.vae set; model.family={cfg.model.family})")
    # a new set only: nothing is overwritten, and the output may not sit in (or hold) the data or the VAE
    check_output(args.out, "--out", "dir", sources=(cfg.data.dir, cfg.model.vae))
    ensure_data(RunSpec.of(cfg))
    splits = dict(zip((cfg.data.train_split, cfg.data.eval_split), load_splits(cfg)))
    codec = latent_codec(cfg, device)
    spec = diffusion_spec(cfg, train=False)
    t0, counts = time.perf_counter(), {}

    def samples(name: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        n = 0
        for batch in sequential_batches(splits[name], spec, args.batch):
            keep = batch["weight"] > 0  # unreadable samples are left out (counted by the loader's warnings)
            latents = codec.encode(batch["image"][keep].to(device)).float().cpu().numpy()
            for z, label in zip(latents, batch["label"][keep].tolist()):
                buf = io.BytesIO()
                np.save(buf, z, allow_pickle=False)
                yield f"{n:09d}", {"latent.npy": buf.getvalue(), "cls": str(label).encode()}
                n += 1
        counts[name] = n

    def write(directory: str) -> None:
        extra = {"num_classes": cfg.model.num_classes,
                 "latents": {"vae": os.path.abspath(cfg.model.vae), "scale": codec.spec.scale,
                             "image_size": cfg.data.image_size, "source": os.path.abspath(cfg.data.dir)}}
        for name in splits:
            write_member_shards(samples(name), directory, name, cfg.data.samples_per_shard, extra)

    write_set_atomically(args.out, write)
    print(json.dumps({"out": args.out, "samples": counts, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0
