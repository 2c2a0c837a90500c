"""The speed benchmark: it compares like with like, and a small run yields every figure."""

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

from fmdist.bench import Sizes, TutorialDataset, kaggle_frame, tutorial_loader
from fmdist.distributed import resolve_mixed_precision
from fmdist.transforms import BatchTransform

from helpers import run_command


def test_the_tutorial_pipeline_and_fmdist_turn_an_image_into_the_same_input():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8))
    labels = torch.arange(6)
    frame = kaggle_frame(images, labels)
    assert list(frame.columns[:2]) == ["label", "pixel1"] and frame.shape == (6, 785)
    assert TutorialDataset(frame, transform=lambda image: image)[2][0].shape == (28, 28, 1)
    tutorial_images, tutorial_labels = next(iter(tutorial_loader(images, labels, shuffle=False)))
    fmdist = BatchTransform(28, 0.0, 1.0, 1, augment=False, channels_last=True, seed=0, rank=0, device="cpu")
    assert torch.equal(tutorial_labels, labels)
    assert torch.allclose(tutorial_images, fmdist(images, train=False), atol=1e-6)


def test_a_small_benchmark_run_from_the_command_line_reports_every_figure_and_ratio(tmp_path):
    command = [sys.executable, "-m", "fmdist.bench", "--device", "cpu", "--sizes", "512,2,256,512",
               "--json", str(tmp_path / "bench.json")]  # fmt: skip
    printed = run_command(command, cwd=tmp_path, timeout=600).stdout
    results = json.loads((tmp_path / "bench.json").read_text())
    assert json.loads(printed.strip().splitlines()[-1]) == results  # the printed JSON line is the file's
    assert results["sizes"] == {"data_images": 512, "train_steps": 2, "eval_images": 256, "ddp_train_images": 512}
    for key in ("data_images_per_sec", "train_images_per_sec", "eval_images_per_sec"):
        pair = results[key]
        assert pair["tutorial"] > 0 and pair["fmdist"] > 0
    ratios = results["ratios"]
    assert ratios["train_ratio"] == pytest.approx(
        results["train_images_per_sec"]["fmdist"] / results["train_images_per_sec"]["tutorial"]
    )
    ddp = results["ddp_cpu"]
    assert set(ddp) == {"1", "2"} and len(ddp["2"]["peak_rss_mb_per_process"]) == 2  # JSON keys are strings
    assert all(mb > 100 for run in ddp.values() for mb in run["peak_rss_mb_per_process"])
    assert 0 < results["data_rss_mb"]["fmdist"] and results["data_rss_mb"]["raw_dataset"] > 50
    assert results["fmdist_precision"] == resolve_mixed_precision("auto", "cpu") and results["fmdist_channels_last"]
    assert results["device"] == "cpu"
    assert "| data pipeline, images/s |" in printed and "2/1 =" in printed and ">= 20x:" in printed


def test_quick_sizes_are_smaller_than_the_full_run_and_a_missing_gpu_is_one_line(tmp_path):
    quick, full = Sizes.pick(quick=True), Sizes.pick(quick=False)
    assert all(q < f for q, f in zip(dataclasses.astuple(quick), dataclasses.astuple(full), strict=True))
    if torch.cuda.is_available():
        return
    refused = run_command([sys.executable, "-m", "fmdist.bench", "--device", "cuda"], cwd=tmp_path, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == ["fmdist-bench: error: --device cuda but no CUDA device is available"]
