"""Speed: fmdist's pipeline against the tutorial's, side by side on one machine.

    python -m fmdist.bench [--device cpu|cuda] [--quick | --sizes DATA,STEPS,EVAL,DDP] [--json PATH]

The tutorial's pipeline: a Dataset over a pandas frame in Kaggle's layout that sends every image
through PIL (ToPILImage -> Resize -> ToTensor), a DataLoader with num_workers=0, ResNet-18 in
fp32, Adam 1e-3, batch 256. fmdist's: the defaults of `fmdist-train` on the same device (the
split held on the device, batches cut by indexing it, per-batch transforms on the device,
channels-last, the precision `mixed_precision=auto` picks) through the engine's own training and
evaluation loops. Both see the same synthetic images of FashionMNIST's size.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fmdist import distributed
from fmdist.config import load_config
from fmdist.data import FASHION_MNIST_SIZES, IMAGE_SIDE, eval_loader, load_splits, synthetic_images, train_loader
from fmdist.engine import EpochProgress, evaluate, train_one_epoch
from fmdist.models import resnet18
from fmdist.optim import build_optimizer
from fmdist.regimes import build_model
from fmdist.train import in_memory_format
from fmdist.transforms import BatchTransform

BATCH = 256
WARMUP_STEPS = 2  # untimed, per training loop
TRAIN_ROUNDS = 3  # the timed training steps of the two loops alternate in this many rounds
T = TypeVar("T")
TARGETS = {"data_ratio": 20.0, "train_ratio": 1.4, "data_rss_ratio": 2.0}


@dataclass
class Sizes:
    data_images: int  # training images, each pass through the data pipelines (at least what the steps need)
    train_steps: int  # timed training steps, each way
    eval_images: int
    ddp_train_images: int  # training images of the 1- vs 2-process runs

    @classmethod
    def pick(cls, quick: bool, given: str | None = None) -> Sizes:
        if given:
            return cls(*(int(part) for part in given.split(",")))
        return cls(10240, 8, 2560, 4096) if quick else cls(60000, 30, 10000, 16384)


# ---------------------------------------------------------------------- the tutorial's pipeline
class TutorialDataset(Dataset):
    """The tutorial's FMDataset: rows of a Kaggle-format frame, one PIL round trip per image."""

    def __init__(self, frame: pd.DataFrame, transform):
        self.labels = frame["label"].to_numpy()
        self.pixels = frame.drop(columns="label").to_numpy().astype(np.uint8)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.pixels[index].reshape(IMAGE_SIDE, IMAGE_SIDE, 1)
        return self.transform(image), int(self.labels[index])


def kaggle_frame(images: torch.Tensor, labels: torch.Tensor) -> pd.DataFrame:
    """The frame `pd.read_csv` returns for a Kaggle FashionMNIST file (int64 columns)."""
    pixels = images.reshape(len(images), -1).numpy().astype(np.int64)
    frame = pd.DataFrame(pixels, columns=[f"pixel{i}" for i in range(1, pixels.shape[1] + 1)])
    frame.insert(0, "label", labels.numpy().astype(np.int64))
    return frame


def tutorial_loader(images: torch.Tensor, labels: torch.Tensor, shuffle: bool) -> DataLoader:
    from torchvision import transforms

    pipeline = transforms.Compose([transforms.ToPILImage(), transforms.Resize(IMAGE_SIDE), transforms.ToTensor()])
    return DataLoader(TutorialDataset(kaggle_frame(images, labels), pipeline), batch_size=BATCH, shuffle=shuffle)


def tutorial_data_rate(images, labels, device) -> float:
    """Images per second through the tutorial's batches. Like fmdist's, its loader is built before the
    clock starts: each side's one-time set-up is left out (fmdist's copy of the split to the device
    when its loader is built, the tutorial's pandas frame and its uint8 copy when its Dataset is),
    so both time only iterating batches and the per-batch work."""
    loader = tutorial_loader(images, labels, shuffle=True)
    start, count = time.perf_counter(), 0
    for batch, targets in loader:
        batch, targets = batch.to(device), targets.to(device)
        count += len(targets)
    _sync(device)
    return count / (time.perf_counter() - start)


