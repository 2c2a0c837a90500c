"""W&B from rank 0 only, offline without credentials; progress as a bar in a terminal, lines elsewhere."""

import fcntl
import json
import math
import os
import pty
import re
import struct
import subprocess
import termios

import pytest

from fmdist import tracking
from fmdist.config import load_config
from fmdist.report import TRACKED_SUMMARY_KEYS

from helpers import (
    CONFIGS,
    OFFLINE_ENV,
    launch_env,
    read_history,
    read_wandb_run,
    train,
    train_command,
    train_ranks,
)

SMALL = ("--config", str(CONFIGS / "smoke.yaml"), "data.train_size=512", "data.test_size=100")


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    return {"WANDB_MODE": None, "HOME": str(tmp_path)}


def test_two_process_run_makes_exactly_one_offline_wandb_run_matching_history(tmp_path, no_credentials):
    out = tmp_path / "run"
    overrides = ["epochs=3", f"output_dir={out}", "wandb.project=fmdist-ci", "wandb.entity=ci-team",
                 "wandb.group=nightly", "wandb.tags=smoke,ci", "wandb.name=nightly-scratch"]  # fmt: skip
    result = train(tmp_path, *SMALL, *overrides, nproc=2, env=no_credentials)
    offline_lines = [line for line in result.stdout.splitlines() if "W&B logging offline" in line]
    assert len(offline_lines) == 1 and "no W&B credentials found" in offline_lines[0]
    assert "upload later with: wandb sync" in offline_lines[0]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "only rank 0 may create a W&B run"
    logged = read_wandb_run(next(runs[0].glob("run-*.wandb")))

    run = logged["run"]
    assert (run.project, run.entity, run.run_group) == ("fmdist-ci", "ci-team", "nightly")
    # (without wandb.name the run is named after its folder: see the comparison's W&B test)
    assert run.job_type == "scratch" and run.display_name == "nightly-scratch"
    assert list(run.tags) == ["smoke", "ci"]
    resolved = load_config(SMALL[1], [*SMALL[2:], *overrides])
    logged_config = {key: value for key, value in logged["config"].items() if key != "_wandb"}
    # Compared as JSON, the form W&B stores it in.
    assert logged_config == json.loads(json.dumps(tracking.public_config(resolved)))

    history = read_history(out)
    # One row per epoch, at step = epoch; the final images join the last epoch's row.
    assert [(row["_step"], row["epoch"]) for row in logged["history"]] == [(1, 1), (2, 2), (3, 3)]
    for row, record in zip(logged["history"], history, strict=True):
        for key, value in record.items():
            assert math.isclose(row[key], value, rel_tol=1e-12), (key, record["epoch"])
    last_row = logged["history"][-1]
    assert last_row["curves/_type"] == "image-file" and last_row["confusion/_type"] == "image-file"

    summary = json.loads((out / "summary.json").read_text())
    best = max(history, key=lambda r: r["val_acc"])
    assert logged["summary"]["best_val_acc"] == best["val_acc"]
    assert logged["summary"]["best_epoch"] == best["epoch"]
    assert {key: logged["summary"][key] for key in TRACKED_SUMMARY_KEYS} == {
        key: summary[key] for key in TRACKED_SUMMARY_KEYS
    }
    # Whatever else the summary holds is W&B's own bookkeeping, the final images, or the last
    # epoch's metrics, which must be history.json's.
    images = ("curves", "confusion", "samples")
    rest = {
        key: value
        for key, value in logged["summary"].items()
        if key not in TRACKED_SUMMARY_KEYS and not key.startswith("_") and key.split("/")[0] not in images
    }
    assert rest.keys() == history[-1].keys()
    for key, value in rest.items():
        assert math.isclose(value, history[-1][key], rel_tol=1e-12), key


def test_a_finished_run_extended_by_a_second_launch_continues_the_same_wandb_run(tmp_path, no_credentials):
    out = tmp_path / "run"
    train(tmp_path, *SMALL, "epochs=1", f"output_dir={out}", env=no_credentials)
    run_id = (out / "wandb-run-id").read_text().strip()
    result = train(tmp_path, *SMALL, "epochs=2", f"output_dir={out}", env=no_credentials)  # constant LR: extendable
    assert "fmdist: resuming from" in result.stdout
    assert (out / "wandb-run-id").read_text().strip() == run_id
    # Offline, each launch writes its own folder under the same run id; `wandb sync` joins them into one run.
    launches = sorted((out / "wandb").glob("offline-run-*"))
    assert [folder.name.rsplit("-", 1)[1] for folder in launches] == [run_id, run_id]
    logged = [read_wandb_run(next(folder.glob("run-*.wandb"))) for folder in launches]
    assert [record["run"].run_id for record in logged] == [run_id, run_id]
    assert [row["epoch"] for record in logged for row in record["history"]] == [1, 2]
    assert [row["epoch"] for row in read_history(out)] == [1, 2]


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


