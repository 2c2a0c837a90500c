"""Checkpoints, exact resume, killed workers, preemption signals and divergence, with real processes."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fmdist.checkpoints import CheckpointStore, Position, load_checkpoint
from fmdist.config import load_config
from fmdist.errors import FmdistError
from fmdist.outputs import RunFolder
from fmdist.preemption import EXIT_CHECKPOINTED
from fmdist.resume import check_same_run, fingerprint, plan_start

from helpers import (
    CONFIGS,
    REPO,
    child_pids,
    comparable,
    finish,
    kill_tree,
    read_history,
    run_command,
    start,
    train,
    train_command,
    wait_for,
    write_kaggle_csv,
)

SMOKE = ("--config", str(CONFIGS / "smoke.yaml"))
# deterministic kernels, augmentation and a per-step schedule: resuming must restore every state
EXACT = (*SMOKE, "deterministic=true", "data.augment=true", "data.random_erasing=0.5", "optimizer.name=adamw",
         "optimizer.weight_decay=0.05", "optimizer.schedule=cosine", "optimizer.warmup_epochs=1", "label_smoothing=0.1",
         "ema_decay=0.9")  # fmt: skip
# for tests about files and decisions rather than learning
SMALL = (*SMOKE, "data.train_size=512", "data.test_size=100")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("fmdist: error:")]


def assert_same_weights(a, b):
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("nproc", [None, 2], ids=["1-process", "2-processes"])
def test_run_killed_after_an_epoch_resumes_to_the_same_weights_and_history(tmp_path, nproc):
    args = (*EXACT, "epochs=4")
    train(tmp_path, *args, f"output_dir={tmp_path / 'whole'}", nproc=nproc)

    interrupted = tmp_path / "interrupted"
    process = start(train_command(*args, f"output_dir={interrupted}", nproc=nproc), cwd=tmp_path)
    wait_for(interrupted / "checkpoints" / "epoch-0001.pt", process)
    kill_tree(process)
    process.wait()
    assert not (interrupted / "model.pt").exists(), "the kill came too late to interrupt the run"

    result = train(tmp_path, *args, f"output_dir={interrupted}", nproc=nproc)
    assert "fmdist: resuming from" in result.stdout
    assert comparable(read_history(interrupted)) == comparable(read_history(tmp_path / "whole"))
    assert [r["epoch"] for r in read_history(interrupted)] == [1, 2, 3, 4]
    assert_same_weights(interrupted / "model.pt", tmp_path / "whole" / "model.pt")


def test_sigterm_to_torchrun_checkpoints_mid_epoch_and_the_rerun_finishes_the_same_run(tmp_path):
    args = (*EXACT, "epochs=5")
    train(tmp_path, *args, f"output_dir={tmp_path / 'whole'}", nproc=2)

    out = tmp_path / "preempted"
    launcher = start(train_command(*args, f"output_dir={out}", nproc=2), cwd=tmp_path)
    wait_for(out / "checkpoints" / "epoch-0001.pt", launcher)
    launcher.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    returncode, stdout, stderr = finish(launcher)
    assert returncode != 0
    stops = [line for line in stdout.splitlines() if "stopped by SIGTERM" in line]
    assert len(stops) == 1 and f"exit code {EXIT_CHECKPOINTED}" in stops[0], stdout + stderr
    assert re.search(r"stopped by SIGTERM at epoch \d+, step \d+", stops[0])  # mid-epoch: the harder resume
    stop_files = [p.name for p in (out / "checkpoints").glob("epoch-*.pt")]
    assert any(name in stops[0] for name in stop_files)
    assert not (out / "model.pt").exists()

    train(tmp_path, *args, f"output_dir={out}", nproc=2)
    assert [r["epoch"] for r in read_history(out)] == [1, 2, 3, 4, 5]
    assert comparable(read_history(out)) == comparable(read_history(tmp_path / "whole"))
    assert_same_weights(out / "model.pt", tmp_path / "whole" / "model.pt")


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_signal_to_a_single_process_exits_75_with_a_checkpoint_and_resumes(tmp_path, signum):
    out = tmp_path / "run"
    process = start(train_command(*SMOKE, "epochs=5", f"output_dir={out}"), cwd=tmp_path)
    wait_for(out / "history.json", process)
    process.send_signal(signum)
    returncode, stdout, _ = finish(process)
    assert returncode == EXIT_CHECKPOINTED
    assert f"stopped by {signum.name}" in stdout
    train(tmp_path, *SMOKE, "epochs=5", f"output_dir={out}")
    assert [r["epoch"] for r in read_history(out)] == [1, 2, 3, 4, 5]


def test_a_stop_signal_during_start_up_stops_at_the_first_step_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    # a large synthetic set: its generation keeps the process in start-up for a while
    process = start(train_command(*SMOKE, "epochs=2", "data.train_size=30000", f"output_dir={out}"), cwd=tmp_path)
    first_line = process.stdout.readline()  # printed before the data and the model are built
    assert first_line.startswith("fmdist: scratch"), first_line
    process.send_signal(signal.SIGTERM)
    returncode, stdout, stderr = finish(process)
    assert returncode == EXIT_CHECKPOINTED, stderr[-3000:]
    assert "stopped by SIGTERM at epoch 1, step 1;" in stdout
    assert "Epoch: 1" not in stdout and (out / "checkpoints" / "epoch-0001-step-000001.pt").exists()
    train(tmp_path, *SMOKE, "epochs=2", "data.train_size=30000", f"output_dir={out}")
    assert [r["epoch"] for r in read_history(out)] == [1, 2]


def worker_of_rank(launcher_pid: int, rank: int) -> int:
    for pid in child_pids(launcher_pid):
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}")


def test_sigusr1_to_one_worker_of_two_stops_both_with_a_checkpoint_and_the_rerun_finishes(tmp_path):
    """torchrun does not forward SIGUSR1; a signal reaching any one rank must stop every rank."""
    out = tmp_path / "run"
    launcher = start(train_command(*SMALL, "epochs=5", f"output_dir={out}", nproc=2), cwd=tmp_path)
    wait_for(out / "checkpoints" / "epoch-0001.pt", launcher)
    os.kill(worker_of_rank(launcher.pid, 1), signal.SIGUSR1)
    returncode, stdout, stderr = finish(launcher)
    assert returncode != 0 and re.search(rf"exitcode\s*:\s*{EXIT_CHECKPOINTED}\b", stderr), stderr[-3000:]
    stops = [line for line in stdout.splitlines() if "stopped by" in line]
    assert len(stops) == 1 and "stopped by a stop signal on another rank" in stops[0], stdout
    assert not error_lines(stderr) and not (out / "model.pt").exists()

    train(tmp_path, *SMALL, "epochs=5", f"output_dir={out}", nproc=2)
    assert [r["epoch"] for r in read_history(out)] == [1, 2, 3, 4, 5]


def test_under_max_restarts_the_restarted_workers_honour_a_stop_signal_to_one_worker(tmp_path):
    """Workers stopped by a signal exit 75, which torchrun counts as a failure and restarts: the
    restarted attempt must stop too instead of training on."""
    out = tmp_path / "run"
    command = train_command(*SMALL, "epochs=5", f"output_dir={out}", nproc=2)
    command.insert(command.index("-m", 3), "--max-restarts=1")
    launcher = start(command, cwd=tmp_path)
    wait_for(out / "checkpoints" / "epoch-0001.pt", launcher)
    os.kill(worker_of_rank(launcher.pid, 1), signal.SIGUSR1)
    returncode, stdout, stderr = finish(launcher)
    assert returncode != 0 and re.search(rf"exitcode\s*:\s*{EXIT_CHECKPOINTED}\b", stderr), stderr[-3000:]
    assert len([line for line in stdout.splitlines() if "stopped by" in line]) == 1, stdout
    assert "torchrun restarted the workers after a stop signal ended attempt 0; not training on" in stdout
    assert "fmdist: resuming from" not in stdout and not (out / "model.pt").exists()
    stopped_after = len(read_history(out))
    assert stopped_after < 5

    rerun = train(tmp_path, *SMALL, "epochs=5", f"output_dir={out}", nproc=2)
    assert "not training on" not in rerun.stdout
    assert [r["epoch"] for r in read_history(out)] == [1, 2, 3, 4, 5]


def test_worker_killed_mid_epoch_is_restarted_by_torchrun_and_every_epoch_appears_once(tmp_path):
    out = tmp_path / "elastic"
    command = train_command(*SMOKE, "epochs=4", f"output_dir={out}", nproc=2)
    command.insert(command.index("-m", 3), "--max-restarts=2")
    launcher = start(command, cwd=tmp_path)
    wait_for(out / "checkpoints" / "epoch-0001.pt", launcher)
    workers = child_pids(launcher.pid)
    assert len(workers) == 2
    subprocess.run(["kill", "-9", str(workers[-1])], check=True)
    returncode, stdout, stderr = finish(launcher)
    assert returncode == 0, stderr[-3000:]
    assert "fmdist: resuming from" in stdout
    history = read_history(out)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["val_acc"] >= 0.95


def nan_weight(model: dict) -> None:
    model["fc.weight"][3, 7] = float("nan")


def minus_infinite_biases(model: dict) -> None:
    model["fc.bias"][1:] = float("-inf")  # every image not of class 0 costs an infinite loss


@pytest.mark.parametrize("damage, loss", [(nan_weight, "nan"), (minus_infinite_biases, "inf")], ids=["nan", "inf"])
def test_non_finite_training_loss_stops_with_epoch_and_step_and_keeps_the_checkpoints(tmp_path, damage, loss):
    out = tmp_path / "diverged"
    train(tmp_path, *SMALL, "epochs=2", f"output_dir={out}", nproc=2)
    latest = out / "checkpoints" / "epoch-0002.pt"
    checkpoint = torch.load(latest, weights_only=True)
    damage(checkpoint["model"])  # weights a bad step would have left
    torch.save(checkpoint, latest)
    results = [out / "history.json", out / "model.pt", *sorted((out / "checkpoints").iterdir())]
    before = {p: p.read_bytes() for p in results}

    result = train(tmp_path, *SMALL, "epochs=4", f"output_dir={out}", nproc=2, check=False)
    assert result.returncode != 0 and re.search(r"exitcode\s*:\s*3\b", result.stderr)  # torchrun: 1; workers: 3
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and f"training loss is {loss} at epoch 3, step 1" in errors[0], result.stderr[-2000:]
    assert sorted((out / "checkpoints").iterdir()) == results[2:]
    assert {p: p.read_bytes() for p in results} == before  # nothing written after the divergence


def test_weights_broken_by_the_last_step_of_an_epoch_are_never_saved(tmp_path):
    out = tmp_path / "diverged"
    # one step per epoch: its loss is finite, the huge step it takes is not, so the validation is
    result = train(
        tmp_path, *SMOKE, "epochs=3", "optimizer.name=sgd", "optimizer.lr=1e30", "optimizer.momentum=0",
        "data.train_size=128", f"output_dir={out}", nproc=2, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and re.search(r"exitcode\s*:\s*3\b", result.stderr)  # torchrun: 1; workers: 3
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "validation loss is nan after epoch 1" in errors[0], result.stderr[-2000:]
    assert "Epoch: 1 \tTraining Loss" in result.stdout
    assert not (out / "checkpoints").exists() and not (out / "history.json").exists()


def test_unreadable_latest_checkpoint_is_skipped_with_a_warning(tmp_path):
    out = tmp_path / "run"
    train(tmp_path, *SMALL, "epochs=2", f"output_dir={out}")
    latest = out / "checkpoints" / "epoch-0002.pt"
    best_epoch = load_checkpoint(out / "checkpoints" / "best.pt")["epoch"]
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    result = train(tmp_path, *SMALL, "epochs=3", f"output_dir={out}")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("fmdist: warning:")]
    assert len(warnings) == 1
    assert f"skipping checkpoint {latest}: not a readable PyTorch weights file" in warnings[0]
    # the next newest: best.pt when epoch 2 was the best (a copy of the damaged file), else epoch 1
    fallback = "best.pt (after epoch 2)" if best_epoch == 2 else "epoch-0001.pt (after epoch 1)"
    assert f"trying {fallback.split()[0]}" in warnings[0]
    assert "resuming from" in result.stdout and fallback in result.stdout
    assert [r["epoch"] for r in read_history(out)] == [1, 2, 3]


def test_resume_from_a_named_checkpoint_into_a_new_folder(tmp_path):
    train(tmp_path, *SMALL, "epochs=2", f"output_dir={tmp_path / 'a'}")
    checkpoint = tmp_path / "a" / "checkpoints" / "epoch-0001.pt"
    result = train(tmp_path, *SMALL, "epochs=2", f"resume={checkpoint}", f"output_dir={tmp_path / 'b'}")
    assert f"resuming from {checkpoint} (after epoch 1)" in result.stdout
    assert comparable(read_history(tmp_path / "b")) == comparable(read_history(tmp_path / "a"))


def test_rerunning_a_resume_from_path_command_continues_from_the_output_dir(tmp_path):
    """After a stop, a restart or a requeue, the same resume=PATH command must not go back to PATH."""
    train(tmp_path, *SMALL, "epochs=3", f"output_dir={tmp_path / 'a'}")
    named = tmp_path / "a" / "checkpoints" / "epoch-0001.pt"
    out = tmp_path / "b"
    train(tmp_path, *SMALL, "epochs=2", f"resume={named}", f"output_dir={out}")  # stands for a stopped run
    again = train(tmp_path, *SMALL, "epochs=3", f"resume={named}", f"output_dir={out}")
    assert f"output_dir {out} already continues {named}: resuming from {out / 'checkpoints' / 'epoch-0002.pt'}" in (
        again.stderr
    )
    assert "Epoch: 2 \t" not in again.stdout and "Epoch: 3 \tTraining Loss" in again.stdout
    assert comparable(read_history(out)) == comparable(read_history(tmp_path / "a"))
    assert named.is_file()


def test_resume_from_path_into_a_folder_holding_another_run_is_refused_unless_overwrite(tmp_path):
    train(tmp_path, *SMALL, "epochs=1", f"output_dir={tmp_path / 'a'}")
    named = tmp_path / "a" / "checkpoints" / "epoch-0001.pt"
    other = tmp_path / "other"
    train(tmp_path, *SMALL, "epochs=1", "seed=1", f"output_dir={other}")
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}

    refused = train(tmp_path, *SMALL, "epochs=2", f"resume={named}", f"output_dir={other}", check=False)
    assert refused.returncode == 2
    assert error_lines(refused.stderr) == [
        f"fmdist: error: output_dir {other} already holds another run than {named}; resume into an empty "
        "output_dir, or set overwrite=true to replace that run"
    ]
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before

    train(tmp_path, *SMALL, "epochs=2", f"resume={named}", "overwrite=true", f"output_dir={other}")
    assert [r["epoch"] for r in read_history(other)] == [1, 2]
    assert read_history(other)[0] == read_history(tmp_path / "a")[0]  # epoch 1 is the named run's
    assert named.is_file()


def test_overwrite_with_resume_from_a_checkpoint_of_the_same_folder_keeps_that_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(tmp_path, *SMALL, "epochs=3", f"output_dir={out}")
    named = out / "checkpoints" / "epoch-0001.pt"
    (out / "wandb-run-id").write_text("abc123\n")  # a replaced run must not continue the old W&B run
    train(tmp_path, *SMALL, "epochs=2", f"resume={named}", "overwrite=true", f"output_dir={out}")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "epoch-0001.pt", "epoch-0002.pt"]
    assert [r["epoch"] for r in read_history(out)] == [1, 2]
    assert not (out / "wandb-run-id").exists()


def test_a_run_whose_newest_checkpoint_is_best_pt_resumes_from_it(tmp_path):
    """With checkpoint_every > 1, best.pt can be the only (or the newest) checkpoint of a killed run."""
    out = tmp_path / "run"
    train(tmp_path, *SMALL, "epochs=3", "checkpoint_every=5", f"output_dir={out}")
    (out / "checkpoints" / "epoch-0003.pt").unlink()  # as if killed before the final epoch's files
    (out / "model.pt").unlink()
    best_epoch = load_checkpoint(out / "checkpoints" / "best.pt")["epoch"]
    assert plan(out, "checkpoint_every=5").resume_from == out / "checkpoints" / "best.pt"

    result = train(tmp_path, *SMALL, "epochs=4", "checkpoint_every=5", f"output_dir={out}")
    assert f"resuming from {out / 'checkpoints' / 'best.pt'} (after epoch {best_epoch})" in result.stdout
    assert [r["epoch"] for r in read_history(out)] == [1, 2, 3, 4]


def test_resuming_with_another_world_size_or_edited_data_is_refused_naming_it(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (320, 28, 28), dtype=np.uint8)
    labels = np.arange(320) % 10
    train_csv = write_kaggle_csv(tmp_path / "train.csv", images[:256], labels[:256])
    test_csv = write_kaggle_csv(tmp_path / "test.csv", images[256:320], labels[256:320])
    out = tmp_path / "run"
    args = (*SMOKE, "data.source=csv", f"data.train_csv={train_csv}", f"data.test_csv={test_csv}", "data.train_size=null",
            "data.test_size=null", "batch_size=32")  # fmt: skip
    train(tmp_path, *args, "epochs=1", f"output_dir={out}")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    wider = train(tmp_path, *args, "epochs=2", f"output_dir={out}", nproc=2, check=False)
    assert wider.returncode != 0
    (error,) = error_lines(wider.stderr)
    assert "belongs to a different run: world size (1 -> 2)" in error

    edited = images[:256].copy()
    edited[17, 3, 4] ^= 0xFF  # one pixel of one image
    write_kaggle_csv(train_csv, edited, labels[:256])
    changed = train(tmp_path, *args, "epochs=2", f"output_dir={out}", check=False)
    assert changed.returncode == 2
    (error,) = error_lines(changed.stderr)
    assert "belongs to a different run: data content (" in error and "world size" not in error
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_finished_run_rerun_is_complete_and_can_be_extended(tmp_path):
    out = tmp_path / "run"
    train(tmp_path, *SMALL, "epochs=2", f"output_dir={out}")
    again = train(tmp_path, *SMALL, "epochs=2", f"output_dir={out}")
    assert "already complete (2 epochs done)" in again.stdout and "Epoch:" not in again.stdout
    longer = train(tmp_path, *SMALL, "epochs=3", f"output_dir={out}")
    assert "Epoch: 3 \tTraining Loss" in longer.stdout and "Epoch: 2 \t" not in longer.stdout
    assert [r["epoch"] for r in read_history(out)] == [1, 2, 3]


def test_a_checkpoint_from_before_a_key_existed_resumes_at_its_default_and_not_otherwise(tmp_path):
    out = tmp_path / "run"
    train(tmp_path, *SMALL, "epochs=2", "model.stem=imagenet", f"output_dir={out}")
    for path in (out / "checkpoints").glob("epoch-*.pt"):  # as written before model.stem was added
        checkpoint = torch.load(path, weights_only=True)
        del checkpoint["fingerprint"]["model.stem"]
        torch.save(checkpoint, path)
    changed = train(tmp_path, *SMALL, "epochs=3", "model.stem=cifar", f"output_dir={out}", check=False)
    assert changed.returncode != 0
    assert "belongs to a different run: model.stem ('imagenet' -> 'cifar')" in changed.stderr
    longer = train(tmp_path, *SMALL, "epochs=3", f"output_dir={out}")
    assert "resuming from" in longer.stdout and [r["epoch"] for r in read_history(out)] == [1, 2, 3]


def test_keeps_the_last_k_checkpoints_and_the_best(tmp_path):
    out = tmp_path / "run"
    train(tmp_path, *SMALL, "epochs=4", "keep_checkpoints=2", f"output_dir={out}")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "epoch-0003.pt", "epoch-0004.pt"]
    history = read_history(out)
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["history"][-1]["val_acc"] == max(r["val_acc"] for r in history)
    assert set(best) >= {"model", "optimizer", "scheduler", "scaler", "rng", "fingerprint", "history"}


def test_checkpoint_every_n_epochs_and_always_the_last(tmp_path):
    out = tmp_path / "run"
    train(tmp_path, *SMALL, "epochs=3", "checkpoint_every=2", "keep_checkpoints=5", f"output_dir={out}")
    assert sorted(p.name for p in (out / "checkpoints").glob("epoch-*")) == ["epoch-0002.pt", "epoch-0003.pt"]


def test_resume_never_refuses_an_earlier_run_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "run"
    train(tmp_path, *SMALL, "epochs=2", f"output_dir={out}")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = train(tmp_path, *SMALL, "epochs=1", "resume=never", f"output_dir={out}", check=False)
    assert refused.returncode == 2
    assert error_lines(refused.stderr) == [
        f"fmdist: error: output_dir {out} already holds a finished run (resume=never); "
        "choose another output_dir or set overwrite=true"
    ]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    train(tmp_path, *SMALL, "epochs=1", "resume=never", "overwrite=true", f"output_dir={out}")
    assert [r["epoch"] for r in read_history(out)] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "epoch-0001.pt"]


# ------------------------------------------------------------------------------ start decisions


def plan(folder, *overrides, restarted=False):
    cfg = load_config(CONFIGS / "smoke.yaml", [f"output_dir={folder}", *overrides])
    return plan_start(cfg, RunFolder(folder), CheckpointStore(folder / "checkpoints"), restarted)


def test_plan_start_on_an_empty_folder_and_on_an_interrupted_run_without_checkpoints(tmp_path):
    assert plan(tmp_path / "new").resume_from is None
    (tmp_path / "history.json").write_text("[]")
    started = plan(tmp_path)
    assert started.resume_from is None and started.replaces_earlier_run
    assert "interrupted run without checkpoints" in started.notes[0]


def test_under_a_decaying_schedule_epochs_belongs_to_the_run_and_under_a_constant_rate_it_does_not():
    def run_fingerprint(*overrides):
        return fingerprint(load_config(CONFIGS / "smoke.yaml", list(overrides)), 1, "no", "digest")

    check_same_run(run_fingerprint("epochs=3"), run_fingerprint("epochs=5"), Path("c.pt"))  # extending: fine
    cosine = ("optimizer.schedule=cosine",)
    with pytest.raises(FmdistError, match=r"c\.pt belongs to a different run: epochs \(3 -> 5\)"):
        check_same_run(run_fingerprint(*cosine, "epochs=3"), run_fingerprint(*cosine, "epochs=5"), Path("c.pt"))


def test_plan_start_on_a_new_folder_with_resume_never_starts_fresh(tmp_path):
    fresh = plan(tmp_path / "new", "resume=never")
    assert (fresh.resume_from, fresh.replaces_earlier_run, fresh.notes) == (None, False, [])


def test_plan_start_after_an_elastic_restart_resumes_even_with_resume_never(tmp_path):
    folder = tmp_path / "run"
    train(tmp_path, *SMALL, "epochs=1", f"output_dir={folder}")
    restarted = plan(folder, "resume=never", restarted=True)
    assert restarted.resume_from == folder / "checkpoints" / "epoch-0001.pt"


def test_best_pt_outlives_the_periodic_checkpoints_of_its_epoch(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    for epoch in range(1, 6):
        state = {"format": 1, "epoch": epoch, "step": 0, "model": {}, "optimizer": {}, "history": [], "rng": [],
                 "fingerprint": {}}  # fmt: skip
        store.save(state, Position(epoch), periodic=True, best=epoch == 2, keep=2)
    assert [path.name for _, path in store.saved()] == ["epoch-0004.pt", "epoch-0005.pt"]
    assert load_checkpoint(store.folder / "best.pt")["epoch"] == 2


def test_random_states_round_trip_through_a_checkpoint_file(tmp_path):
    import random

    import numpy as np

    from fmdist.checkpoints import capture_rng, restore_rng

    augment = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3), torch.rand(7, generator=augment)
    torch.save({"rng": [capture_rng(augment)]}, tmp_path / "states.pt")
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3), torch.rand(3, generator=augment))

    random.seed(10), np.random.seed(20), torch.manual_seed(30), augment.manual_seed(50)
    restore_rng(torch.load(tmp_path / "states.pt", weights_only=True)["rng"][0], augment)
    drawn = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3), torch.rand(3, generator=augment))
    assert drawn[:3] == expected[:3]
    assert torch.equal(drawn[3], expected[3]) and torch.equal(drawn[4], expected[4])


def test_a_two_process_checkpoint_holds_each_ranks_augmentation_state(tmp_path):
    out = tmp_path / "run"
    train(tmp_path, *SMALL, "epochs=1", "data.augment=true", f"output_dir={out}", nproc=2)
    states = load_checkpoint(out / "checkpoints" / "epoch-0001.pt")["rng"]
    assert len(states) == 2
    assert not torch.equal(states[0]["augment"], states[1]["augment"])  # each rank draws its own crops


# ------------------------------------------------------------------------------ crash mid-save

SAVER = textwrap.dedent(
    """
    import os, signal, sys, torch
    from pathlib import Path
    from fmdist.checkpoints import CheckpointStore, Position
    store = CheckpointStore(Path(sys.argv[1]))
    die_at_rename = int(sys.argv[2])  # 0: run until killed from outside
    renames, rename = 0, os.replace

    def rename_or_die(source, target):  # the file is written and fsynced, the rename not yet done
        global renames
        renames += 1
        if renames == die_at_rename:
            os.kill(os.getpid(), signal.SIGKILL)
        rename(source, target)

    os.replace = rename_or_die
    state = {"format": 1, "step": 0, "model": {"w": torch.randn(4_000_000)}, "optimizer": {}, "history": [],
             "rng": [], "fingerprint": {}}
    epoch = 0
    while True:
        epoch += 1
        state["epoch"] = epoch
        store.save(state, Position(epoch), periodic=True, best=epoch % 2 == 0, keep=2)
        print(epoch, flush=True)
    """
)


@pytest.mark.parametrize(
    "kill",
    [("after", 0.4), ("after", 0.9), ("after", 1.7), ("at rename", 3), ("at rename", 5)],
    ids=["after-0.4s", "after-0.9s", "after-1.7s", "at-3rd-rename-best", "at-5th-rename-periodic"],
)
def test_a_process_killed_while_saving_never_leaves_a_corrupt_checkpoint(tmp_path, kill):
    how, when = kill
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    folder = tmp_path / "checkpoints"
    die_at_rename = when if how == "at rename" else 0
    command = [sys.executable, str(script), str(folder), str(die_at_rename)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE)
    process.stdout.readline()  # at least one checkpoint is complete
    try:
        process.wait(timeout=when if how == "after" else 60)
    except subprocess.TimeoutExpired:
        process.kill()
    assert process.wait() == -signal.SIGKILL
    store = CheckpointStore(folder)
    if how == "at rename":  # killed between writing a file and renaming it into place
        assert len(list(folder.glob(".*.tmp"))) == 1
    assert store.saved(), "no checkpoint survived"
    for _, path in store.saved():
        assert load_checkpoint(path)["epoch"] == Position.from_file_name(path.name).epoch
    if (folder / "best.pt").exists():
        load_checkpoint(folder / "best.pt")
    assert store.latest_readable(warn=pytest.fail) is not None
    RunFolder(tmp_path).remove_unfinished_writes()
    assert not list(folder.glob(".*.tmp"))


def test_interrupted_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from fmdist import outputs

    target = tmp_path / "history.json"
    outputs.atomic_write(target, b"old")

    def crash(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        outputs.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]


# ------------------------------------------------------------------------------ secrets


def test_no_secret_from_the_environment_reaches_config_log_or_outputs(tmp_path):
    secret = "wandb-key-0123456789abcdef0123456789abcdef"
    out = tmp_path / "run"
    # W&B on (offline: the key must not make it try the network), so its files are checked too
    result = train(
        tmp_path, *SMALL, "epochs=1", f"output_dir={out}", "wandb.mode=offline", nproc=2,
        env={"WANDB_API_KEY": secret, "HF_TOKEN": secret, "AWS_SECRET_ACCESS_KEY": secret, "WANDB_MODE": None},
    )  # fmt: skip
    report = run_command(
        [sys.executable, "-m", "fmdist.report", str(out), "--output", str(tmp_path / "report")],
        cwd=tmp_path,
        env={"WANDB_API_KEY": secret, "HF_TOKEN": secret},
    )
    assert secret not in result.stdout + result.stderr + report.stdout + report.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and (tmp_path / "report" / "report.md") in files
    assert len(files) >= 12
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    assert "WANDB" not in json.dumps(load_checkpoint(out / "checkpoints" / "epoch-0001.pt")["fingerprint"])


def test_every_checkpoint_and_weights_load_refuses_arbitrary_pickles(tmp_path):
    out = tmp_path / "run"
    train(tmp_path, *SMALL, "epochs=1", f"output_dir={out}")
    evil = out / "checkpoints" / "epoch-0002.pt"
    torch.save({"format": 1, "payload": shutil.rmtree}, evil)  # a pickle that names a callable
    result = train(tmp_path, *SMALL, "epochs=2", f"output_dir={out}")
    assert "refused by torch.load(weights_only=True)" in result.stderr
    assert "resuming from" in result.stdout and "epoch-0001.pt" in result.stdout
