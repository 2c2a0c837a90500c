"""The run folder: what a run writes, written atomically, and never over an earlier run's results."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import torch

from fmdist.errors import FmdistError

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.json"
WEIGHTS_FILE = "model.pt"
EVAL_FILE = "eval.json"
EVAL_CONFIG_FILE = "eval_config.yaml"
CHECKPOINT_DIR = "checkpoints"
SAMPLES_FILE = "samples.png"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion.png"
SUMMARY_FILE = "summary.json"
WANDB_RUN_ID_FILE = "wandb-run-id"  # a resumed run continues its W&B run; a replaced one starts a new one


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the rest of a team
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def ensure_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-")
            probe.close()
        except OSError as e:
            raise FmdistError(f"output_dir {self.path}: not writable ({e.strerror or e})") from None

    def remove_unfinished_writes(self) -> None:
        """Delete temporary files a killed process left mid-write (see atomic_write)."""
        for folder in (self.path, self.path / CHECKPOINT_DIR):
            for leftover in folder.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)

    def remove_results(self) -> None:
        """Delete an earlier run's results before a fresh run replaces them (overwrite=true)."""
        for name in (HISTORY_FILE, WEIGHTS_FILE, CURVES_FILE, CONFUSION_FILE, SUMMARY_FILE, WANDB_RUN_ID_FILE):
            (self.path / name).unlink(missing_ok=True)

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.path / name, text.encode())

    def write_json(self, name: str, data) -> None:
        self.write_text(name, json.dumps(data, indent=2) + "\n")

    def save_weights(self, state_dict: dict[str, torch.Tensor], name: str = WEIGHTS_FILE) -> None:
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
        atomic_write(self.path / name, buffer.getvalue())