def test_mode_reason_names_what_chose_the_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tracking.mode_and_reason("auto") == ("offline", "no W&B credentials found")
    assert tracking.mode_and_reason("offline") == ("offline", "wandb.mode=offline")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.mode_and_reason("auto") == ("online", "W&B credentials found")
    # With credentials at hand, offline can only come from the environment.
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.mode_and_reason("auto") == ("offline", "WANDB_MODE=offline in the environment")
    assert tracking.mode_and_reason("online") == ("offline", "WANDB_MODE=offline in the environment")
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert tracking.mode_and_reason("auto") == ("offline", "WANDB_MODE=dryrun in the environment")


def test_a_tracker_offline_by_the_environment_logs_that_reason(tmp_path, monkeypatch, capsys):
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # credentials exist: they are not why it is offline
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "run"
    out.mkdir()
    tracker = tracking.Tracker.start(load_config(CONFIGS / "smoke.yaml", [f"output_dir={out}"]), out)
    tracker.finish({}, {}, step=0)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "W&B" in line]
    assert line.startswith("fmdist: W&B logging offline (WANDB_MODE=offline in the environment) to ")
    (offline_run,) = (out / "wandb").glob("offline-run-*")
    assert line.endswith(f"; upload later with: wandb sync {offline_run}")


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


def test_progress_lines_further_apart_than_an_epoch_are_one_line_at_each_epoch_s_end(tmp_path):
    result = train(tmp_path, *SMALL, "epochs=2", "progress_every=3600", f"output_dir={tmp_path / 'run'}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(" loss ")[0] for line in lines] == ["epoch 1/2 step 8/8 (100%)", "epoch 2/2 step 8/8 (100%)"]
    assert " ETA epoch 0:00 run " in lines[0]
    assert lines[1].endswith(" ETA epoch 0:00 run 0:00"), "nothing left at the run's last step"


def test_progress_in_a_terminal_is_a_tqdm_bar_per_epoch(tmp_path):
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal has a size
    process = subprocess.Popen(
        train_command(*SMALL, "epochs=2", f"output_dir={tmp_path / 'run'}"), cwd=tmp_path, env=launch_env(),
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
    # A bar redraws itself with \r; what stays on screen is the last drawing before each newline.
    shown = [line.rstrip("\r").split("\r")[-1] for line in text.split("\n")]
    bars = [line for line in shown if re.match(r"epoch \d+/\d+: ", line)]
    assert [bar.split(":")[0] for bar in bars] == ["epoch 1/2", "epoch 2/2"], "one bar per epoch, each left on screen"
    for bar in bars:
        assert "100%|" in bar and "8/8 [" in bar and "images_per_s=" in bar and re.search(r"loss=\d+\.\d{4}", bar)
    assert "ETA epoch" not in text


def test_in_a_successful_two_rank_run_rank_one_writes_nothing_at_all(tmp_path, no_credentials):
    # W&B on (offline) and a progress line every step: everything rank 0 prints, rank 1 must not.
    ranks = train_ranks(tmp_path, *SMALL, "epochs=2", "progress=lines", "progress_every=0.000001",
                        f"output_dir={tmp_path / 'run'}", nproc=2, env=no_credentials)  # fmt: skip
    assert [rank.returncode for rank in ranks] == [0, 0], ranks[0].stderr[-3000:] + ranks[1].stderr[-3000:]
    zero, one = ranks
    for epoch in (1, 2):
        assert f"Epoch: {epoch} \tTraining Loss: " in zero.stdout
        assert f"Epoch: {epoch} \tValidation Loss: " in zero.stdout
        assert f"epoch {epoch}/2 step 1/4 " in zero.stdout
    assert "W&B logging offline" in zero.stdout and "fmdist: done:" in zero.stdout
    assert (one.stdout, one.stderr) == ("", "")
