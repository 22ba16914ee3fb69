"""Diffusion training and sampling pieces: samplers against oracle models, guidance, the per-sample
draws of the loader, label dropout, the learned-variance bound, grids and the Frechet distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigtrain.config.schema import DiffusionConfig
from bigtrain.diffusion import schedules as S
from bigtrain.diffusion.quality import class_labels, frechet_distance, grid_image
from bigtrain.diffusion.sampling import generate, guided, sample_noise, timestep_chain
from bigtrain.models.dit import DiT, DiTArgs
from bigtrain.tasks.diffusion import DiffusionTask

POINT = torch.linspace(-0.8, 0.8, 2 * 4 * 4).view(2, 4, 4)  # the whole "data set": one image


def _oracle(prediction: str, objective: str = "ddpm", schedule: str = "linear", extra: int = 0):
    """A model that knows the data is POINT: its exact prediction at any (x_t, t)."""
    abar = S.alpha_bar(S.betas(schedule, 1000))

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x0 = POINT.expand_as(x)
        if objective == "flow":
            sigma = (t / 1000).view(-1, 1, 1, 1)
            out = (x - x0) / sigma  # eps - x0 along the straight path through x
        else:
            a = abar[t.long()]
            eps = (x - S.bcast(a.sqrt(), x) * x0) / S.bcast((1 - a).sqrt(), x)
            out = S.target(prediction, x0, eps, a)
        return torch.cat([out, torch.zeros(x.shape[0], extra, *x.shape[2:])], 1) if extra else out

    return model


@pytest.mark.parametrize("sampler,prediction,extra", [("ddim", "epsilon", 0), ("ddim", "v", 0), ("ddpm", "epsilon", 0),
                                                      ("ddpm", "sample", 0), ("ddpm", "epsilon", 2)])
def test_ddpm_samplers_recover_the_data_from_an_exact_model(sampler: str, prediction: str, extra: int) -> None:
    out = generate(_oracle(prediction, extra=extra), torch.zeros(3, dtype=torch.long), [0, 1, 2], (2, 4, 4),
                   objective="ddpm", prediction=prediction, sampler=sampler, steps=20, clip=False)
    assert torch.allclose(out, POINT.expand(3, -1, -1, -1), atol=1e-4)


def test_euler_flow_sampler_recovers_the_data_from_an_exact_velocity() -> None:
    out = generate(_oracle("", "flow"), torch.zeros(2, dtype=torch.long), [5, 6], (2, 4, 4), objective="flow", steps=7,
                   clip=False)
    assert torch.allclose(out, POINT.expand(2, -1, -1, -1), atol=1e-4)


def test_ddim_is_deterministic_and_a_sample_does_not_depend_on_its_batch() -> None:
    torch.manual_seed(0)
    model = _tiny_dit()
    kw = dict(objective="ddpm", steps=5, guidance=2.0, null=3, seed=7)
    a = generate(model, torch.tensor([0, 1, 2]), [0, 1, 2], (1, 8, 8), **kw)
    b = generate(model, torch.tensor([0, 1, 2]), [0, 1, 2], (1, 8, 8), **kw)
    c = generate(model, torch.tensor([1]), [1], (1, 8, 8), **kw)
    assert torch.equal(a, b) and torch.allclose(a[1], c[0], atol=1e-5)
    assert not torch.allclose(a[0], a[1])
    assert torch.equal(sample_noise([4], (1, 8, 8), 7), sample_noise([9, 4], (1, 8, 8), 7)[1:])


def test_timestep_chain_visits_the_noisiest_step_and_zero() -> None:
    chain = timestep_chain(1000, 50)
    assert chain[0] == 999 and chain[-1] == 0 and len(chain) == 50 and bool((chain[:-1] > chain[1:]).all())
    with pytest.raises(ValueError):
        timestep_chain(10, 11)


def _tiny_dit(learn_sigma: bool = False) -> DiT:
    model = DiT(DiTArgs(depth=2, width=32, num_heads=2, patch_size=2, input_size=8, in_channels=1, num_classes=3,
                        learn_sigma=learn_sigma))
    for p in model.parameters():  # leave adaLN-Zero's zeros: the output would not depend on the label
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_guidance_scale_one_is_the_conditional_prediction_and_others_mix_all_channels() -> None:
    torch.manual_seed(0)
    model = _tiny_dit(learn_sigma=True)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1.0, 50.0, 500.0, 999.0]), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        cond = model(x, t, y)
        assert torch.equal(guided(model, x, t, y, 1.0, model.null_class, 1), cond)
        unc = model(x, t, torch.full_like(y, model.null_class))
        out = guided(model, x, t, y, 3.0, model.null_class, 1)
    assert torch.allclose(out[:, :1], unc[:, :1] + 3.0 * (cond[:, :1] - unc[:, :1]), atol=1e-5)
    assert torch.allclose(out[:, 1:], cond[:, 1:], atol=1e-6)  # the variance channels: conditional
    assert not torch.allclose(cond, unc)


def _batch(n: int = 2000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, "noise": torch.randn(n, 1, 8, 8, generator=g),
            "label": torch.randint(0, 3, (n,), generator=g), "u": torch.rand(n, generator=g, dtype=torch.float64),
            "z": torch.randn(n, generator=g, dtype=torch.float64), "drop": torch.rand(n, generator=g, dtype=torch.float64),
            "weight": torch.ones(n)}


def test_label_dropout_rate_in_training_and_none_in_evaluation() -> None:
    model, batch = _tiny_dit(), _batch()
    train = DiffusionTask(model, DiffusionConfig(label_dropout=0.1), model.null_class)
    dropped = float((train.labels(batch) == model.null_class).float().mean())
    assert dropped == pytest.approx(0.1, abs=0.02)
    evaluation = DiffusionTask(model, DiffusionConfig(label_dropout=0.1), model.null_class, drop_labels=False)
    assert torch.equal(evaluation.labels(batch), batch["label"])


@pytest.mark.parametrize("objective,prediction,gamma", [("ddpm", "epsilon", 0.0), ("ddpm", "v", 5.0), ("flow", "epsilon", 0.0)])
def test_task_loss_is_the_weighted_mse_to_the_closed_form_target(objective: str, prediction: str, gamma: float) -> None:
    model, batch = _tiny_dit(), _batch(8)
    batch["weight"][3] = 0.0  # a substitute for a bad sample adds nothing
    cfg = DiffusionConfig(objective=objective, prediction=prediction, min_snr_gamma=gamma, label_dropout=0.0)
    task = DiffusionTask(model, cfg, model.null_class)
    got = task(batch)["loss"]
    x0, eps = batch["image"], batch["noise"]
    if objective == "flow":
        s = torch.sigmoid(batch["z"]).float()
        x, tgt, t, w = S.flow_interpolate(x0, eps, s), eps - x0, 1000 * s, torch.ones(8)
    else:
        t = (batch["u"] * 1000).long()
        a = S.alpha_bar(S.betas("linear"))[t]
        x, tgt = S.add_noise(x0, eps, a), S.target(prediction, x0, eps, a)
        w = S.min_snr_weight(a, prediction, gamma) if gamma else torch.ones(8)
    with torch.no_grad():
        per = (model(x, t.float(), batch["label"]) - tgt).pow(2).flatten(1).mean(1) * w
    keep = batch["weight"]
    assert float(got.detach()) == pytest.approx(float((per * keep).sum() / keep.sum()), rel=1e-5)


def test_variational_bound_is_zero_for_the_true_posterior_and_positive_otherwise() -> None:
    beta = S.betas("linear", 1000)
    abar = S.alpha_bar(beta)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 1, 4, 4, generator=g) * 2 - 1, torch.randn(4, 1, 4, 4, generator=g)
    t = torch.tensor([5, 100, 500, 999])
    x_t = S.add_noise(x0, eps, abar[t])
    exact = S.vlb_bits(x0, x_t, t, eps, -torch.ones_like(x0), beta, abar)  # v = -1: the posterior variance
    assert float(exact.abs().max()) < 1e-4
    wrong = S.vlb_bits(x0, x_t, t, eps + 0.3, torch.zeros_like(x0), beta, abar)
    assert bool((wrong > 5e-4).all())
    decoder = S.vlb_bits(x0, S.add_noise(x0, eps, abar[:1].expand(4)), torch.zeros(4, dtype=torch.long), eps,
                         -torch.ones_like(x0), beta, abar)
    assert bool((decoder > 0).all()) and bool(torch.isfinite(decoder).all())


def test_learned_sigma_trains_the_variance_by_the_bound_only() -> None:
    model = _tiny_dit(learn_sigma=True).train()
    task = DiffusionTask(model, DiffusionConfig(label_dropout=0.0), model.null_class, learn_sigma=True)
    out = task(_batch(8))
    assert set(out) == {"loss", "mse", "vb"}
    assert float(out["loss"].detach()) == pytest.approx(float(out["mse"] + out["vb"]), rel=1e-5)
    with pytest.raises(ValueError, match="learned variance"):
        DiffusionTask(model, DiffusionConfig(objective="flow"), model.null_class, learn_sigma=True)


def test_noised_dataset_draws_depend_on_position_only(digits_dir: str) -> None:
    from data_pipeline import GlobalOrder, ImageSpec, NoisedImageDataset, load_split

    split = load_split(digits_dir, "train")
    order = GlobalOrder([s.num_samples for s in split.shards], 0, 0)
    spec = ImageSpec(image_size=16, channels=1, num_classes=10)
    ds = NoisedImageDataset(split, order, spec, seed=3, train=True)
    a, b = ds[[0, 1, 2, 3]], ds[[2, 3]]
    for key in ("noise", "u", "z", "drop", "image"):
        assert torch.equal(a[key][2:], b[key]), key
    assert a["noise"].shape == (4, 1, 16, 16) and not torch.equal(a["noise"][0], a["noise"][1])
    other = NoisedImageDataset(split, order, spec, seed=4, train=True)[[2, 3]]
    assert not torch.equal(other["noise"], b["noise"])


def test_grid_rows_per_class_and_frechet_distance() -> None:
    labels, rows = class_labels(64, 10)
    assert rows == 10 and len(labels) == 60 and labels[:6].tolist() == [0] * 6 and labels[-1] == 9
    assert class_labels(16, None)[1] == 4
    img = grid_image(torch.rand(60, 1, 8, 8), rows)
    assert img.size[1] > img.size[0] / 2 and img.mode == "RGB"
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(m, 4 I): |m|^2 + 3 (1 + 4 - 2 * 2) = |m|^2 + 3
    b = rng.standard_normal((4000, 3)) * 2 + np.array([1.0, 0.0, 0.0])
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.1)


def _tiny_vae(path: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16), latent_channels=2,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=4, layers_per_block=1, sample_size=16)
    vae.save_pretrained(path)


def test_latent_codec_scales_the_posterior_mean_and_undoes_it_on_decode(tmp_path) -> None:
    from bigtrain.diffusion.latent import LatentCodec, latent_spec

    _tiny_vae(str(tmp_path / "vae"))
    spec = latent_spec(str(tmp_path / "vae"))
    assert (spec.channels, spec.factor, spec.scale) == (2, 2, 0.18215)
    codec = LatentCodec(str(tmp_path / "vae"), torch.device("cpu"))
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = codec.vae.encode(x).latent_dist.mean
        z = codec.encode(x)
        assert z.shape == (3, 2, 8, 8) and torch.allclose(z, mean * 0.18215)
        assert torch.allclose(codec.decode(z), codec.vae.decode(mean).sample, atol=1e-5)
    assert LatentCodec(str(tmp_path / "vae"), torch.device("cpu"), scale=0.5).spec.scale == 0.5


def test_latent_dit_trains_samples_and_checks_its_keys(tmp_path, digits_dir: str) -> None:
    import json
    import subprocess
    import sys

    from bigtrain.config import ConfigError, load_config
    from conftest import ROOT

    _tiny_vae(str(tmp_path / "vae"))
    config = tmp_path / "latent.yaml"
    config.write_text(f"model:\n  family: dit\n  vae: {tmp_path / 'vae'}\ndata:\n  dir: {digits_dir}\n")
    common = [str(config), "model.variant=debug", "model.patch_size=2", "model.image_size=16", "data.image_size=16",
              "data.augment=none", "train.global_batch_size=8", "train.steps=2", "diffusion.samples=10", "log.every_steps=1",
              "diffusion.eval_max_samples=64",
              "diffusion.sample_steps=3", f"run.dir={tmp_path / 'run'}"]
    cfg = load_config(common[0], common[1:])
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_model

    with torch.device("meta"):
        assert build_model(RunSpec.of(cfg)).sample_shape == (2, 8, 8)  # the latents, not the 16x16 images
    with pytest.raises(ConfigError, match="data.mean"):
        load_config(common[0], [*common[1:], "data.mean=[0.1]"])
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", *common], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "samples" / "step_00000002.png").is_file()
    # no terminal: the evaluation says what it is doing (its loss batches, then the denoising steps)
    assert "eval @ step 2: denoising loss: batch " in proc.stderr and "samples: step 3/3 (100%)" in proc.stderr, \
        proc.stderr[-3000:]
    from PIL import Image

    from bigtrain.report import make_report

    report = Image.open(make_report(str(tmp_path / "run")))
    assert report.size[0] == 1040 and report.size[1] > 600  # the curves, and the sample grid under them
    out = subprocess.run([sys.executable, "-m", "bigtrain", "sample", str(tmp_path / "run" / "checkpoints" / "step_00000002"),
                          "--n", "10", "--steps", "2", "--out", str(tmp_path / "g.png")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout.splitlines()[-1])["samples"] == 10, out.stderr[-2000:]
    assert "sample 10: step 2/2 (100%)" in out.stderr, out.stderr[-2000:]
    # the same run from stored latents: the encoder is skipped, the losses are the on-the-fly run's
    stored = tmp_path / "latents"
    enc = subprocess.run([sys.executable, "-m", "bigtrain", "encode-latents", *common, "--out", str(stored)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert enc.returncode == 0, enc.stderr[-2000:]
    assert json.loads(enc.stdout.splitlines()[-1])["samples"] == {"train": 1438, "test": 359}
    again = subprocess.run([sys.executable, "-m", "bigtrain", "train", *common[:-1], f"data.dir={stored}",
                            f"run.dir={tmp_path / 'stored'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "train"]

    # equal up to float rounding: the VAE encoded batches of 64 there and of 8 here
    assert losses("stored") == pytest.approx(losses("run"), rel=1e-4)
    assert (tmp_path / "stored" / "samples" / "step_00000002.png").is_file()
    # a stored set is refused by a run whose VAE scale differs (its latents would not decode)
    other = subprocess.run([sys.executable, "-m", "bigtrain", "train", *common[:-1], f"data.dir={stored}",
                            "model.latent_scale=0.5", f"run.dir={tmp_path / 'other'}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert other.returncode == 2 and "holds latents encoded with latent scale" in other.stderr, other.stderr[-2000:]
    # encode-latents never writes into (or over) the data it reads
    again = subprocess.run([sys.executable, "-m", "bigtrain", "encode-latents", *common, "--out", str(stored)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "not this command's own earlier output" in again.stderr, again.stderr[-2000:]