def tutorial_trainer(images, labels, device) -> Callable[[int], tuple[int, float]]:
    """The tutorial's loop (fp32, contiguous tensors, its data path, loss.item() every step), warmed
    up; it trains `count` more steps per call and returns (images, seconds)."""
    torch.manual_seed(0)
    model = resnet18(in_channels=1, num_classes=10).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    model.train()
    batches = iter(tutorial_loader(images, labels, shuffle=True))

    def step(batch, targets):
        batch, targets = batch.to(device), targets.to(device)
        optimizer.zero_grad()
        loss = criterion(model(batch), targets)
        loss.backward()
        optimizer.step()
        return loss.item() * len(targets)

    def run(count: int) -> tuple[int, float]:
        start, images = time.perf_counter(), 0
        for batch, targets in itertools.islice(batches, count):
            step(batch, targets)
            images += len(targets)
        return images, time.perf_counter() - start

    run(WARMUP_STEPS)
    return run


def tutorial_eval_rate(images, labels, device) -> float:
    torch.manual_seed(0)
    model = resnet18(in_channels=1, num_classes=10).to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loader = tutorial_loader(images, labels, shuffle=False)  # one-time set-up, off the clock as fmdist's
    _sync(device)
    start, count, correct = time.perf_counter(), 0, 0
    with torch.no_grad():
        for batch, targets in loader:
            batch, targets = batch.to(device), targets.to(device)
            outputs = model(batch)
            criterion(outputs, targets).item()
            correct += (outputs.argmax(1) == targets).sum().item()
            count += len(targets)
    return count / (time.perf_counter() - start)


# ---------------------------------------------------------------------- fmdist's pipeline
def fmdist_setup(device: str, train_size: int, test_size: int):
    cfg = load_config(None, ["data.source=synthetic", f"data.train_size={train_size}", f"data.test_size={test_size}",
                             f"cpu={device == 'cpu'}", "wandb.mode=disabled"])  # fmt: skip
    runtime = distributed.setup(cfg)
    train_split, test_split = load_splits(cfg.data, cfg.model.num_classes)
    return cfg, runtime, train_split, test_split


def fmdist_data_rate(cfg, runtime, split) -> float:
    transform = BatchTransform.from_config(cfg, runtime.rank, runtime.device)
    loader = train_loader(split, BATCH, cfg.seed, cfg.data, runtime.device)
    loader.sampler.set_epoch(1)
    _sync(runtime.device)  # the copy of the split to the device is set-up, not batches: it ends before the clock
    start, count = time.perf_counter(), 0
    for batch, targets in loader:
        transform(batch, train=True)
        count += len(targets)
    _sync(runtime.device)
    return count / (time.perf_counter() - start)


def fmdist_trainer(cfg, runtime, split) -> Callable[[int], tuple[int, float]]:
    """fmdist's engine with fmdist-train's defaults, warmed up; as tutorial_trainer."""
    model, _ = build_model(cfg)
    optimizer = build_optimizer(cfg.optimizer, model)
    model, optimizer = runtime.accelerator.prepare(in_memory_format(model, cfg), optimizer)
    transform = BatchTransform.from_config(cfg, runtime.rank, runtime.device)
    loader = train_loader(split, BATCH, cfg.seed, cfg.data, runtime.device)
    loader.sampler.set_epoch(1)
    batches = iter(loader)

    def run(count: int) -> tuple[int, float]:
        stats = train_one_epoch(model, itertools.islice(batches, count), optimizer, transform, runtime.accelerator,
                                epoch=1, progress=EpochProgress(), stop_requested=lambda: False)  # fmt: skip
        return stats.images, stats.seconds

    run(WARMUP_STEPS)
    return run


