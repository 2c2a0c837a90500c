"""Whether a run starts fresh or continues from a checkpoint, and whether continuing is the same run.

A run's fingerprint is every setting that changes what it computes (model, regime, data and
its content, batch size, world size, precision, optimizer, seed). Resuming under a different
fingerprint would silently splice two experiments together, so it is refused with the
differing keys named. Settings that do not change the computation (output paths, checkpoint
cadence, evaluation batch size, data loading, device) may change between attempts, and so may
`epochs` while the learning rate is constant (a decaying schedule is spread over all epochs, so
there `epochs` is part of the run).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fmdist.checkpoints import CheckpointStore, Position, load_checkpoint
from fmdist.config import config_keys
from fmdist.errors import FmdistError
from fmdist.outputs import HISTORY_FILE, WEIGHTS_FILE, RunFolder

NOT_FINGERPRINTED = {
    "epochs", "eval_batch_size", "cpu", "deterministic", "eval_only", "output_dir", "overwrite", "resume",
    "checkpoint_every", "keep_checkpoints", "progress", "progress_every", "data.root", "data.download",
    "data.train_csv", "data.test_csv", "data.loader", "data.num_workers", "data.pin_memory", "mixed_precision",
    "channels_last", "compile",
}  # fmt: skip
NOT_FINGERPRINTED_SECTIONS = ("wandb.", "compare.")


def data_digest(*splits) -> str:
    """A hash of the images and labels themselves, so moved files still match and edited ones do not."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update(split.images.contiguous().numpy().tobytes())
        digest.update(split.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint(cfg, world_size: int, mixed_precision: str, digest: str) -> dict[str, str]:
    values = {}
    for info in config_keys():
        if info.key not in NOT_FINGERPRINTED and not info.key.startswith(NOT_FINGERPRINTED_SECTIONS):
            section, _, leaf = info.key.rpartition(".")
            values[info.key] = repr(getattr(getattr(cfg, section) if section else cfg, leaf))
    if cfg.optimizer.schedule != "constant":  # the decay is spread over all epochs: more epochs, another curve
        values["epochs"] = repr(cfg.epochs)
    values["world size"] = str(world_size)
    values["mixed precision in effect"] = mixed_precision
    values["data content"] = digest
    return values


def check_same_run(saved: dict[str, str], current: dict[str, str], path: Path) -> None:
    # A key added to fmdist after the checkpoint was written is absent from its fingerprint; at its
    # default it computes what the older version did, so only a non-default value differs.
    defaults = {info.key: repr(info.default) for info in config_keys()}
    saved = {key: saved.get(key, defaults.get(key)) for key in set(saved) | set(current)}
    differing = [key for key in sorted(saved) if saved[key] != current.get(key)]
    if differing:
        details = ", ".join(f"{key} ({saved[key] or 'unset'} -> {current.get(key, 'unset')})" for key in differing)
        raise FmdistError(
            f"{path} belongs to a different run: {details}; restore those settings, or start afresh "
            "in another output_dir (or with resume=never overwrite=true)"
        )


@dataclass
class StartPlan:
    resume_from: Path | None  # checkpoint to continue from; None: start fresh
    replaces_earlier_run: bool  # starting fresh over an earlier run's files (overwrite=true)
    notes: list[str]  # warnings for the log


def plan_start(cfg, folder: RunFolder, store: CheckpointStore, restarted: bool) -> StartPlan:
    """Decide from the config and what output_dir holds; nothing is written here."""
    notes: list[str] = []
    mode = cfg.resume
    if restarted and mode == "never":
        notes.append("restarted after a failure: resuming from the latest checkpoint although resume=never")
        mode = "auto"
    has_checkpoints = bool(store.files())
    finished = (folder / WEIGHTS_FILE).exists()
    started = has_checkpoints or finished or (folder / HISTORY_FILE).exists()
    if mode not in ("auto", "never"):
        return _plan_from_named_checkpoint(Path(mode), cfg, folder, store, started, restarted, notes)

    if mode == "auto" and has_checkpoints:
        latest = store.latest_readable(notes.append)
        if latest is not None:
            return StartPlan(latest[0], False, notes)
        if not cfg.overwrite:
            names = ", ".join(path.name for path in store.files())
            raise FmdistError(
                f"output_dir {folder.path}: no readable checkpoint in {store.folder} ({names} unreadable); "
                "set overwrite=true to start afresh"
            )
    if mode == "auto" and not finished and not has_checkpoints and started:
        notes.append(f"output_dir {folder.path} holds an interrupted run without checkpoints; starting it afresh")
        return StartPlan(None, True, notes)
    if started and not cfg.overwrite:
        what = "a finished run" if finished else "an earlier run"
        reason = "resume=never" if mode == "never" else "it has no checkpoint to resume from"
        raise FmdistError(
            f"output_dir {folder.path} already holds {what} ({reason}); choose another output_dir or set overwrite=true"
        )
    return StartPlan(None, started, notes)


def _plan_from_named_checkpoint(
    path: Path, cfg, folder: RunFolder, store: CheckpointStore, started: bool, restarted: bool, notes: list[str]
) -> StartPlan:
    """resume=PATH: continue from PATH into output_dir. Once output_dir holds later checkpoints of
    the same run (the same command rerun after a stop, a restart or a requeue), those continue it."""
    if not path.is_file():
        raise FmdistError(f"resume: checkpoint {path} not found")
    named = load_checkpoint(path)  # a bad file named by the user is an error, not something to skip
    if not started or (cfg.overwrite and not restarted):  # a restarted attempt keeps what the first saved
        return StartPlan(path, started, notes)
    latest = store.latest_readable(notes.append)
    if latest is not None and latest[1]["fingerprint"] == named["fingerprint"]:
        if _position(latest[1]) > _position(named):
            notes.append(f"output_dir {folder.path} already continues {path}: resuming from {latest[0]}")
            return StartPlan(latest[0], False, notes)
        return StartPlan(path, False, notes)
    raise FmdistError(
        f"output_dir {folder.path} already holds another run than {path}; resume into an empty "
        "output_dir, or set overwrite=true to replace that run"
    )


def _position(checkpoint: dict) -> Position:
    return Position(checkpoint["epoch"], checkpoint["step"])
