"""Checkpoint files: everything a run needs to continue exactly where it stopped.

A checkpoint holds the model, optimizer, LR scheduler and grad scaler states, the position
(epochs done, and batches done in the next epoch when a signal stopped it mid-epoch), the
history so far, every rank's random number generator states and the run's fingerprint (see
resume.py). Files are written atomically and read with torch.load(weights_only=True).
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmdist.errors import FmdistError
from fmdist.outputs import atomic_write
from fmdist.weights import safe_torch_load

FORMAT_VERSION = 1
BEST_FILE = "best.pt"
REQUIRED_KEYS = ("format", "epoch", "step", "model", "optimizer", "history", "rng", "fingerprint")
_NAME = re.compile(r"^epoch-(\d+)(?:-step-(\d+))?\.pt$")


@dataclass(frozen=True, order=True)
class Position:
    epoch: int  # epochs fully done
    step: int = 0  # batches done in the epoch after `epoch` (0: at an epoch boundary)

    def file_name(self) -> str:
        if self.step == 0:
            return f"epoch-{self.epoch:04d}.pt"
        return f"epoch-{self.epoch + 1:04d}-step-{self.step:06d}.pt"

    @classmethod
    def from_file_name(cls, name: str) -> Position | None:
        match = _NAME.match(name)
        if match is None:
            return None
        epoch, step = int(match.group(1)), int(match.group(2) or 0)
        return cls(epoch - 1, step) if step else cls(epoch, 0)

    def describe(self) -> str:
        return f"after epoch {self.epoch}" if self.step == 0 else f"epoch {self.epoch + 1}, step {self.step}"


class CheckpointStore:
    """The checkpoints/ folder of a run."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def saved(self) -> list[tuple[Position, Path]]:
        """Checkpoints on disk, oldest first (best.pt and unfinished temporary files excluded)."""
        if not self.folder.is_dir():
            return []
        found = [(Position.from_file_name(p.name), p) for p in self.folder.iterdir()]
        return sorted((position, path) for position, path in found if position is not None)

    def save(self, checkpoint: dict, position: Position, periodic: bool, best: bool, keep: int) -> Path:
        """Write the checkpoint as the file of its position (periodic) and/or as best.pt; keep the
        `keep` latest position files. Returns the path written last."""
        self.folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        written = []
        if periodic:
            written.append(self.folder / position.file_name())
        if best:
            written.append(self.folder / BEST_FILE)
        for path in written:
            atomic_write(path, buffer.getvalue())
        for _, old in self.saved()[:-keep]:
            old.unlink(missing_ok=True)
        return written[-1] if written else None

    def latest_readable(self, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, best.pt included (with checkpoint_every > 1 it can be
        newer than every periodic file); each unreadable newer one is reported through `warn`."""
        best = self._readable_best(warn)
        newer = [path for position, path in reversed(self.saved()) if best is None or position >= best[0]]
        for index, path in enumerate(newer):
            try:
                return path, load_checkpoint(path)
            except FmdistError as e:
                following = newer[index + 1].name if index + 1 < len(newer) else BEST_FILE if best else None
                warn(f"skipping checkpoint {e}; " + (f"trying {following}" if following else "none left"))
        return (self.folder / BEST_FILE, best[1]) if best else None

    def _readable_best(self, warn: Callable[[str], None]) -> tuple[Position, dict] | None:
        path = self.folder / BEST_FILE
        if not path.is_file():
            return None
        try:
            data = load_checkpoint(path)
        except FmdistError as e:
            warn(f"skipping checkpoint {e}")
            return None
        return Position(data["epoch"], data["step"]), data

    def files(self) -> list[Path]:
        """Every checkpoint file: the periodic ones oldest first, then best.pt."""
        best = self.folder / BEST_FILE
        return [path for _, path in self.saved()] + ([best] if best.is_file() else [])

    def clear(self, keep: Path | None = None) -> None:
        """Delete every checkpoint but `keep` (a checkpoint the replacing run starts from)."""
        for path in self.files():
            if keep is None or not path.samefile(keep):
                path.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict:
    data = safe_torch_load(path)
    if not isinstance(data, dict) or any(key not in data for key in REQUIRED_KEYS):
        raise FmdistError(f"{path}: not an fmdist checkpoint (expected the keys {', '.join(REQUIRED_KEYS)})")
    if data["format"] != FORMAT_VERSION:
        raise FmdistError(f"{path}: checkpoint format {data['format']}, this fmdist reads format {FORMAT_VERSION}")
    return data


# ------------------------------------------------------------------------------ random states


def capture_rng(augment_generator: torch.Generator) -> dict:
    """This process's random number generator states, in types torch.load(weights_only=True) accepts."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "augment": augment_generator.get_state(),
    }


def restore_rng(state: dict, augment_generator: torch.Generator) -> None:
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    augment_generator.set_state(state["augment"])


def _as_tuples(value):
    # random.setstate wants the nested tuples getstate gave
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
