"""Experiment tracking with Weights & Biases, from global rank 0 only.

Without credentials the run is logged offline into output_dir/wandb and can be uploaded later
with `wandb sync`. A resumed run continues the same W&B run (its id is kept in output_dir).
"""

from __future__ import annotations

import netrc
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

from fmdist import distributed
from fmdist.config import to_dict
from fmdist.outputs import WANDB_RUN_ID_FILE, atomic_write

_SECRET_WORDS = ("key", "token", "secret", "password")


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(configured: str) -> str:
    """online, offline or disabled: the environment's WANDB_MODE, else the config, where auto
    means online with credentials and offline without."""
    return mode_and_reason(configured)[0]


def mode_and_reason(configured: str) -> tuple[str, str]:
    """The mode resolve_mode picks, and what decided it, for the log line that announces it."""
    from_environment = os.environ.get("WANDB_MODE", "").lower()
    if from_environment in ("online", "offline", "disabled"):
        return from_environment, f"WANDB_MODE={from_environment} in the environment"
    if from_environment == "dryrun":
        return "offline", "WANDB_MODE=dryrun in the environment"
    if configured != "auto":
        return configured, f"wandb.mode={configured}"
    if has_credentials():
        return "online", "W&B credentials found"
    return "offline", "no W&B credentials found"


def without_secrets(value):
    """`value` with every mapping key that names a secret (key, token, secret, password) left out."""
    if isinstance(value, dict):
        return {k: without_secrets(v) for k, v in value.items() if not any(word in k.lower() for word in _SECRET_WORDS)}
    return value


def public_config(cfg) -> dict:
    """The resolved config as logged to W&B."""
    return without_secrets(to_dict(cfg))


class Tracker:
    """Logs to a W&B run on rank 0; does nothing elsewhere or when W&B is disabled."""

    def __init__(self, run=None):
        self.run = run

    @classmethod
    def start(cls, cfg, output_dir: Path) -> Tracker:
        if not distributed.is_main_process():
            return cls()
        mode, reason = mode_and_reason(cfg.wandb.mode)
        if mode == "disabled":
            return cls()
        import wandb

        id_file = Path(output_dir) / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        atomic_write(id_file, f"{run_id}\n".encode())
        run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=cfg.wandb.name or Path(output_dir).resolve().name,
            group=cfg.wandb.group,
            job_type=cfg.regime,
            tags=cfg.wandb.tags,
            config=public_config(cfg),
            dir=str(output_dir),
            id=run_id,
            resume="allow",
            mode=mode,
            settings=wandb.Settings(silent=True, console="off"),
        )
        if mode == "offline":
            distributed.main_print(
                f"fmdist: W&B logging offline ({reason}) to {Path(run.dir).parent}; upload later with: "
                f"wandb sync {Path(run.dir).parent}"
            )
        else:
            distributed.main_print(f"fmdist: W&B run {run.url}")
        return cls(run)

    def log_epoch(self, record: dict) -> None:
        if self.run is not None:
            self.run.log(record, step=record["epoch"])

    def finish(self, summary: dict, images: dict[str, Path], step: int) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log({name: wandb.Image(str(path)) for name, path in images.items() if path.exists()}, step=step)
        for key, value in summary.items():
            self.run.summary[key] = value
        self.run.finish()
