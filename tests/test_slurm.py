"""slurm/ against a real SLURM cluster: munged, slurmctld and two emulated nodes on this host.

The cluster starts once for this module and stops at its end. Without SLURM installed these
tests fail (they are not skipped): .ci/run installs it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from helpers import CONFIGS, REPO, comparable, free_port, launch_env, read_history
from slurm_cluster import LocalSlurmCluster

SMOKE = ("--config", str(CONFIGS / "smoke.yaml"))
JOB_TIMEOUT = 420


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Two nodes, two stand-in GPUs each: enough for multi-node jobs and for the GPU branch of
    # train.sbatch (the trainer itself still finds no CUDA device and runs on the CPU).
    slurm = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, gpus_per_node=2).start()
    yield slurm
    slurm.stop()


def submit(cluster: LocalSlurmCluster, *args: str, env: dict | None = None) -> str:
    env = launch_env({"FMDIST_PYTHON": sys.executable, **(env or {})})
    result = cluster.client("sbatch", "--parsable", *args, env=env, cwd=REPO)
    return result.stdout.strip().split(";")[0]


def finished(cluster: LocalSlurmCluster, job_id: str, timeout: float = JOB_TIMEOUT) -> dict:
    cluster.wait_until_gone([job_id], timeout)
    return cluster.job(job_id)


def wait_while_running(cluster: LocalSlurmCluster, job: str, log: Path, done) -> None:
    """Until done() holds; fails if the job ends first or the time runs out."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not done():
        assert time.monotonic() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), (
            log.read_text() if log.exists() else f"no log at {log}"
        )
        time.sleep(0.1)


def wait_for_first_checkpoint(cluster: LocalSlurmCluster, job: str, out: Path, log: Path) -> None:
    """Until the job's run has saved epoch 1."""
    wait_while_running(cluster, job, log, lambda: (out / "checkpoints" / "epoch-0001.pt").exists())


def test_sbatch_compare_runs_the_three_regimes_and_the_report_job_writes_one_report(cluster, tmp_path):
    out = tmp_path / "comparison"
    log = tmp_path / "compare.out"
    submitter = submit(cluster, f"--output={log}", str(REPO / "slurm" / "compare.sh"), *SMOKE,
                       "--output-dir", str(out), "epochs=2")  # fmt: skip
    assert finished(cluster, submitter)["JobState"] == "COMPLETED", log.read_text()
    printed = log.read_text()
    stand_in, array, report = re.findall(r"job (?:array )?(\d+)", printed)
    assert f"writes {out}/report.md" in printed

    cluster.wait_until_gone([stand_in, array, report], JOB_TIMEOUT)
    for job_id in (stand_in, report):
        assert cluster.job(job_id)["JobState"] == "COMPLETED", cluster.job(job_id)
    for element, regime in enumerate(("pretrained", "scratch", "frozen")):
        assert cluster.job(f"{array}_{element}")["JobState"] == "COMPLETED"
        assert [r["epoch"] for r in read_history(out / regime)] == [1, 2]
        summary = json.loads((out / regime / "summary.json").read_text())
        assert summary["regime"] == regime
        element_log = (out / f"slurm-fmdist-regime-{array}_{element}.out").read_text()
        assert f"regime={regime}" in element_log and "trainer exited with code 0" in element_log
    # pretrained and frozen start from the stand-in weights the first job trained
    frozen_config = (out / "frozen" / "config.yaml").read_text()
    assert str(out / "stand-in-pretraining" / "model.pt") in frozen_config

    text = (out / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "%" in line]
    assert rows[:3] == ["pretrained", "scratch", "frozen"]
    assert "Smoke run" in text and "reached the best validation accuracy" in text
    for figure in ("accuracy.png", "loss.png", "confusion.png"):
        assert (out / figure).stat().st_size > 5000 and f"({figure})" in text


