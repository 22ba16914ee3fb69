from pathlib import Path

import pytest

from bigtrain.config import Config, ConfigError, describe, dump_yaml, load_config
from bigtrain.config.core import from_dict

from conftest import ROOT, required_values

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs() -> None:
    assert any(p.name == "digits_tiny.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_config_validates_and_has_header(path: Path, tmp_path: Path) -> None:
    """A config that leaves keys ``???`` is refused without them (naming each) and valid with them."""
    given = required_values(path, tmp_path)
    if given:
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert all(repr(v.split("=")[0]) in str(err.value) for v in given) and "must be given" in str(err.value)
        assert all(v.split("=")[0] in path.read_text().split("Command:")[1].splitlines()[0] for v in given), \
            f"{path}'s Command: line gives the required keys"
    cfg = load_config(path, given)
    assert isinstance(cfg, Config)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header).lower()
    for word in ("command:", "hardware:", "time:", "result:"):
        assert word in text, f"{path} header lacks {word!r}"


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["train.steps=7", "optim.lr=3e-4", "model.head=gap", "eval.fewshot_shots=[2,4]"])
    assert cfg.train.steps == 7 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.head == "gap" and cfg.eval.fewshot_shots == [2, 4]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
        ("modle.head=map", "unknown config key 'modle.head'"),
        ("model.head=mapp", "'mapp' is not one of"),
        ("train.steps=ten", "config key 'train.steps': expected an integer"),
        ("train.steps=true", "config key 'train.steps': expected an integer"),
        ("log.wandb=maybe", "config key 'log.wandb': expected true/false"),
        ("train.steps=0", "config key 'train.steps' must be > 0"),
        ("model.patch_size=5", "model.patch_size"),
        ("data.channels=3", "model.in_channels"),
        ("novalue", "must look like key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 3\n  global_batch: 8\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.global_batch' \(did you mean 'train.global_batch_size'\?\)"):
        load_config(p)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_batch_divisibility_checked() -> None:
    with pytest.raises(ConfigError, match="not divisible by 'train.micro_batch_size'"):
        load_config(None, ["train.global_batch_size=10", "train.micro_batch_size=4"])


def test_schedule_longer_than_run_rejected() -> None:
    with pytest.raises(ConfigError, match="exceed 'train.steps'"):
        load_config(None, ["train.steps=10", "schedule.warmup_steps=8", "schedule.cooldown_steps=5"])


@pytest.mark.parametrize("config,steps", [("configs/diffusion/dit_digits.yaml", 20), (None, 10), (None, 1)])
def test_a_schedule_refusal_names_a_fix_that_loads(config: str | None, steps: int) -> None:
    """Trying a shipped config small: the refusal names the keys and values that fix it, and
    those values are accepted (``train.steps>=N`` and a scaled warm-up/cool-down)."""
    from conftest import ROOT

    path = ROOT / config if config else None
    extra = [] if config else ["schedule.warmup_steps=8", "schedule.cooldown_steps=5"]
    with pytest.raises(ConfigError) as err:
        load_config(path, [f"train.steps={steps}", *extra])
    message = str(err.value)
    need = int(message.split("set train.steps>=")[1].split(",")[0])
    fix = message.split("e.g. ")[1].split()
    assert all(k.startswith("schedule.") for k in fix), message
    load_config(path, [f"train.steps={steps}", *extra, *fix])
    load_config(path, [f"train.steps={need}", *extra])


def test_dump_roundtrip_and_describe() -> None:
    import yaml

    cfg = load_config(None, ["train.steps=9"])
    again = from_dict(Config, yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    rows = describe(Config)
    keys = {r[0] for r in rows}
    assert {"run.dir", "train.steps", "train.seed", "train.global_batch_size", "checkpoint.every_steps", "resume", "data.dir"} <= keys
    assert all(r[3] for r in rows), "every field documents itself"


def test_describe_shows_bounds_and_the_documented_exit_code() -> None:
    from bigtrain.config import Config, describe

    rows = {key: help_ for key, _, _, help_ in describe(Config)}
    assert rows["log.every_steps"].endswith("[> 0]")
    assert rows["data.max_error_fraction"].endswith("[>= 0, <= 1]")
    assert "exit 3" in rows["train.max_rollbacks"], "the code exits 3 when rollbacks are exhausted"


def test_batch_plan_is_the_one_place_batches_are_divided() -> None:
    from bigtrain.config.batching import plan_batches

    cfg = load_config(ROOT / "configs" / "vit" / "digits_test.yaml")  # global 32, micro 16
    assert plan_batches(cfg, dp=2) == plan_batches(cfg, dp=2, pp=1)
    p = plan_batches(cfg, dp=2)
    assert (p.per_rank, p.micro, p.accum_steps, p.pipeline_microbatches) == (16, 16, 1, 0)
    p = plan_batches(cfg, dp=1, pp=2)
    assert (p.per_rank, p.micro, p.accum_steps, p.pipeline_microbatches) == (32, 32, 1, 2)
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size 3"):
        plan_batches(cfg, dp=3)
    with pytest.raises(ConfigError, match="'train.micro_batch_size' \\(16\\) does not divide the per-rank batch 8"):
        plan_batches(cfg, dp=4)
    zbv = load_config(ROOT / "configs" / "vit" / "digits_test.yaml", ["parallel.pp_schedule=zbv", "parallel.microbatches=3",
                                                                       "train.global_batch_size=36", "train.micro_batch_size=0"])
    with pytest.raises(ConfigError, match="zbv needs pipeline micro-batches \\(3\\) divisible by parallel.pp=2"):
        plan_batches(zbv, dp=1, pp=2)
