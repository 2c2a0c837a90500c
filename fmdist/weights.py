"""Pretrained weights: torchvision's ImageNet files through torch.hub's cache, or a local .pth file.

Named weights live at `$TORCH_HOME/hub/checkpoints/<file>` (torch.hub's cache, default
~/.cache/torch), so a file placed there by hand or by an earlier run is used offline.
Everything is read with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch
import torchvision

from fmdist.errors import FmdistError

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def is_local_path(spec: str) -> bool:
    return spec.endswith(WEIGHT_FILE_SUFFIXES) or "/" in spec or Path(spec).exists()


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_weights_url(arch: str, name: str) -> str:
    """The published URL of torchvision's `arch` weights `name` (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT)."""
    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum[name.upper()].url
    except KeyError:
        names = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise FmdistError(
            f"model.weights: torchvision has no {arch} weights named {name!r}; expected one of {names} or a .pth path"
        ) from None


def fetch_weights_file(spec: str, arch: str) -> Path:
    """Path of the weights file `spec` names, downloading torchvision's file into the hub cache if absent."""
    if is_local_path(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FmdistError(f"model.weights: {path}: file not found")
        return path
    url = imagenet_weights_url(arch, spec)
    filename = url.rsplit("/", 1)[-1]
    folder = hub_checkpoint_dir()
    cached = folder / filename
    if cached.is_file():
        return cached
    hash_prefix = re.search(r"-([a-f0-9]+)\.", filename)  # torch.hub's convention: name-<sha256 prefix>.pth
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=hash_prefix.group(1) if hash_prefix else None)
    except (OSError, RuntimeError) as e:
        reason = str(getattr(e, "reason", e)).splitlines()[0]
        raise FmdistError(
            f"cannot download {arch} {spec} weights {filename} from {url} ({reason}); "
            f"if offline, put {filename} into {folder} (set TORCH_HOME to move it)"
        ) from None
    return cached


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict (also inside {'model': ...} or {'state_dict': ...}), refusing arbitrary pickles."""
    data = safe_torch_load(path)
    if isinstance(data, dict):
        for key in ("model", "state_dict"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise FmdistError(
            f"{path}: expected a state dict (a mapping of parameter names to tensors), found {type(data).__name__}"
        )
    return {k.removeprefix("module."): v for k, v in data.items()}


def safe_torch_load(path: Path):
    """torch.load(weights_only=True) onto the CPU, with a one-line error naming the file for any failure."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsupported is None:
            raise FmdistError(f"{path}: not a readable PyTorch weights file (not a torch.save archive)") from None
        raise FmdistError(
            f"{path}: refused by torch.load(weights_only=True): it holds a pickled {unsupported.group(1)}, "
            "not only tensors; save the model's state_dict() instead"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        detail = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise FmdistError(f"{path}: not a readable PyTorch weights file ({detail})") from None


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: Path | str, description: str) -> None:
    """load_state_dict(strict=True) with a one-line error naming the first mismatching key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first '{unexpected[0]}')")
        raise FmdistError(f"{origin}: keys do not match {description}: {', '.join(parts)}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise FmdistError(
                f"{origin}: '{key}' has shape {list(state[key].shape)}, {description} expects {list(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)
