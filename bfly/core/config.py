"""Typed configuration: dataclasses, filled from a YAML file and `key=value` overrides.

Unknown keys and values of the wrong type are errors that name the key (and the file).
The resolved config is plain data: it is saved as `config.yaml` in the run directory and in
every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bfly.core.models import MODEL_NAMES

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

SEED_KEY = "train.seed"  # what tells the runs of one setting apart in a grid


class ConfigError(ValueError):
    pass


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that `10:13` is the string it looks like (train.profile_steps), not
    the YAML 1.1 base-60 integer 613."""


_INT = "tag:yaml.org,2002:int"
YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _INT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, operational: bool = False) -> Any:
    """operational: the key changes how a run executes, not what it computes; a resume may change it freely
    (every other key changes the optimisation or the data: a resume refuses to change it unless allowed)."""
    meta = {"help": help, "choices": choices, "operational": operational}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = _opt("resnet50", "architecture (resnet_tiny: a small ResNet for quick try-outs and tests)", MODEL_NAMES)
    zero_init_residual: bool = _opt(True, "ResNet: zero-init the last BN of each block")
    dropout: float = _opt(0.5, "VGG: dropout in the classifier")
    sync_bn: bool = _opt(True, "SyncBatchNorm when world size > 1 (CPU and GPU)")
    channels_last: bool = _opt(
        True, "channels-last memory format (faster convolutions, bf16 on the CPU above all)", operational=True
    )
    compile: bool = _opt(False, "torch.compile the model", operational=True)


@dataclass
class DataConfig:
    root: str = _opt(
        "data/butterfly-mini", "dataset folder (course or Kaggle CSV layout, or class folders)", operational=True
    )
    input: str = _opt("pil", "input path: PIL workers, or decoded cache + GPU augmentation", ("pil", "cached"))
    preset: str = _opt(
        "course",
        "train augmentation preset: course = the course report's recipe, timm = timm's ImageNet recipe",
        ("course", "timm"),
    )
    image_size: int = _opt(224, "training/eval image size (square)")
    randaugment: str = _opt("rand-m9-mstd0.5-inc1", "timm preset: RandAugment spec")
    reprob: float = _opt(0.25, "timm preset: random erasing probability")
    crop_scale_min: float = _opt(0.25, "cached input: random-resized-crop minimum area fraction")
    mixup: float = _opt(0.0, "mixup alpha (0 = off)")
    cutmix: float = _opt(0.0, "cutmix alpha (0 = off)")
    workers: int = _opt(4, "DataLoader workers per process", operational=True)
    pin_memory: bool = _opt(True, "pin host memory (CUDA only)", operational=True)
    cache_dir: str = _opt("", "cached input: where decoded arrays live (default: <root>/.bfly-cache)", operational=True)
    cache_placement: str = _opt(
        "auto",
        "cached input: where the decoded split is kept; auto = GPU memory if it "
        "fits in a quarter of the free memory, else host memory",
        ("auto", "device", "host"),
        operational=True,
    )


@dataclass
class OptimConfig:
    name: str = _opt("sgd", "optimizer", ("sgd", "adamw"))
    lr: float = _opt(0.1, "peak learning rate for the global batch")
    min_lr: float = _opt(0.0, "learning rate at the end of the cosine")
    warmup_epochs: float = _opt(3.0, "linear warmup length in epochs")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(True, "SGD Nesterov momentum")
    betas: list[float] = _opt([0.9, 0.999], "AdamW betas")
    weight_decay: float = _opt(5e-5, "weight decay (never on norm layers and biases)")
    clip_grad_norm: float = _opt(0.0, "clip gradient norm (0 = off)")
    label_smoothing: float = _opt(0.0, "label smoothing")


