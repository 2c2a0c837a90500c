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
SAMPLES_FILE = "samples.png"
CURVES_FILE = "curves.png"


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def prepare(self, result_files: tuple[str, ...], overwrite: bool) -> None:
        """Create the folder; refuse if it already holds any of `result_files`, unless overwrite."""
        existing = [name for name in result_files if (self.path / name).exists()]
        if existing and not overwrite:
            raise FmdistError(
                f"output_dir {self.path} already holds results ({existing[0]}); "
                "choose another output_dir or set overwrite=true"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-")
            probe.close()
        except OSError as e:
            raise FmdistError(f"output_dir {self.path}: not writable ({e.strerror or e})") from None

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.path / name, text.encode())

    def write_json(self, name: str, data) -> None:
        self.write_text(name, json.dumps(data, indent=2) + "\n")

    def save_weights(self, state_dict: dict[str, torch.Tensor], name: str = WEIGHTS_FILE) -> None:
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
        atomic_write(self.path / name, buffer.getvalue())
