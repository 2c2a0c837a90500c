"""Typed run configuration: dataclasses, YAML files with `extends`, dotted command-line overrides.

Every key is declared once below, with its type, default and help text; loading checks names,
types and values and reports the first problem as one line that names the file (or the
command line) and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from fmdist.errors import FmdistError
from fmdist.regimes import input_normalization

COMMAND_LINE = "command line"
UNFREEZABLE = r"bn|conv1|bn1|fc|layer[1-4](\.\d+(\.(conv|bn)[1-3]|\.downsample(\.[01])?)?)?"


def _key(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = _key("resnet18", "ResNet depth")
    in_channels: int = _key(1, "input channels the first conv takes (1: FashionMNIST; 3: grey repeated)")
    num_classes: int = _key(10, "output classes of the fc layer")
    width: int = _key(64, "channels of the stem; 64 is the standard ResNet and the only width pretrained weights fit")
    weights: str = _key(
        "IMAGENET1K_V1",
        "pretrained/frozen regimes: torchvision ImageNet weights by name (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT) "
        "or a local .pth state dict",
    )
    stem: Literal["imagenet", "cifar"] = _key(
        "imagenet",
        "imagenet: 7x7 stride-2 conv + max-pool (28x28 is 7x7 at the first block); cifar: 3x3 stride-1 conv, "
        "no max-pool (28x28 kept; ~14x the compute)",
    )
    stem_init: Literal["random", "rgb_sum"] = _key(
        "rgb_sum",
        "pretrained regimes: the new first conv built from the pretrained RGB filters summed over colour (folded "
        "for the input normalisation, resized to 3x3 for the cifar stem), or randomly initialised (the tutorial's)",
    )
    init_from: str | None = _key(
        None, "weights of this exact model (e.g. a run's model.pt) loaded after the regime's initialisation"
    )
    unfreeze: list[str] = _key(
        ["layer4"],
        "partial regime: what trains besides conv1 and fc: modules (layer1..layer4, bn1; parts such as layer4.1 "
        "or layer4.1.bn2) and/or bn (the affine parameters of every BatchNorm)",
    )


@dataclass
class DataConfig:
    source: Literal["torchvision", "csv", "synthetic"] = _key(
        "torchvision", "torchvision (downloads FashionMNIST), csv (Kaggle format) or synthetic (procedural)"
    )
    root: str = _key("data", "torchvision source: folder holding (or receiving) FashionMNIST/raw")
    download: bool = _key(True, "torchvision source: download when the files are missing (local rank 0 only)")
    train_csv: str | None = _key(None, "csv source: training file, label,pixel1..pixel784")
    test_csv: str | None = _key(None, "csv source: test file, same format")
    holdout: int | None = _key(
        None, "csv source without data.test_csv: the last N rows of data.train_csv are the test set, the rest train"
    )
    train_size: int | None = _key(
        None, "number of training images: the first N of the split (synthetic: generated; null = 60000)"
    )
    test_size: int | None = _key(
        None, "number of test images: the first N of the split (synthetic: generated; null = 10000)"
    )
    synthetic_seed: int = _key(0, "synthetic source: seed of the generated task (independent of the run's seed)")
    image_size: int = _key(28, "side length the 28x28 images are resized to")
    mean: float | None = _key(
        None,
        "normalisation mean of the pixel values scaled to 0..1; null: ImageNet's grey equivalent (0.449) for "
        "pretrained regimes with torchvision weights, FashionMNIST's (0.2860) otherwise",
    )
    std: float | None = _key(
        None, "normalisation standard deviation; null: 0.226 (ImageNet's) or 0.3530 (FashionMNIST's), as data.mean"
    )
    augment: bool = _key(False, "random crop (padding 2) and horizontal flip on training batches")
    random_erasing: float = _key(
        0.0, "probability of erasing a random rectangle (2-33% of the image) of a training image, on the device"
    )
    loader: Literal["device", "dataloader"] = _key(
        "device",
        "device: the whole split held on the training device, batches cut by indexing it; "
        "dataloader: a torch DataLoader (workers, pinned memory) for data that does not fit",
    )
    num_workers: int = _key(0, "dataloader loader: worker processes per rank")
    pin_memory: bool = _key(True, "dataloader loader on a GPU: page-locked batches for faster copies")


@dataclass
class OptimizerConfig:
    name: Literal["adam", "adamw", "sgd"] = _key("adam", "adam (the tutorial's), adamw or sgd (momentum, Nesterov)")
    lr: float = _key(1e-3, "learning rate")
    weight_decay: float = _key(0.0, "weight decay, on weights only (never on BatchNorm parameters or biases)")
    momentum: float = _key(0.9, "sgd momentum")
    schedule: Literal["constant", "cosine"] = _key(
        "constant", "learning rate over training, stepped every iteration: constant (the tutorial's) or cosine decay"
    )
    warmup_epochs: float = _key(0.0, "linear warm-up from lr/steps to lr over this many epochs (fractions allowed)")
    min_lr_ratio: float = _key(0.0, "cosine schedule: the final learning rate as a fraction of lr")
    scale_lr: bool = _key(False, "linear scaling rule: the learning rate used is lr x global batch / reference_batch")
    reference_batch: int = _key(256, "the global batch size lr is given for (with scale_lr)")


@dataclass
class WandbConfig:
    mode: Literal["auto", "online", "offline", "disabled"] = _key(
        "auto",
        "auto: online when W&B credentials exist (WANDB_API_KEY or a netrc entry), otherwise offline "
        "(upload later with wandb sync); WANDB_MODE in the environment wins",
    )
    project: str = _key("fmdist", "W&B project")
    entity: str | None = _key(None, "W&B entity (team or user); null = your default")
    name: str | None = _key(None, "run name; null = the output folder's name")
    group: str | None = _key(None, "groups runs in W&B; fmdist-compare sets it to the comparison's name")
    tags: list[str] = _key([], "W&B tags (a YAML list, or comma-separated on the command line)")


@dataclass
class CompareConfig:
    regimes: list[str] = _key(["pretrained", "scratch", "frozen"], "fmdist-compare: the regimes to run, in order")
    stand_in_weights: bool = _key(
        False,
        "fmdist-compare, offline smoke runs: pretrained/frozen start from weights pre-trained on another "
        "synthetic task in the same command instead of ImageNet (the report says so)",
    )
    stand_in_epochs: int = _key(2, "fmdist-compare: epochs of that stand-in pre-training")


@dataclass
class TrainConfig:
    regime: Literal["scratch", "pretrained", "frozen", "partial"] = _key(
        "scratch",
        "scratch (random init), pretrained (fine-tune all), frozen (train conv1 and fc only) or partial "
        "(frozen plus model.unfreeze)",
    )
    epochs: int = _key(20, "training epochs")
    batch_size: int = _key(256, "training batch size per process (global batch = batch_size x world size)")
    eval_batch_size: int = _key(512, "evaluation batch size per process")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = _key(
        "auto",
        "autocast precision; auto: bf16 on GPUs that support it (else fp16) and on CPUs with bf16 units "
        "(AMX, AVX512-BF16), no elsewhere (emulated bf16 is slower than fp32); fp16 needs a CUDA GPU "
        "(on a CPU it falls back to auto's choice)",
    )
    label_smoothing: float = _key(0.0, "label smoothing of the training loss (validation loss is never smoothed)")
    ema_decay: float = _key(
        0.0, "keep an exponential moving average of the weights, updated every step, evaluated alongside (0 = off)"
    )
    eval_flip: bool = _key(False, "evaluate on each image and its mirror image, averaging the logits")
    channels_last: bool = _key(True, "model and batches in channels-last memory format (faster convolutions)")
    compile: bool = _key(False, "torch.compile the model (minutes of compiling first; pays off on GPUs)")
    seed: int = _key(0, "seed of initialisation, data order and augmentation")
    deterministic: bool = _key(False, "use deterministic algorithms only (bit-reproducible runs; slower on GPU)")
    cpu: bool = _key(False, "run on the CPU even when a GPU is present")
    eval_only: bool = _key(False, "evaluate the initial weights (see model.init_from) and write eval.json")
    output_dir: str | None = _key(None, "run folder; null = runs/<config file name>")
    overwrite: bool = _key(False, "allow writing into an output_dir that already holds a run's results")
    resume: str = _key(
        "auto",
        "auto: continue from output_dir's latest checkpoint if there is one; never: start fresh (refused over "
        "an earlier run unless overwrite=true); or a checkpoint file to continue from",
    )
    checkpoint_every: int = _key(1, "save a checkpoint every N epochs (and always after the last)")
    keep_checkpoints: int = _key(3, "how many of the latest checkpoints to keep (best.pt is kept besides)")
    progress: Literal["auto", "bar", "lines", "off"] = _key(
        "auto", "training progress on rank 0: a tqdm bar in a terminal, plain lines otherwise (auto), or off"
    )
    progress_every: float = _key(30.0, "seconds between progress lines (progress=lines)")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    # The config file's stem, for the default output_dir; not a key users set.
    name: str = field(default="run", metadata={"internal": True})


@dataclass(frozen=True)
class KeyInfo:
    key: str
    type: Any
    default: Any
    help: str


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[KeyInfo]:
    """Every settable dotted key of `cls`, in declaration order."""
    keys: list[KeyInfo] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(config_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            keys.append(KeyInfo(prefix + f.name, hints[f.name], default, f.metadata.get("help", "")))
    return keys


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if _is_optional(tp):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return f"{type_name(inner[0])} or null"
    if get_origin(tp) is list:
        return "list of strings"
    return {int: "integer", float: "number", bool: "true|false", str: "string"}.get(tp, str(tp))


def format_default(value: Any) -> str:
    return (
        "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    )


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read `path` (following `extends`), apply `key=value` overrides, type-check and validate."""
    values: dict[str, tuple[Any, str]] = {}
    name = "run"
    if path is not None:
        path = Path(path)
        name = path.stem
        values.update(_read_yaml_chain(path, seen=()))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise FmdistError(f"command line: expected key=value, got {item!r}")
        _check_key(key.strip(), COMMAND_LINE)
        values[key.strip()] = (_parse_cli_value(text), COMMAND_LINE)

    cfg = TrainConfig(name=name)
    infos = {info.key: info for info in config_keys()}
    for key, (value, origin) in values.items():
        section, _, leaf = key.rpartition(".")
        target = getattr(cfg, section) if section else cfg
        setattr(target, leaf, _coerce(value, infos[key].type, key, origin))
    origins = {key: origin for key, (_, origin) in values.items()}
    validate(cfg, origins)
    if cfg.data.mean is None or cfg.data.std is None:
        mean, std = input_normalization(cfg.regime, cfg.model.weights)
        cfg.data.mean = mean if cfg.data.mean is None else cfg.data.mean
        cfg.data.std = std if cfg.data.std is None else cfg.data.std
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / cfg.name)
    return cfg