@dataclass
class TrainConfig:
    epochs: int = _opt(30, "epochs")
    batch_size: int = _opt(256, "global batch per optimizer step (kept when the world size changes)")
    micro_batch_size: int = _opt(0, "per-process batch per forward pass; 0 = batch_size / world size")
    eval_batch_size: int = _opt(0, "per-process eval batch; 0 = the micro batch size", operational=True)
    amp: str = _opt("auto", "mixed precision: auto = bf16 on CUDA, off on CPU", ("auto", "bf16", "fp16", "off"))
    ema_decay: float = _opt(0.0, "EMA of weights, evaluated instead of the raw model (0 = off)")
    seed: int = _opt(0, "seed for init, data order and augmentation")
    deterministic: bool = _opt(False, "deterministic kernels (slower on CUDA)", operational=True)
    log_every: int = _opt(10, "steps between progress/log lines (and signal checks under DDP)", operational=True)
    checkpoint_every_steps: int = _opt(0, "also write last.pt every N steps (0 = off)", operational=True)
    checkpoint_every_epochs: int = _opt(
        1, "write last.pt every N epochs (and always at the end and on a stop)", operational=True
    )
    checkpoint_async: bool = _opt(
        True,
        "write checkpoint files in the background (the state is copied "
        "off the device at the step; at most one write in flight)",
        operational=True,
    )
    keep_last_n: int = _opt(
        2,
        "full checkpoints kept: last.pt, last.prev.pt, then step-<N>.pt (rolling; 1 = last.pt only)",
        operational=True,
    )
    snapshot_every_epochs: int = _opt(
        0, "also keep epoch-<E>.pt every N epochs, never deleted (0 = off)", operational=True
    )
    profile_steps: str = _opt(
        "",
        "START:END: torch.profiler trace of global steps START+1..END on rank 0 into <run.dir>/profile/ ('' = off)",
        operational=True,
    )
    eval_splits: list[str] = _opt(["valid"], "splits evaluated each epoch", operational=True)


@dataclass
class DistConfig:
    backend: str = _opt(
        "auto", "process group backend: auto = nccl on CUDA, gloo on CPU", ("auto", "nccl", "gloo"), operational=True
    )
    timeout_s: int = _opt(600, "collective timeout", operational=True)
    bucket_cap_mb: float = _opt(25.0, "DDP gradient bucket size", operational=True)
    gradient_as_bucket_view: bool = _opt(True, "DDP: gradients as views into buckets (saves memory)", operational=True)
    static_graph: bool = _opt(False, "DDP static graph", operational=True)
    comm_hook: str = _opt("none", "DDP gradient compression", ("none", "bf16"))


@dataclass
class WandbConfig:
    mode: str = _opt(
        "auto",
        "auto = online with an API key, else offline",
        ("auto", "online", "offline", "disabled"),
        operational=True,
    )
    entity: str = _opt("", "team (entity)", operational=True)
    project: str = _opt("bfly", "project", operational=True)
    group: str = _opt("", "group (e.g. a sweep)", operational=True)
    name: str = _opt("", "run name (default: the run directory's name)", operational=True)
    tags: list[str] = _opt([], "tags", operational=True)
    job_type: str = _opt("", "job type (launch.submit's grids: the setting, shared by its seeds)", operational=True)
    varies: list[str] = _opt(
        [],
        "config keys that vary across the group's runs (launch.submit's grids; wandb config `varies`)",
        operational=True,
    )
    notes: str = _opt("", "notes", operational=True)
    samples: int = _opt(16, "sample predictions logged at the end", operational=True)


