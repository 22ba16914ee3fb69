"""The model-family registry: what a family declares (:class:`Family`, its ``model.*`` section
:class:`ModelConfig`) and how a name in ``model.family`` finds it. It sits low (with the config
schema, which resolves a model section through it) and imports no family, checkpoint or model
code; :mod:`bigtrain.families` re-exports it with the sources and evaluation context families use.

Model families: everything bigtrain needs to know about one kind of model, in one object.

A family (:class:`Family`) declares its ``model.*`` config section, size presets (each family has
``debug``), a builder that works on the ``meta`` device, its parallelize function, whether it
splits into pipeline stages, its tasks, training data and evaluator, FLOPs per sample, data
sources and exporters, plus optional CLI subcommands and benchmarks. The core looks families up
by the name in ``model.family`` and never names one itself.

Where families come from, in the order a name is looked up:

* :func:`register_family` (in-process, e.g. a script or a test);
* bigtrain's own: every subpackage of ``bigtrain.families`` that defines ``FAMILY``;
* the ``bigtrain.families`` entry-point group of installed packages
  (``[project.entry-points."bigtrain.families"] mlp = "mypkg.family:FAMILY"``; the entry point
  is named like the family);
* ``model.family: "package.module:ATTRIBUTE"`` — imported on use, in every rank, when the *user's*
  config or command line names it. A config that came with a checkpoint (read inside
  :func:`reading_saved_config`) may name such a family only if the user named the same reference
  in this process or trusted it explicitly (:func:`trust_family`, ``--trust-family``): a checkpoint
  is data, and importing a module it names would run whatever code sits under that name.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bigtrain.config.core import ConfigError, doc

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bigtrain.config.schema import Config
    from bigtrain.distributed.mesh import ParallelState
    from bigtrain.eval.context import EvalContext
    from data_pipeline import SplitInfo

ENTRY_POINT_GROUP = "bigtrain.families"
BUILTIN_PACKAGE = "bigtrain.families"
log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """The keys every model section has; a family's config class adds its own (``model.depth``, ...)."""

    family: str = doc(
        "vit", "Model family: a registered name (`bigtrain families` lists them) or 'package.module:ATTRIBUTE' "
        "naming a bigtrain.families.Family. The family decides the other model.* keys.",
    )
    variant: str = doc("custom", "Size preset of the family (every family has 'debug'); presets fill the size keys "
                       "left at 0. 'custom' = sizes from the keys.")



@dataclass(frozen=True)
class Pretrained:
    """Starting weights from outside bigtrain (e.g. a Hugging Face directory). ``sizes``: the
    ``model.*`` size keys the source dictates. ``load(model)``: fill a materialized, already
    parallelized model, each rank reading only the shards it holds; returns what it read."""

    path: str
    sizes: Mapping[str, Any]
    load: Callable[[nn.Module], dict[str, int]]


