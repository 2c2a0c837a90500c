"""Test helpers: launching the trainer as real processes, and writing real data files offline."""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
REAL_SAMPLE_CSV = Path(
    os.environ.get("FMDIST_REAL_SAMPLE_CSV", REPO.parent / "shared/data/fashion-mnist-real-sample.csv")
)
# A one-epoch run on a small synthetic task, for tests about something other than learning.
TINY_SYNTHETIC_RUN = ("data.source=synthetic", "data.train_size=256", "data.test_size=64", "batch_size=32", "epochs=1")
# Every launch is bounded: a hung collective fails the test instead of stalling CI.
LAUNCH_TIMEOUT = 300
# A proxy on a closed local port: anything that tries the internet fails at once instead of
# waiting for a network this machine does not have.
OFFLINE_ENV = {
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": "",
}


def launch_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.pop("NO_PROXY", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["WANDB_MODE"] = "disabled"  # the W&B tests turn it back on
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(*args: str, nproc: int | None = None) -> list[str]:
    """`python -m fmdist.train ARGS`, or the same under torchrun with `nproc` processes."""
    if nproc is None:
        return [sys.executable, "-m", "fmdist.train", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "fmdist.train",
        *args,
    ]


def run_command(command: list[str], cwd: Path, env: dict | None = None, timeout: int = LAUNCH_TIMEOUT, check=True):
    result = subprocess.run(command, cwd=cwd, env=launch_env(env), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
            f"--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def train(
    tmp_path: Path, *args: str, nproc: int | None = None, env: dict | None = None, check=True, timeout=LAUNCH_TIMEOUT
):
    return run_command(train_command(*args, nproc=nproc), cwd=tmp_path, env=env, check=check, timeout=timeout)


@dataclass
class RankOutcome:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def train_ranks(
    tmp_path: Path, *args: str, nproc: int, env: dict | None = None, timeout: float = LAUNCH_TIMEOUT
) -> list[RankOutcome]:
    """`python -m fmdist.train ARGS` as `nproc` processes started directly, as torchrun would set them up.

    Not under torchrun itself, which ends the other workers as soon as one fails: here each rank
    must end on its own, and its exit code and output are its own. Output goes to files (a full
    pipe would block a rank nobody is reading yet). If any rank is still running after `timeout`
    seconds, every rank is killed and the test fails naming the ones that hung.
    """
    logs = tmp_path / "rank-logs"
    logs.mkdir(exist_ok=True)
    port = free_port()
    processes = []
    for rank in range(nproc):
        rank_env = {
            **(env or {}),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        with open(logs / f"{rank}.stdout", "w") as stdout, open(logs / f"{rank}.stderr", "w") as stderr:
            processes.append(
                subprocess.Popen(
                    train_command(*args),
                    cwd=tmp_path,
                    env=launch_env(rank_env),
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                )
            )
    try:
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        hung = [rank for rank, process in enumerate(processes) if process.poll() is None]
        for rank in hung:
            kill_tree(processes[rank])
            processes[rank].wait()
    outcomes = [
        RankOutcome(
            rank, process.returncode, (logs / f"{rank}.stdout").read_text(), (logs / f"{rank}.stderr").read_text()
        )
        for rank, process in enumerate(processes)
    ]
    if hung:
        tails = "\n".join(f"--- rank {o.rank} stderr\n{o.stderr[-2000:]}" for o in outcomes)
        raise AssertionError(f"rank(s) {', '.join(map(str, hung))} still running after {timeout} s; killed\n{tails}")
    return outcomes


def read_history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text())


def write_kaggle_csv(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    header = "label," + ",".join(f"pixel{i}" for i in range(1, 785))
    rows = [
        ",".join([str(int(label))] + [str(int(v)) for v in image.reshape(-1)])
        for image, label in zip(images, labels, strict=True)
    ]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """An IDX file as FashionMNIST ships them: magic (0, 0, ubyte=0x08, ndim), big-endian dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_fashion_mnist_idx(root: Path, images: np.ndarray, labels: np.ndarray, train_count: int) -> Path:
    """FashionMNIST's four IDX files where torchvision keeps them (root/FashionMNIST/raw): the first
    train_count images are the training split, the rest the test split. Returns root (data.root)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, part in (("train", slice(0, train_count)), ("t10k", slice(train_count, None))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[part])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[part])
    return root


def load_real_sample() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels) of the real FashionMNIST sample, or skip if it is absent."""
    if not REAL_SAMPLE_CSV.is_file():
        pytest.skip(f"real FashionMNIST sample not found at {REAL_SAMPLE_CSV} (set FMDIST_REAL_SAMPLE_CSV)")
    table = np.loadtxt(REAL_SAMPLE_CSV, delimiter=",", skiprows=1, dtype=np.int64)
    return table[:, 1:].astype(np.uint8).reshape(-1, 28, 28), table[:, 0]


def start(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """A launch in the background; kill_tree ends it with everything it started."""
    return subprocess.Popen(
        command, cwd=cwd, env=launch_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def finish(process: subprocess.Popen, timeout: int = LAUNCH_TIMEOUT) -> tuple[int, str, str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        stdout, stderr = process.communicate()
        raise AssertionError(f"still running after {timeout} s\n{stdout[-3000:]}\n{stderr[-3000:]}") from None
    return process.returncode, stdout, stderr


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launch and every process below it (torchrun starts its workers in sessions of their own)."""
    victims, frontier = [], [process.pid]
    while frontier:
        pid = frontier.pop()
        victims.append(pid)
        frontier.extend(child_pids(pid))
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(path: Path, process: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> None:
    """Wait until `path` exists; fail at once if the process ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            stdout, stderr = process.communicate()
            raise AssertionError(
                f"ended ({process.returncode}) before {path} appeared\n{stdout[-3000:]}\n{stderr[-3000:]}"
            )
        if time.monotonic() > deadline:
            kill_tree(process)
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


def comparable(history: list[dict]) -> list[dict]:
    """A history without its timings, which differ between any two runs."""
    return [
        {k: v for k, v in record.items() if k not in ("epoch_seconds", "wall_seconds", "train_images_per_sec")}
        for record in history
    ]


def read_wandb_run(run_file: Path) -> dict:
    """The records of an offline W&B run (its run-<id>.wandb file): run metadata (its group and job
    type among them), config, history rows, summary.

    The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB
    blocks of records, each a 7-byte header (CRC32, little-endian length, type: 1 full, 2 first,
    3 middle, 4 last) and a protobuf wandb.proto.Record.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    block, position, pieces, payloads = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # the rest of a block too small for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            break
        pieces = chunk if kind in (1, 2) else pieces + chunk
        if kind in (1, 4):
            payloads.append(pieces)
    result = {"run": None, "config": {}, "history": [], "summary": {}}
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            result["run"] = record.run
            for item in record.run.config.update:
                result["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "config":  # changes made after init (run.config.update)
            for item in record.config.update:
                result["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            result["history"].append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "summary":
            for item in record.summary.update:
                result["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return result