@dataclass
class RunConfig:
    dir: str = _opt("", "run directory (default: runs/<model>)", operational=True)
    resume: str = _opt(
        "auto", "auto = continue from <dir>/last.pt if present; never; or a checkpoint path", operational=True
    )
    stop_after_epochs: int = _opt(
        0, "end this job (checkpointed) after N epochs; a resume continues (0 = off)", operational=True
    )
    stop_after_steps: int = _opt(
        0, "end this job (checkpointed) after N optimizer steps; a resume continues (0 = off)", operational=True
    )
    allow_changes: list[str] = _opt(
        [],
        "keys a resume may change although they change the optimisation or the "
        "data (e.g. [optim.lr,train.epochs]); each change is logged and kept in "
        "config_history.jsonl",
        operational=True,
    )
    stopped_exit_code: int = _opt(
        75,
        "exit status after a stop by a signal with the checkpoint written (75: "
        "EX_TEMPFAIL, run again to resume); torchrun counts any non-zero worker status "
        "as a failure, so scripts that run torchrun and requeue themselves may set 0",
        operational=True,
    )
    hang_timeout_s: int = _opt(
        300,
        "a rank that makes no progress this long once training runs is a hang (or 10x the median step "
        "time if larger): the stalled rank is named, stacks go to <dir>/hang/, the job ends with exit 76 "
        "(0 = off); keep it below dist.timeout_s",
        operational=True,
    )
    startup_timeout_s: int = _opt(
        540,
        "the same limit during start-up (rendezvous, cache build, the first 3 steps, compile) and "
        "checkpoint writes; below dist.timeout_s, which also bounds the rendezvous",
        operational=True,
    )
    node_check: bool = _opt(
        True,
        "our sbatch scripts check every node before training (data, run directory, versions, clocks, "
        "rendezvous, GPUs, network: python -m bfly.nodecheck, under a minute); false skips it",
        operational=True,
    )
    stop_grace_s: int = _opt(
        120,
        "after a stop signal, a trainer that has not stopped within this many seconds (blocked in start-up "
        "or in a collective) writes its stacks to <dir>/hang/ and exits 76 (0 = wait)",
        operational=True,
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return value converted to tp where lossless (int -> float), else raise naming the key."""
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if (tp in (int, float) and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _sections() -> dict[str, type[DataclassInstance]]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


# Values renamed since: (key, old value) -> new value. Old configs, config.yaml files and checkpoints still
# load; a config a user wrote gets a warning.
RENAMED_VALUES = {("data.preset", "seed"): "course"}


def _canonical(key: str, value: Any) -> Any:
    return RENAMED_VALUES.get((key, value), value) if isinstance(value, str) else value


def _set(cfg: Config, key: str, value: Any, warn_renamed: bool = True) -> None:
    section, _, name = key.partition(".")
    sections = _sections()
    if section not in sections or not name:
        raise ConfigError(f"unknown config key {key!r} (sections: {', '.join(sections)})")
    cls = sections[section]
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise ConfigError(f"unknown config key {key!r} (known in {section}: {', '.join(hints)})")
    choices = cls.__dataclass_fields__[name].metadata.get("choices")
    if _canonical(key, value) != value:
        if warn_renamed:
            warnings.warn(
                f"{key}={value!r} is deprecated, it is now called {_canonical(key, value)!r} "
                "(the old name still works)",
                FutureWarning,
                stacklevel=3,
            )
        value = _canonical(key, value)
    if value is False and choices and "off" in choices:
        value = "off"  # YAML 1.1 reads a bare `off` as false
    value = _check_type(value, hints[name], key)
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    setattr(getattr(cfg, section), name, value)


def _flatten(tree: Any, where: str, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'} must be a mapping, got {tree!r}")
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            flat.update(_flatten(v, where, key + "."))
        else:
            flat[key] = v
    return flat


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where (line and column, counted from 1) and what. Its own message
    spans several lines, names the text as "<unicode string>" and ends with a caret line."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return " ".join(str(e).split())
    mark = e.problem_mark or e.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    context = f" ({e.context})" if e.context else ""
    return f"{where}{e.problem or 'cannot parse'}{context}"


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.load(raw, Loader=YamlLoader) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {_yaml_problem(e)}") from None
    return key.strip(), "" if value is None else value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), warn: bool = True) -> Config:
    """The config of `path` (YAML) with `overrides` applied, validated. warn=False: the keys set that
    would change nothing are not warned about (a command's other ranks, which load the same config)."""
    cfg = Config()
    given: list[str] = []
    if path is not None:
        path = Path(path)
        try:
            tree = yaml.load(path.read_text(), Loader=YamlLoader) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
        for key, value in _flatten(tree, str(path)).items():
            try:
                _set(cfg, key, value)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
            given.append(key)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
        given.append(key)
    validate(cfg)
    for line in unused_keys(cfg, given) if warn else []:
        warnings.warn(line, UserWarning, stacklevel=2)
    return cfg


# Keys that one input path (or augmentation preset) never reads: set for another, they change nothing.
READ_ONLY_WITH = {
    "data.crop_scale_min": ("data.input", "cached"),
    "data.cache_dir": ("data.input", "cached"),
    "data.cache_placement": ("data.input", "cached"),
    "data.workers": ("data.input", "pil"),
    "data.pin_memory": ("data.input", "pil"),
    "data.randaugment": ("data.preset", "timm"),
    "data.reprob": ("data.preset", "timm"),
}


def unused_keys(cfg: Config, given: Sequence[str]) -> list[str]:
    """One line per key set (in the file or an override) to other than its default that the chosen
    input path or preset does not read."""
    values, defaults = flat(to_dict(cfg)), flat(to_dict(Config()))
    lines = []
    for key in dict.fromkeys(given):
        needs = READ_ONLY_WITH.get(key)
        if needs and values[needs[0]] != needs[1] and values[key] != defaults[key]:
            lines.append(
                f"{key}={values[key]!r} changes nothing with {needs[0]}={values[needs[0]]} "
                f"(it is read with {needs[0]}={needs[1]} only)"
            )
    return lines


def validate(cfg: Config) -> None:
    positive = {
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "data.image_size": cfg.data.image_size,
        "train.log_every": cfg.train.log_every,
        "optim.lr": cfg.optim.lr,
        "run.startup_timeout_s": cfg.run.startup_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    non_negative = {
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "data.workers": cfg.data.workers,
        "train.checkpoint_every_steps": cfg.train.checkpoint_every_steps,
        "run.stop_after_epochs": cfg.run.stop_after_epochs,
        "run.stop_after_steps": cfg.run.stop_after_steps,
        "optim.warmup_epochs": cfg.optim.warmup_epochs,
        "optim.weight_decay": cfg.optim.weight_decay,
        "run.hang_timeout_s": cfg.run.hang_timeout_s,
        "run.stop_grace_s": cfg.run.stop_grace_s,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {cfg.train.ema_decay}")
    if cfg.train.keep_last_n < 1:
        raise ConfigError(f"train.keep_last_n: must be >= 1 (last.pt), got {cfg.train.keep_last_n}")
    if cfg.train.snapshot_every_epochs < 0:
        raise ConfigError(f"train.snapshot_every_epochs: must be >= 0, got {cfg.train.snapshot_every_epochs}")
    profile_window(cfg.train.profile_steps)
    if cfg.train.checkpoint_every_epochs < 1:
        raise ConfigError(f"train.checkpoint_every_epochs: must be >= 1, got {cfg.train.checkpoint_every_epochs}")
    if not 0 <= cfg.run.stopped_exit_code <= 255:
        raise ConfigError(f"run.stopped_exit_code: must be in 0..255, got {cfg.run.stopped_exit_code}")
    known = set(flat(to_dict(Config()))) | set(DATA_IDENTITY)
    for key in cfg.run.allow_changes:
        if key not in known:
            raise ConfigError(f"run.allow_changes: unknown key {key!r}")
    for key in cfg.wandb.varies:
        if key not in known:
            raise ConfigError(f"wandb.varies: unknown key {key!r}")
    _validate_data(cfg)
    _validate_timeouts(cfg)
    if not 0.0 <= cfg.optim.label_smoothing < 1.0:
        raise ConfigError(f"optim.label_smoothing: must be in [0, 1), got {cfg.optim.label_smoothing}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: must be two values in [0, 1), got {cfg.optim.betas}")
    for split in cfg.train.eval_splits:
        if split not in ("train", "valid", "test"):
            raise ConfigError(f"train.eval_splits: unknown split {split!r} (train, valid, test)")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    for key in ("mixup", "cutmix"):
        if getattr(d, key) < 0:
            raise ConfigError(f"data.{key}: must be >= 0, got {getattr(d, key)}")
    if not 0.0 <= d.reprob <= 1.0:
        raise ConfigError(f"data.reprob: must be in [0, 1], got {d.reprob}")
    if not 0.0 < d.crop_scale_min <= 1.0:
        raise ConfigError(f"data.crop_scale_min: must be in (0, 1], got {d.crop_scale_min}")
    if d.input == "cached" and d.preset == "timm" and d.randaugment:
        raise ConfigError(
            f"data.randaugment={d.randaugment!r}: RandAugment runs on the PIL path only; with "
            "data.input=cached set data.randaugment='' (random erasing, data.reprob, still applies)"
        )


def _validate_timeouts(cfg: Config) -> None:
    """The watchdog names a stalled rank only if it acts before a collective times out, which names nobody."""
    if cfg.run.hang_timeout_s == 0:  # no hang detection
        return
    for key in ("run.hang_timeout_s", "run.startup_timeout_s"):
        value = getattr(cfg.run, key.partition(".")[2])
        if value >= cfg.dist.timeout_s:
            raise ConfigError(
                f"{key}={value} must be below dist.timeout_s={cfg.dist.timeout_s}, so that a stalled rank is "
                f"named before a collective times out: lower {key} or raise dist.timeout_s"
            )


def profile_window(text: str) -> tuple[int, int] | None:
    """train.profile_steps "START:END" -> (START, END): the steps after global step START up to END; None when off."""
    if not text:
        return None
    start, sep, end = text.partition(":")
    try:
        window = int(start), int(end)
    except ValueError:
        window = (-1, -1)
    if not sep or not 0 <= window[0] < window[1]:
        raise ConfigError(f"train.profile_steps: expected START:END with 0 <= START < END (e.g. 10:13), got {text!r}")
    return window


def replace(cfg: Config, changes: dict[str, Any]) -> Config:
    """A copy of `cfg` with `changes` ({"data.workers": 0}) set through the checks of an override;
    the way commands change a config (never by assigning its fields)."""
    new = copy.deepcopy(cfg)
    for key, value in changes.items():
        _set(new, key, value)
    validate(new)
    return new


def run_dir_of(cfg: Config) -> Path:
    """The run directory: run.dir, or runs/<model> by default (relative to the working directory)."""
    return Path(cfg.run.dir or f"runs/{cfg.model.name}")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a config saved in a checkpoint or config.yaml, with the same checks."""
    cfg = Config()
    for key, value in _flatten(tree, "saved config").items():
        _set(cfg, key, value, warn_renamed=False)
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def help_text() -> str:
    """Every key, its default and its meaning, in aligned columns."""
    rows = []
    for section, cls in _sections().items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            choices = f.metadata.get("choices")
            extra = f" [{'|'.join(choices)}]" if choices else ""
            rows.append((f"{section}.{f.name}", repr(default), f"{f.metadata['help']}{extra}"))
    key_w = max(len(key) for key, _, _ in rows)
    default_w = max(len(default) for _, default, _ in rows)
    lines = ["config keys (set in YAML or as section.key=value), their defaults and meaning:"]
    lines += [f"  {key:<{key_w}}  {default:<{default_w}}  {text}" for key, default, text in rows]
    return "\n".join(lines)


# Not config keys, but compared on a resume like one: what the checkpoint's data looked like.
DATA_IDENTITY = ("data.class_names", "data.train_images")


def flat(tree: dict[str, Any]) -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}"""
    return {
        f"{section}.{k}": v for section, values in tree.items() if isinstance(values, dict) for k, v in values.items()
    }


def is_operational(key: str) -> bool:
    section, _, name = key.partition(".")
    cls = _sections().get(section)
    f = cls.__dataclass_fields__.get(name) if cls else None
    return bool(f and f.metadata.get("operational"))


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for each key of the flat dicts whose value differs and that is not operational.
    Keys missing from `old` (a checkpoint from before the key existed) compare as the default."""
    defaults = flat(to_dict(Config()))
    out = []
    for key in sorted(set(old) | set(new)):
        if is_operational(key):
            continue
        before, after = (_canonical(key, d.get(key, defaults.get(key))) for d in (old, new))
        if before != after:
            out.append((key, before, after))
    return out
