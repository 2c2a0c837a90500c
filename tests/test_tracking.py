"""W&B from rank 0 only, offline without credentials; progress as a bar in a terminal, lines elsewhere."""

import fcntl
import math
import os
import pty
import struct
import subprocess
import termios

import pytest

from fmdist import tracking
from fmdist.config import load_config

from helpers import CONFIGS, launch_env, read_history, read_wandb_run, train, train_command

SMALL = ("--config", str(CONFIGS / "smoke.yaml"), "data.train_size=512", "data.test_size=100")


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    return {"WANDB_MODE": None, "HOME": str(tmp_path)}


def test_two_process_run_makes_exactly_one_offline_wandb_run_matching_history(tmp_path, no_credentials):
    out = tmp_path / "run"
    result = train(tmp_path, *SMALL, "epochs=3", f"output_dir={out}", "wandb.tags=smoke,ci", nproc=2,
                   env=no_credentials)  # fmt: skip
    offline_lines = [line for line in result.stdout.splitlines() if "W&B logging offline" in line]
    assert len(offline_lines) == 1 and "no W&B credentials found" in offline_lines[0]
    assert "upload later with: wandb sync" in offline_lines[0]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "only rank 0 may create a W&B run"
    logged = read_wandb_run(next(runs[0].glob("run-*.wandb")))

    assert logged["run"].job_type == "scratch" and logged["run"].display_name == "run"
    assert list(logged["run"].tags) == ["smoke", "ci"]
    history = read_history(out)
    rows = {}
    for row in logged["history"]:
        rows.setdefault(row["epoch"], {}).update(row)
    assert sorted(rows) == [1, 2, 3]
    for record in history:
        for key, value in record.items():
            assert math.isclose(rows[record["epoch"]][key], value, rel_tol=1e-12), (key, record["epoch"])
    assert rows[3]["curves/_type"] == "image-file" and rows[3]["confusion/_type"] == "image-file"
    best = max(history, key=lambda r: r["val_acc"])
    assert logged["summary"]["best_val_acc"] == best["val_acc"]
    assert logged["summary"]["best_epoch"] == best["epoch"]


def test_disabled_wandb_writes_nothing(tmp_path, no_credentials):
    out = tmp_path / "run"
    result = train(tmp_path, *SMALL, "epochs=1", "wandb.mode=disabled", f"output_dir={out}",
                   env=no_credentials)  # fmt: skip
    assert not (out / "wandb").exists() and "W&B" not in result.stdout


def test_mode_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tracking.resolve_mode("auto") == "offline"
    assert tracking.resolve_mode("disabled") == "disabled"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password secret-key\n")
    os.chmod(tmp_path / ".netrc", 0o600)
    assert tracking.resolve_mode("auto") == "online"
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.resolve_mode("auto") == "online"
    assert tracking.resolve_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode("online") == "disabled"


def test_logged_config_is_the_resolved_config_without_secret_named_keys():
    logged = tracking.public_config(load_config(CONFIGS / "smoke.yaml", ["optimizer.lr=0.002"]))
    assert logged["optimizer"]["lr"] == 0.002 and logged["model"]["width"] == 16
    nested = {"wandb": {"api_key": "s", "project": "p"}, "Token": "t", "data": {"root": "r", "password": "x"}}
    assert tracking.without_secrets(nested) == {"wandb": {"project": "p"}, "data": {"root": "r"}}


# ------------------------------------------------------------------------------------ progress


def test_progress_in_a_pipe_is_periodic_lines_with_rate_and_eta_from_rank_zero_only(tmp_path):
    result = train(tmp_path, *SMALL, "epochs=2", "progress_every=0.000001", f"output_dir={tmp_path / 'run'}",
                   nproc=2)  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    steps_per_epoch = 512 // 2 // 64
    assert len(lines) == 2 * steps_per_epoch, "one line per step from rank 0, none from rank 1"
    assert lines[0].startswith(f"epoch 1/2 step 1/{steps_per_epoch} (25%) loss ")
    assert " images/s ETA epoch " in lines[0] and " run " in lines[0]
    assert "\r" not in result.stdout and "it/s" not in result.stderr


def test_progress_in_a_terminal_is_a_tqdm_bar(tmp_path):
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal has a size
    process = subprocess.Popen(
        train_command(*SMALL, "epochs=1", f"output_dir={tmp_path / 'run'}"), cwd=tmp_path, env=launch_env(),
        stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True,
    )  # fmt: skip
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closes when the process ends
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=300) == 0
    text = output.decode(errors="replace")
    assert "epoch 1/1: 100%|" in text and "8/8 [" in text and "images_per_s=" in text
    assert "ETA epoch" not in text