@dataclass(frozen=True)
class Family:
    """One model family. Only the first seven fields are required.

    * ``config``: a dataclass subclassing :class:`bigtrain.config.schema.ModelConfig`; its fields are
      the ``model.*`` keys of this family (documented with :func:`bigtrain.config.core.doc`).
    * ``build(model_cfg) -> nn.Module``: the one-device model; must work under
      ``torch.device("meta")`` (sizes and FLOPs without allocating). The caller seeds torch.
      Repeated blocks live in ``model.blocks`` (a ``ModuleDict`` keyed "0", "1", ...): the FSDP units,
      activation-checkpointing and compile units, and the pipeline split.
    * ``tasks``: task name -> ``factory(cfg, model) -> Task``; the first is the default ``task``.
    * ``train_data(cfg, split) -> ShardBatchDataset``; ``evaluator(cfg, train, eval, ctx)`` with a
      ``best_metric`` attribute; ``flops_per_sample(model, model_cfg)`` for one training sample
      (forward + backward) of the unsharded model.
    * ``data_sources``: ``data.source`` name -> ``writer(cfg, directory)`` writing a shard set.
    * ``presets``: ``model.variant`` name -> values for the keys left at 0 (must include ``debug``).
    * ``debug_overrides``: ``key=value`` strings that make the ``debug`` preset a complete run on
      embedded data (used by the tests and the GPU check for every family).
    * ``parallelize(model, ps, cfg, param_dtype)``: TP/SP, activation checkpointing, compile, FSDP;
      None = :func:`bigtrain.distributed.parallelize_blocks` without tensor parallelism.
    * ``check_layout(model, cfg, tp)``: what ``parallelize`` would refuse for a tensor-parallel degree
      (heads or widths not divisible by it, ...), without a process group: ``bigtrain estimate`` runs
      it, so it never calls "fits" a layout that ``train`` refuses.
    * ``pipeline``: the model implements ``prune_for_stage(blocks, first, last)``.
    * ``validate(cfg)``: cross-section checks (e.g. image size = data image size).
    * ``export_hf(model, out_dir)``: write a Hugging Face directory (``bigtrain export --format hf``).
    * ``commands`` / ``benchmarks``: name -> ``main(argv) -> exit code``, reachable as
      ``bigtrain NAME ...`` and ``bigtrain bench NAME ...``.
    * ``sample_unit(model_cfg) -> (unit, items per sample)``, e.g. ``("tokens", seq_len)``.
    * ``example_batch(model_cfg, batch_size, generator)``: a synthetic batch shaped like the loader's
      (benchmarks and the GPU check measure speed on it).
    * ``pretrained(model_cfg) -> Pretrained | None``: starting weights named in the section; the
      model is then built on ``meta``, parallelized, materialized empty and filled by ``load``.
    """

    name: str
    config: type
    build: Callable[[Any], nn.Module]
    tasks: Mapping[str, Callable[[Config, nn.Module], nn.Module]]
    train_data: Callable[[Config, SplitInfo], Any]
    evaluator: Callable[[Config, SplitInfo, SplitInfo, EvalContext], Any]
    flops_per_sample: Callable[[nn.Module, Any], float]
    description: str = ""
    data_sources: Mapping[str, Callable[[Config, str], None]] = field(default_factory=dict)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    debug_overrides: tuple[str, ...] = ()
    parallelize: Callable[[nn.Module, ParallelState, Config, torch.dtype | None], nn.Module] | None = None
    check_layout: Callable[[nn.Module, Config, int], None] | None = None
    pipeline: bool = False
    validate: Callable[[Config], None] | None = None
    export_hf: Callable[[nn.Module, str], None] | None = None
    commands: Mapping[str, Callable[[list[str]], int]] = field(default_factory=dict)
    benchmarks: Mapping[str, Callable[[list[str]], int]] = field(default_factory=dict)
    sample_unit: Callable[[Any], tuple[str, int]] = lambda model_cfg: ("samples", 1)
    example_batch: Callable[[Any, int, Any], dict[str, Any]] | None = None
    pretrained: Callable[[Any], Pretrained | None] | None = None

    def __post_init__(self) -> None:
        problems = []
        if not (dataclasses.is_dataclass(self.config) and issubclass(self.config, ModelConfig)):
            problems.append("config must be a dataclass subclassing bigtrain.config.schema.ModelConfig")
        if not self.tasks:
            problems.append("tasks must name at least one task")
        if "debug" not in self.presets:
            problems.append("presets must include 'debug'")
        if ":" in self.name or not self.name:
            problems.append("name must be non-empty and contain no ':'")
        if problems:
            raise TypeError(f"family {self.name!r}: " + "; ".join(problems))

    @property
    def default_task(self) -> str:
        return next(iter(self.tasks))