def _read_yaml_chain(path: Path, seen: tuple[Path, ...]) -> dict[str, tuple[Any, str]]:
    if not path.is_file():
        raise FmdistError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise FmdistError(f"{path}: 'extends' forms a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise FmdistError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise FmdistError(f"{path}: expected a mapping of config keys at the top level")
    values: dict[str, tuple[Any, str]] = {}
    parent = data.pop("extends", None)
    if parent is not None:
        values.update(_read_yaml_chain(path.parent / str(parent), seen + (path.resolve(),)))
    for key, value in _flatten(data, str(path)):
        values[key] = (value, str(path))
    return values


def _flatten(data: dict, origin: str, prefix: str = ""):
    sections = {name for name, tp in get_type_hints(TrainConfig).items() if dataclasses.is_dataclass(tp)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not prefix and key in sections:
            if not isinstance(value, dict):
                raise FmdistError(
                    f"{origin}: key '{dotted}' is a section; expected a mapping such as '{dotted}: {{...}}'"
                )
            yield from _flatten(value, origin, prefix=f"{dotted}.")
        elif isinstance(value, dict):  # a misspelt section: report its keys under the misspelt name
            yield from _flatten({f"{dotted}.{k}": v for k, v in value.items()}, origin)
        else:
            _check_key(dotted, origin)
            yield dotted, value


def _check_key(key: str, origin: str) -> None:
    valid = [info.key for info in config_keys()]
    if key in valid:
        return
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a typo in the section part often hides the leaf: match on the leaf too
        leaf = key.rpartition(".")[2]
        close = [k for k in valid if k.rpartition(".")[2] == leaf][:1]
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help to list the keys"
    raise FmdistError(f"{origin}: unknown key '{key}'{hint}")


def _parse_cli_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def _coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    def fail(expected: str) -> FmdistError:
        return FmdistError(f"{origin}: key '{key}': expected {expected}, got {value!r}")

    if _is_optional(tp):
        inner = [a for a in get_args(tp) if a is not type(None)][0]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, inner, key, origin)
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads unquoted no/off (yes/on) as booleans
            spellings = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((choice for choice in spellings if choice in choices), value)
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise FmdistError(f"{origin}: key '{key}': expected one of {'|'.join(choices)}, got {value!r}{hint}")
    if get_origin(tp) is list:
        if isinstance(value, str):  # the command line's a,b,c
            value = [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            return [str(v) for v in value]
        raise fail("a list of strings")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def validate(cfg: TrainConfig, origins: dict[str, str] | None = None) -> None:
    """Check values that are well-typed but impossible; raise on the first with its key and origin."""
    origins = origins or {}

    def require(ok: bool, key: str, expected: str) -> None:
        if not ok:
            section, _, leaf = key.rpartition(".")
            value = getattr(getattr(cfg, section) if section else cfg, leaf)
            origin = origins.get(key, "default config")
            raise FmdistError(f"{origin}: key '{key}': expected {expected}, got {value!r}")

    require(cfg.epochs >= 1, "epochs", "at least 1")
    require(cfg.batch_size >= 1, "batch_size", "at least 1")
    require(cfg.eval_batch_size >= 1, "eval_batch_size", "at least 1")
    require(cfg.seed >= 0, "seed", "a non-negative integer")
    require(bool(cfg.resume.strip()), "resume", "auto, never or a checkpoint path")
    require(cfg.checkpoint_every >= 1, "checkpoint_every", "at least 1")
    require(cfg.keep_checkpoints >= 1, "keep_checkpoints", "at least 1")
    require(cfg.model.in_channels in (1, 3), "model.in_channels", "1 or 3")
    require(cfg.model.num_classes >= 2, "model.num_classes", "at least 2")
    require(cfg.model.width >= 1, "model.width", "at least 1")
    require(bool(cfg.model.weights.strip()), "model.weights", "a weights name or a .pth path")
    require(8 <= cfg.data.image_size <= 512, "data.image_size", "between 8 and 512")
    require(cfg.data.train_size is None or cfg.data.train_size >= 1, "data.train_size", "at least 1 or null")
    require(cfg.data.test_size is None or cfg.data.test_size >= 1, "data.test_size", "at least 1 or null")
    require(cfg.data.mean is None or 0.0 <= cfg.data.mean <= 1.0, "data.mean", "a value in 0..1 or null")
    require(
        cfg.data.std is None or (math.isfinite(cfg.data.std) and cfg.data.std > 0),
        "data.std",
        "a positive number or null",
    )
    require(bool(cfg.model.unfreeze), "model.unfreeze", "at least one module name (or bn)")
    for name in cfg.model.unfreeze:
        require(
            re.fullmatch(UNFREEZABLE, name) is not None,
            "model.unfreeze",
            "names among bn, conv1, bn1, layer1..layer4 (or parts such as layer4.1, layer4.1.bn2), fc",
        )
    require(cfg.data.num_workers >= 0, "data.num_workers", "0 or more")
    require(cfg.data.synthetic_seed >= 0, "data.synthetic_seed", "a non-negative integer")
    if cfg.data.source == "csv":
        require(cfg.data.train_csv is not None, "data.train_csv", "a CSV path when data.source is csv")
        require(
            (cfg.data.test_csv is None) != (cfg.data.holdout is None),
            "data.test_csv",
            "a CSV path when data.source is csv, or null with data.holdout set (one of the two)",
        )
    require(cfg.data.holdout is None or cfg.data.holdout >= 1, "data.holdout", "a positive number of rows or null")
    require(cfg.progress_every > 0, "progress_every", "a positive number of seconds")
    regimes = get_args(get_type_hints(TrainConfig)["regime"])
    require(
        bool(cfg.compare.regimes) and set(cfg.compare.regimes) <= set(regimes),
        "compare.regimes",
        f"a list drawn from {', '.join(regimes)}",
    )
    require(len(set(cfg.compare.regimes)) == len(cfg.compare.regimes), "compare.regimes", "no regime twice")
    require(cfg.compare.stand_in_epochs >= 1, "compare.stand_in_epochs", "at least 1")
    require(math.isfinite(cfg.optimizer.lr) and cfg.optimizer.lr > 0, "optimizer.lr", "a positive number")
    require(cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay", "0 or more")
    require(0 <= cfg.optimizer.momentum < 1, "optimizer.momentum", "a value in [0, 1)")
    require(0 <= cfg.optimizer.warmup_epochs <= cfg.epochs, "optimizer.warmup_epochs", "0 to epochs")
    require(0 <= cfg.optimizer.min_lr_ratio <= 1, "optimizer.min_lr_ratio", "a value in 0..1")
    require(cfg.optimizer.reference_batch >= 1, "optimizer.reference_batch", "at least 1")
    require(0 <= cfg.label_smoothing < 1, "label_smoothing", "a value in [0, 1)")
    require(0 <= cfg.ema_decay < 1, "ema_decay", "a value in [0, 1)")
    require(0 <= cfg.data.random_erasing <= 1, "data.random_erasing", "a probability in 0..1")


def to_dict(cfg: TrainConfig) -> dict:
    """The resolved config as nested plain data, as saved in a run's config.yaml."""
    data = dataclasses.asdict(cfg)
    data.pop("name")
    return data


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def keys_help() -> str:
    """The table `--help` prints: every key, its type and default."""
    lines = ["config keys (set in the YAML file or as key=value after --config):"]
    for info in config_keys():
        lines.append(f"  {info.key} = {format_default(info.default)}  [{type_name(info.type)}]")
        lines.append(f"      {info.help}")
    return "\n".join(lines)