def test_a_requeued_job_resumes_from_its_checkpoint_with_every_epoch_once(cluster, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "train.out"
    job = submit(cluster, f"--output={log}", str(REPO / "slurm" / "train.sbatch"), *SMOKE, "epochs=8",
                 f"output_dir={out}")  # fmt: skip
    # Waits for the job as compare.sh's report job waits for the regimes; released at the requeue,
    # it would find no model.pt (the run is not finished then) and fail.
    after = submit(cluster, f"--dependency=afterany:{job}", f"--output={tmp_path / 'after.out'}",
                   "--wrap", f"test -f {out / 'model.pt'}")  # fmt: skip
    wait_for_first_checkpoint(cluster, job, out, log)
    # What --signal=B:USR1@300 delivers five minutes before the time limit.
    cluster.client("scancel", "--signal=USR1", "--batch", job)

    state = finished(cluster, job)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1" and state["ExitCode"] == "0:0", text
    assert "received SIGUSR1" in text and f"job {job} requeued" in text
    assert re.search(rf"after checkpoint {out}/checkpoints/epoch-\d+-step-\d+\.pt; job {job} requeued", text), text
    assert not list(REPO.glob(".fmdist-stop-*"))  # the marker the trainer wrote for the script is gone
    # the trainer itself stopped on the forwarded SIGTERM, mid-run, and saved where it stopped
    assert len(re.findall(r"fmdist: stopped by SIGTERM at epoch \d+, step \d+; checkpoint", text)) == 1, text
    assert f"job {job} restart 1:" in text and "fmdist: resuming from" in text
    assert [r["epoch"] for r in read_history(out)] == list(range(1, 9))
    assert (out / "model.pt").is_file()
    assert finished(cluster, after)["JobState"] == "COMPLETED"


def test_a_stop_before_the_trainer_can_take_it_is_kept_and_the_job_requeues_with_every_epoch_once(cluster, tmp_path):
    """USR1 as soon as the batch script has started, before srun, torchrun and the workers have: the
    script survives it, and the trainer is asked once it handles SIGTERM, so it stops in its first
    epoch with a checkpoint, and the job is requeued and resumes from there."""
    out = tmp_path / "run"
    log = tmp_path / "train.out"
    job = submit(cluster, f"--output={log}", str(REPO / "slurm" / "train.sbatch"), *SMOKE, "epochs=2",
                 f"output_dir={out}")  # fmt: skip
    # The script's first line comes just before it starts srun.
    wait_while_running(cluster, job, log, lambda: log.exists() and f"job {job} restart 0:" in log.read_text())
    assert not (out / "checkpoints").exists()
    cluster.client("scancel", "--signal=USR1", "--batch", job)

    state = finished(cluster, job)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1" and state["ExitCode"] == "0:0", text
    assert re.search(rf"after checkpoint {out}/checkpoints/epoch-\d+-step-\d+\.pt; job {job} requeued", text), text
    assert len(re.findall(r"fmdist: stopped by SIGTERM at epoch 1, step \d+; checkpoint", text)) == 1, text
    assert f"job {job} restart 1:" in text and "fmdist: resuming from" in text
    assert not list(REPO.glob(".fmdist-stop-*"))
    assert [r["epoch"] for r in read_history(out)] == [1, 2]
    assert (out / "model.pt").is_file()


def test_without_requeue_a_stopped_job_ends_checkpointed_and_a_resubmission_resumes(cluster, tmp_path):
    """FMDIST_REQUEUE=0 after USR1 (and any SIGTERM): exit 75, no requeue; also a chosen rendezvous host and
    port, and processes per node."""
    out = tmp_path / "run"
    port = str(free_port())
    env = {"FMDIST_REQUEUE": "0", "FMDIST_RDZV_HOST": "localhost", "FMDIST_RDZV_PORT": port,
           "FMDIST_NPROC_PER_NODE": "2"}  # fmt: skip
    args = (str(REPO / "slurm" / "train.sbatch"), *SMOKE, "epochs=6", f"output_dir={out}")
    job = submit(cluster, f"--output={tmp_path / 'first.out'}", *args, env=env)
    wait_for_first_checkpoint(cluster, job, out, tmp_path / "first.out")
    cluster.client("scancel", "--signal=USR1", "--batch", job)

    state = finished(cluster, job)
    text = (tmp_path / "first.out").read_text()
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "75:0" and state["Restarts"] == "0", text
    assert f"rendezvous localhost:{port}" in text
    assert "1 node(s) x 2 process(es)" in text and "2 process(es) on cpu" in text  # not the one --ntasks asks for
    assert re.search(r"stopped by SIGUSR1 after checkpoint .*\.pt; submit the job again to resume", text), text
    assert not (out / "model.pt").exists()

    again = submit(cluster, f"--output={tmp_path / 'second.out'}", *args, env=env)
    assert finished(cluster, again)["JobState"] == "COMPLETED", (tmp_path / "second.out").read_text()
    assert "fmdist: resuming from" in (tmp_path / "second.out").read_text()
    assert [r["epoch"] for r in read_history(out)] == [1, 2, 3, 4, 5, 6]


def test_one_node_and_two_nodes_with_the_same_global_batch_train_the_same_run(cluster, tmp_path):
    """Two nodes, one torchrun each, one c10d rendezvous: the same run as two processes on one node."""
    layouts = {"one-node": ("--nodes=1", "--ntasks=2"), "two-nodes": ("--nodes=2", "--ntasks=2")}
    jobs = {}
    for name, flags in layouts.items():
        jobs[name] = submit(cluster, *flags, f"--output={tmp_path / name}.out", str(REPO / "slurm" / "train.sbatch"),
                            *SMOKE, "epochs=2", f"output_dir={tmp_path / name}")  # fmt: skip
    for name, job in jobs.items():
        assert finished(cluster, job)["JobState"] == "COMPLETED", (tmp_path / f"{name}.out").read_text()

    one, two = (tmp_path / "one-node.out").read_text(), (tmp_path / "two-nodes.out").read_text()
    assert "1 node(s) x 2 process(es)" in one and len(re.findall(r"starts torchrun", one)) == 1
    assert "2 node(s) x 1 process(es)" in two
    assert sorted(re.findall(r"node (c\d) \(node rank (\d)\) starts torchrun", two)) == [("c1", "0"), ("c2", "1")]
    assert len(re.findall(r"rendezvous 127\.0\.0\.1:\d+", two)) == 1
    assert "2 process(es) on cpu, batch 64 per process (128 global)" in two

    single, multi = comparable(read_history(tmp_path / "one-node")), comparable(read_history(tmp_path / "two-nodes"))
    assert len(single) == len(multi) == 2
    for a, b in zip(single, multi, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_gpus_set_the_processes_per_node_and_an_uneven_layout_or_a_bad_process_count_is_refused(cluster, tmp_path):
    gpu_job = submit(cluster, "--gres=gpu:2", f"--output={tmp_path / 'gpu.out'}", str(REPO / "slurm" / "train.sbatch"),
                     *SMOKE, "epochs=1", f"output_dir={tmp_path / 'gpu'}")  # fmt: skip
    uneven = submit(cluster, "--nodes=2", "--ntasks=3", f"--output={tmp_path / 'uneven.out'}",
                    str(REPO / "slurm" / "train.sbatch"), *SMOKE, f"output_dir={tmp_path / 'uneven'}")  # fmt: skip
    bad_count = submit(cluster, f"--output={tmp_path / 'bad-count.out'}", str(REPO / "slurm" / "train.sbatch"), *SMOKE,
                       f"output_dir={tmp_path / 'bad-count'}", env={"FMDIST_NPROC_PER_NODE": "two"})  # fmt: skip

    state = finished(cluster, gpu_job)
    text = (tmp_path / "gpu.out").read_text()
    assert state["JobState"] == "COMPLETED", text
    assert "1 node(s) x 2 process(es)" in text and "2 process(es) on cpu" in text

    state = finished(cluster, uneven)
    text = (tmp_path / "uneven.out").read_text()
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0"
    errors = [line for line in text.splitlines() if "error" in line]
    assert errors == ["fmdist-slurm: error: --ntasks=3 is not a multiple of --nodes=2: every node runs the same "
                      "number of CPU processes"]  # fmt: skip
    assert not Path(tmp_path / "uneven").exists()

    state = finished(cluster, bad_count)
    text = (tmp_path / "bad-count.out").read_text()
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0"
    errors = [line for line in text.splitlines() if "error" in line]
    assert errors == ["fmdist-slurm: error: processes per node: expected a positive integer, got 'two'"]
    assert not Path(tmp_path / "bad-count").exists()


def test_the_report_job_reports_what_finished_when_a_regime_fails(cluster, tmp_path):
    out = tmp_path / "comparison"
    log = tmp_path / "compare.out"
    missing = tmp_path / "no-such-weights.pth"  # pretrained and frozen fail on it; scratch does not need it
    submitter = submit(cluster, "--partition=second", f"--output={log}", str(REPO / "slurm" / "compare.sh"), *SMOKE,
                       "--output-dir", str(out), "epochs=1", "compare.stand_in_weights=false",
                       f"model.weights={missing}",
                       env={"FMDIST_TRAIN_SBATCH_ARGS": "--partition=debug --time=30"})  # fmt: skip
    assert finished(cluster, submitter)["JobState"] == "COMPLETED", log.read_text()
    array, report = re.findall(r"job (?:array )?(\d+)", log.read_text())
    assert "stand-in" not in log.read_text()

    cluster.wait_until_gone([array, report], JOB_TIMEOUT)
    elements = [cluster.job(f"{array}_{element}") for element in range(3)]
    assert [element["JobState"] for element in elements] == ["FAILED", "COMPLETED", "FAILED"]
    # torchrun's 1 for a failed worker, passed on by train.sbatch
    assert [element["ExitCode"] for element in elements] == ["1:0", "0:0", "1:0"]
    element_log = (out / f"slurm-fmdist-regime-{array}_0.out").read_text()
    assert "trainer exited with code 1" in element_log, element_log
    # the training jobs took FMDIST_TRAIN_SBATCH_ARGS; the report job went to the submitter's partition,
    # not the default one
    assert {(element["Partition"], element["TimeLimit"]) for element in elements} == {("debug", "00:30:00")}
    assert cluster.job(report)["Partition"] == "second"
    assert cluster.job(report)["JobState"] == "COMPLETED", (out / f"slurm-fmdist-report-{report}.out").read_text()
    text = (out / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "%" in line]
    assert rows[0] == "scratch" and "pretrained" not in rows and "frozen" not in rows
    assert str(out / "pretrained") in text and str(out / "frozen") in text


def test_compare_sh_refuses_a_bad_config_key_before_submitting_anything(cluster, tmp_path):
    result = cluster.client("bash", str(REPO / "slurm" / "compare.sh"), *SMOKE, "--output-dir", str(tmp_path / "c"),
                            "epoch=3", check=False, env=launch_env({"FMDIST_PYTHON": sys.executable}), cwd=REPO)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fmdist: error: command line: unknown key 'epoch'; did you mean 'epochs'?"
    ]
    assert not cluster.client("squeue", "-h").stdout.strip() and not (tmp_path / "c").exists()