class lazy:  # noqa: N801 - used like a function: ``parallelize=lazy("pkg.module:function")``
    """A family hook named ``"package.module:attribute"`` and imported on its first call: a family's
    ``__init__`` stays free of torch and model code, so resolving and validating a config
    (``bigtrain config show``, ``--help``) loads neither. Only for hooks of bigtrain's own code or the
    family's package (the layering test reads these strings as imports); attributes of the target
    (e.g. a task factory's ``uses_teacher``) are looked up on it."""

    def __init__(self, ref: str) -> None:
        module, _, attr = ref.partition(":")
        if not module or not attr:
            raise ValueError(f"lazy({ref!r}): expected 'package.module:attribute'")
        self.ref = ref
        self._target: Callable[..., Any] | None = None

    @property
    def target(self) -> Callable[..., Any]:
        if self._target is None:
            module, _, attr = self.ref.partition(":")
            self._target = getattr(importlib.import_module(module), attr)
        return self._target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.target(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("ref", "target"):
            raise AttributeError(name)
        return getattr(self.target, name)

    def __repr__(self) -> str:
        return f"lazy({self.ref!r})"


_REGISTRY: dict[str, Family] = {}
_SCANNED = {"builtin": False, "entry_points": False}
# 'module:ATTRIBUTE' references the user named (config, command line, --trust-family) in this process
_TRUSTED_REFS: set[str] = set()
# the file being read while a saved (untrusted) config is parsed; None = the user's own config
_SAVED_SOURCE: ContextVar[str | None] = ContextVar("bigtrain_saved_config_source", default=None)


def trust_family(ref: str) -> None:
    """Allow saved configs (checkpoints) to name the family ``module:ATTRIBUTE`` in this process."""
    _TRUSTED_REFS.add(ref)


def add_trust_argument(parser: Any) -> None:
    """``--trust-family MODULE:ATTRIBUTE`` (repeatable) for commands that rebuild a checkpoint's model."""
    parser.add_argument("--trust-family", action="append", default=[], metavar="MODULE:ATTRIBUTE",
                        help="a family the checkpoint names by module that may be imported (its code runs); "
                             "without it such a checkpoint is refused")


def apply_trust_argument(args: Any) -> None:
    for ref in args.trust_family:
        if ":" not in ref:
            raise ConfigError(f"--trust-family {ref!r}: expected 'package.module:ATTRIBUTE'")
        trust_family(ref)


@contextmanager
def reading_saved_config(source: str) -> Iterator[None]:
    """While parsing a config that came with a checkpoint (``source``: its file), family references
    of the ``module:ATTRIBUTE`` form are refused unless the user trusted them: nothing is imported
    because a file of a checkpoint says so."""
    token = _SAVED_SOURCE.set(source)
    try:
        yield
    finally:
        _SAVED_SOURCE.reset(token)


def register_family(family: Family, replace: bool = False) -> Family:
    """Make ``family`` known by its name (``model.family: NAME``). A different family under a
    taken name is refused unless ``replace``."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family needs a bigtrain.families.Family, got {type(family).__name__}")
    old = _REGISTRY.get(family.name)
    if old is not None and old is not family and not replace:
        raise ValueError(f"a different family is already registered as {family.name!r}")
    taken = {c: f.name for f in _REGISTRY.values() if f.name != family.name for c in f.commands}
    clash = sorted(set(family.commands) & set(taken))
    if clash:
        raise ValueError(f"family {family.name!r}: command(s) {clash} already registered by {taken[clash[0]]!r}")
    _REGISTRY[family.name] = family
    return family


def _scan_builtin() -> None:
    if _SCANNED["builtin"]:
        return
    _SCANNED["builtin"] = True
    # bigtrain's own families are the subpackages of bigtrain.families, imported by name here (the
    # registry sits below them: it never imports them statically)
    package = importlib.import_module(BUILTIN_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            module = importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
            if isinstance(getattr(module, "FAMILY", None), Family):
                register_family(module.FAMILY)


def _scan_entry_points() -> None:
    if _SCANNED["entry_points"]:
        return
    _SCANNED["entry_points"] = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:  # one broken installed package must not take every other family down with it
            register_family(_check_loaded(ep.load(), f"entry point {ep.name} = {ep.value}"))
        except Exception as exc:  # noqa: BLE001 - reported, and the family stays unknown
            log.warning("model family entry point %s = %s does not load: %s", ep.name, ep.value, exc)


def _check_loaded(obj: Any, where: str) -> Family:
    if callable(obj) and not isinstance(obj, Family):
        obj = obj()  # a factory function is fine too
    if not isinstance(obj, Family):
        raise ConfigError(f"{where} is a {type(obj).__name__}, not a bigtrain.families.Family")
    return obj


def _import_family(ref: str, key: str) -> Family:
    source = _SAVED_SOURCE.get()
    if source is not None and ref not in _TRUSTED_REFS:
        raise ConfigError(f"{source}: config key '{key}' names the family {ref!r} by module, and bigtrain does not "
                          f"import code named by a checkpoint's files; if you trust that module, name it yourself "
                          f"({key}={ref} on the command line) or pass --trust-family {ref}")
    _TRUSTED_REFS.add(ref)  # named by the user: a checkpoint saved by this run may name it again
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"config key 'model.family': cannot import {module_name!r} ({exc})") from None
    if not hasattr(module, attr):
        raise ConfigError(f"config key 'model.family': module {module_name!r} has no attribute {attr!r}")
    family = _check_loaded(getattr(module, attr), f"model.family={ref}")
    if _REGISTRY.get(family.name) is family:
        return family
    try:
        return register_family(family)
    except ValueError as exc:
        raise ConfigError(f"config key 'model.family': {ref} cannot be used: {exc}") from None


def family_names() -> list[str]:
    """Every family this process can find (registered, built in, entry points), sorted."""
    _scan_builtin()
    _scan_entry_points()
    return sorted(_REGISTRY)


def all_families() -> list[Family]:
    return [_REGISTRY[n] for n in family_names()]


def get_family(ref: str, key: str = "model.family") -> Family:
    """The family a config names: a registered name or ``module:attribute``; a clear ConfigError
    listing the valid names otherwise."""
    if ":" in ref:
        return _import_family(ref, key)
    if ref not in _REGISTRY:
        _scan_builtin()
    if ref not in _REGISTRY:
        _scan_entry_points()
    if ref not in _REGISTRY:
        raise ConfigError(f"config key '{key}': unknown model family {ref!r}; registered families: "
                          f"{', '.join(sorted(_REGISTRY))} (or 'package.module:ATTRIBUTE' of a Family)")
    return _REGISTRY[ref]


@dataclass(frozen=True)
class RunSpec:
    """A validated config with what its strings name resolved once: the model family, the teacher's
    family, the task. Setting up a run (the trainer, the memory estimate, benchmarks, stored
    logits) passes this down, so no builder looks a family up again from ``model.family`` (and a
    run cannot mix two resolutions of one name). ``RunSpec.of(cfg)`` is cheap: the config's own
    validation already imported the families."""

    cfg: Config
    family: Family
    teacher_family: Family | None = None

    @classmethod
    def of(cls, cfg: Config) -> RunSpec:
        teacher = get_family(cfg.teacher.family, "teacher.family") if cfg.teacher.family else None
        return cls(cfg, get_family(cfg.model.family), teacher)

    @property
    def task(self) -> Callable[..., nn.Module]:
        """The objective's factory: ``task(cfg, model)``, or ``task(cfg, model, teacher)``."""
        return self.family.tasks[self.cfg.task]

    @property
    def uses_teacher(self) -> bool:
        return bool(getattr(self.task, "uses_teacher", False))

    def section(self, name: str) -> tuple[Any, Family]:
        """A model section (``model`` or ``teacher``) and the family that builds it."""
        family = self.family if name == "model" else self.teacher_family
        if family is None:
            raise ConfigError(f"config section '{name}' names no family (set {name}.family)")
        return getattr(self.cfg, name), family

    def replace(self, **changes: Any) -> RunSpec:
        """The same resolution over a changed config (e.g. the teacher's layout): sections keep
        their family, which a replaced config may not change."""
        cfg = dataclasses.replace(self.cfg, **changes)
        assert cfg.model.family == self.cfg.model.family and cfg.teacher.family == self.cfg.teacher.family
        return dataclasses.replace(self, cfg=cfg)


def find_command(name: str, kind: str = "commands") -> Callable[[list[str]], int] | None:
    """A family's CLI subcommand (or benchmark) of this name, if any family registered one."""
    for family in all_families():
        found = getattr(family, kind).get(name)
        if found is not None:
            return found
    return None


def apply_preset(section: Any, family: Family, key: str = "model") -> None:
    """Fill the size keys the user left at 0 (or [], lists) from the pretrained source, else from the
    ``model.variant`` preset, in place. A key set to something else than the source says is an error."""
    try:
        source = family.pretrained(section) if family.pretrained is not None else None
    except ConfigError as exc:  # the family names its own section 'model.*'; this one may be 'teacher.*'
        raise ConfigError(str(exc).replace("'model.", f"'{key}.")) from None
    if source is not None:
        for name, value in source.sizes.items():
            if getattr(section, name) not in (0, value):
                raise ConfigError(f"config key '{key}.{name}' ({getattr(section, name)}) contradicts {source.path}, "
                                  f"which has {value}: leave it unset (0)")
            setattr(section, name, value)
    variant = section.variant
    if variant == "custom":
        return
    if variant not in family.presets:
        raise ConfigError(f"config key '{key}.variant': {variant!r} is not a preset of family {family.name!r}; "
                          f"choose from {sorted(family.presets)} or 'custom'")
    for name, value in family.presets[variant].items():
        current = getattr(section, name)
        if current == 0 or current == []:  # unset: 0, or an empty list
            setattr(section, name, list(value) if isinstance(value, (list, tuple)) else value)


__all__ = ["Family", "ModelConfig", "Pretrained", "RunSpec", "add_trust_argument", "all_families", "apply_preset",
           "apply_trust_argument", "family_names", "find_command", "get_family", "lazy", "reading_saved_config",
           "register_family", "trust_family"]