def interleaved_rates(runs: dict[str, Callable[[int], tuple[int, float]]], steps: int) -> dict[str, float]:
    """Images/s of each loop, `steps` steps each, taken in turns over TRAIN_ROUNDS rounds: when the
    machine's speed drifts (other load on a shared host), both sides see the drift, not one."""
    rounds = [steps // TRAIN_ROUNDS + (i < steps % TRAIN_ROUNDS) for i in range(TRAIN_ROUNDS)]
    totals = {name: [0, 0.0] for name in runs}
    for count in filter(None, rounds):
        for name, run in runs.items():
            images, seconds = run(count)
            totals[name][0] += images
            totals[name][1] += seconds
    return {name: images / seconds for name, (images, seconds) in totals.items()}


def fmdist_eval_rate(cfg, runtime, split) -> float:
    model, _ = build_model(cfg)
    model = runtime.accelerator.prepare(in_memory_format(model, cfg))
    bare = runtime.accelerator.unwrap_model(model)
    transform = BatchTransform.from_config(cfg, runtime.rank, runtime.device)
    loader = eval_loader(split, cfg.eval_batch_size, cfg.data, runtime.device)
    _sync(runtime.device)  # the split's copy to the device ends before the clock, as in fmdist_data_rate
    start = time.perf_counter()
    stats = evaluate(bare, loader, transform, runtime.accelerator, cfg.model.num_classes)
    return stats.count / (time.perf_counter() - start)


# ---------------------------------------------------------------------- processes and memory
def ddp_runs(train_images: int, workdir: Path) -> dict:
    """The trainer as users start it, on the CPU: 1 process (batch 256) vs 2 (128 each), one epoch."""
    results = {}
    for nproc in (1, 2):
        out = workdir / f"ddp-{nproc}"
        trainer = ["-m", "fmdist.train", "data.source=synthetic", f"data.train_size={train_images}",
                   "data.test_size=256", "epochs=1", f"batch_size={BATCH // nproc}", "cpu=true",
                   "wandb.mode=disabled", "progress=off", f"output_dir={out}"]  # fmt: skip
        launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        done = subprocess.run([sys.executable, *launcher, *trainer], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the {nproc}-process run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        history = json.loads((out / "history.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
        results[nproc] = {
            "images_per_sec": history[-1]["train_images_per_sec"],
            "peak_rss_mb": max(summary["peak_rss_mb_per_process"]),
            "peak_rss_mb_per_process": summary["peak_rss_mb_per_process"],
        }
    return results


def write_fashion_mnist_sized_idx(folder: Path) -> int:
    """Synthetic images in FashionMNIST's raw files and sizes; returns the raw bytes of the data."""
    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    total = 0
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = synthetic_images(FASHION_MNIST_SIZES[split], 10, 0, split)
        for kind, array in (("images-idx3-ubyte", images.numpy()), ("labels-idx1-ubyte", labels.numpy())):
            array = np.ascontiguousarray(array, dtype=np.uint8)
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            (raw / f"{prefix}-{kind}").write_bytes(header + array.tobytes())
            total += array.nbytes
    return total


def data_memory_probe(root: str, device: str) -> dict:
    """In a fresh process: peak RSS added by fmdist's data path (both splits, one epoch of batches)."""
    from torchvision import datasets  # noqa: F401 - imported before the window opens, as in the tutorial's probe

    target = torch.device(device)
    # The device's runtime (a CUDA context: hundreds of MB of host memory) is not the data path's.
    torch.zeros(1, device=target)
    _sync(target)
    baseline = _start_rss_window()
    cfg = load_config(None, [f"data.root={root}", "data.download=false", f"cpu={device == 'cpu'}"])
    train_split, test_split = load_splits(cfg.data, cfg.model.num_classes)
    transform = BatchTransform.from_config(cfg, 0, target)
    for loader in (train_loader(train_split, BATCH, 0, cfg.data, target),
                   eval_loader(test_split, cfg.eval_batch_size, cfg.data, target)):  # fmt: skip
        for batch, _ in loader:
            transform(batch, train=True)
    return {"baseline_mb": baseline, "peak_mb": _peak_rss_mb()}


def tutorial_memory_probe(root: str) -> dict:
    """In a fresh process: peak RSS added by the tutorial's data (its frames, as read_csv returns them)."""
    from torchvision import datasets

    torch.zeros(1)
    baseline = _start_rss_window()
    frames = [kaggle_frame(d.data, d.targets) for d in (datasets.FashionMNIST(root, train=t) for t in (True, False))]
    datasets_ = [TutorialDataset(frame, transform=None) for frame in frames]
    return {"baseline_mb": baseline, "peak_mb": _peak_rss_mb(), "images": sum(len(d) for d in datasets_)}


def _probe(kind: str, root: Path, device: str) -> dict:
    command = [sys.executable, "-m", "fmdist.bench", f"--{kind}-probe", str(root), "--device", device]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _start_rss_window() -> float:
    """Reset this process's peak RSS to its current RSS (Linux: VmHWM via clear_refs); return it in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _with_gpu_peak(device: torch.device, build: Callable[[], T]) -> tuple[T, float | None]:
    """build()'s result, and the peak GPU memory of building it above what was allocated before
    (None off GPUs)."""
    if device.type != "cuda":
        return build(), None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = build()
    torch.cuda.synchronize(device)
    return result, (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ---------------------------------------------------------------------- the run
def measure(device_name: str, sizes: Sizes) -> dict:
    started = time.perf_counter()
    # enough training images for the warm-up steps and the timed ones
    train_size = max(sizes.data_images, (sizes.train_steps + WARMUP_STEPS) * BATCH)
    cfg, runtime, train_split, test_split = fmdist_setup(device_name, train_size, sizes.eval_images)
    device = runtime.device
    train_images, train_labels = train_split.images, train_split.labels
    results = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "sizes": dataclasses.asdict(sizes),
        "fmdist_precision": runtime.mixed_precision,
        "fmdist_channels_last": cfg.channels_last,
    }
    print(f"fmdist-bench: {results['device_name']}, torch {torch.__version__}", flush=True)

    results["data_images_per_sec"] = {
        "tutorial": tutorial_data_rate(train_images, train_labels, device),
        "fmdist": fmdist_data_rate(cfg, runtime, train_split),
    }
    print("fmdist-bench: data pipelines measured", flush=True)
    # Each side's GPU memory: the peak of its build and warm-up steps.
    tutorial_run, tutorial_gpu = _with_gpu_peak(device, lambda: tutorial_trainer(train_images, train_labels, device))
    fmdist_run, fmdist_gpu = _with_gpu_peak(device, lambda: fmdist_trainer(cfg, runtime, train_split))
    results["train_images_per_sec"] = interleaved_rates({"tutorial": tutorial_run, "fmdist": fmdist_run},
                                                        sizes.train_steps)  # fmt: skip
    if device.type == "cuda":
        results["train_gpu_peak_mb"] = {"tutorial": tutorial_gpu, "fmdist": fmdist_gpu}
    print("fmdist-bench: training steps measured", flush=True)
    results["eval_images_per_sec"] = {
        "tutorial": tutorial_eval_rate(test_split.images, test_split.labels, device),
        "fmdist": fmdist_eval_rate(cfg, runtime, test_split),
    }
    print("fmdist-bench: evaluation measured", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        results["ddp_cpu"] = ddp_runs(sizes.ddp_train_images, workdir)
        print("fmdist-bench: 1 and 2 processes measured", flush=True)
        raw_bytes = write_fashion_mnist_sized_idx(workdir / "data")
        fmdist_memory = _probe("data-memory", workdir / "data", device_name)
        tutorial_memory = _probe("tutorial-memory", workdir / "data", device_name)
    raw_mb = raw_bytes / 2**20
    results["data_rss_mb"] = {
        "raw_dataset": raw_mb,
        "fmdist": fmdist_memory["peak_mb"] - fmdist_memory["baseline_mb"],
        "tutorial": tutorial_memory["peak_mb"] - tutorial_memory["baseline_mb"],
    }
    results["ratios"] = {
        "data_ratio": _ratio(results["data_images_per_sec"]),
        "train_ratio": _ratio(results["train_images_per_sec"]),
        "eval_ratio": _ratio(results["eval_images_per_sec"]),
        "ddp_2_vs_1": results["ddp_cpu"][2]["images_per_sec"] / results["ddp_cpu"][1]["images_per_sec"],
        "data_rss_ratio": results["data_rss_mb"]["fmdist"] / raw_mb,
    }
    results["seconds"] = time.perf_counter() - started
    return results


def _ratio(pair: dict) -> float:
    return pair["fmdist"] / pair["tutorial"]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU ({torch.get_num_threads()} threads)"


def table(results: dict) -> str:
    r = results["ratios"]
    ddp = results["ddp_cpu"]
    rss = results["data_rss_mb"]
    rows = [
        ("data pipeline, images/s", results["data_images_per_sec"], r["data_ratio"], "data_ratio"),
        ("training step, ResNet-18 batch 256, images/s", results["train_images_per_sec"], r["train_ratio"],
         "train_ratio"),
        ("evaluation, images/s", results["eval_images_per_sec"], r["eval_ratio"], None),
    ]  # fmt: skip
    lines = [
        f"device: {results['device_name']}; fmdist precision {results['fmdist_precision']}, "
        f"channels_last {results['fmdist_channels_last']}",
        "| measurement | tutorial | fmdist | fmdist / tutorial | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, pair, ratio, target in rows:
        goal = _goal(ratio, TARGETS[target], at_least=True) if target else ""
        lines.append(f"| {name} | {pair['tutorial']:,.0f} | {pair['fmdist']:,.0f} | {ratio:.2f}x | {goal} |")
    lines.append(
        f"| data path peak RSS over a {rss['raw_dataset']:.0f} MB raw dataset, MB | {rss['tutorial']:,.0f} "
        f"| {rss['fmdist']:,.0f} | fmdist = {r['data_rss_ratio']:.2f}x raw | "
        f"{_goal(r['data_rss_ratio'], TARGETS['data_rss_ratio'], at_least=False)} |"
    )
    lines.append(
        f"| CPU training, 1 vs 2 processes (global batch 256), images/s | 1: {ddp[1]['images_per_sec']:,.0f} "
        f"| 2: {ddp[2]['images_per_sec']:,.0f} | 2/1 = {r['ddp_2_vs_1']:.2f}x | |"
    )
    lines.append(
        f"| peak RSS of the largest process (trainer), MB | 1: {ddp[1]['peak_rss_mb']:,.0f} "
        f"| 2: {' and '.join(f'{mb:,.0f}' for mb in ddp[2]['peak_rss_mb_per_process'])} | | |"
    )
    if "train_gpu_peak_mb" in results:
        gpu = results["train_gpu_peak_mb"]
        lines.append(f"| training GPU max allocated, MB | {gpu['tutorial']:,.0f} | {gpu['fmdist']:,.0f} | | |")
    lines.append(f"measured in {results['seconds']:.0f} s")
    return "\n".join(lines)


def _goal(value: float, target: float, at_least: bool) -> str:
    met = value >= target if at_least else value <= target
    return f"{'>=' if at_least else '<='} {target:g}x: {'met' if met else 'MISSED'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fmdist.bench", description="fmdist's pipeline against the tutorial's."
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer images and steps (under 3 minutes on a CPU)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--sizes",
        metavar="DATA,STEPS,EVAL,DDP",
        help="instead of --quick's: training images through the data pipelines, timed training steps, "
        "evaluation images, training images of the 1- vs 2-process runs (e.g. 512,2,256,512 for a smoke test)",
    )
    parser.add_argument("--data-memory-probe", metavar="ROOT", help=argparse.SUPPRESS)
    parser.add_argument("--tutorial-memory-probe", metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.data_memory_probe:
        print(json.dumps(data_memory_probe(args.data_memory_probe, args.device)))
        return 0
    if args.tutorial_memory_probe:
        print(json.dumps(tutorial_memory_probe(args.tutorial_memory_probe)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fmdist-bench: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    results = measure(args.device, Sizes.pick(args.quick, args.sizes))
    print(table(results))
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
