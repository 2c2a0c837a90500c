"""The speed benchmark: it compares like with like, and a small run yields every figure."""

import numpy as np
import torch

from fmdist.bench import Sizes, TutorialDataset, kaggle_frame, measure, table, tutorial_loader
from fmdist.distributed import resolve_mixed_precision
from fmdist.transforms import BatchTransform


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


def test_a_small_benchmark_run_reports_every_figure_and_ratio():
    results = measure("cpu", Sizes(data_images=512, train_steps=2, eval_images=256, ddp_train_images=512))
    for key in ("data_images_per_sec", "train_images_per_sec", "eval_images_per_sec"):
        pair = results[key]
        assert pair["tutorial"] > 0 and pair["fmdist"] > 0
    ratios = results["ratios"]
    assert (
        ratios["train_ratio"] == results["train_images_per_sec"]["fmdist"] / results["train_images_per_sec"]["tutorial"]
    )
    assert set(results["ddp_cpu"]) == {1, 2} and all(r["peak_rss_mb"] > 100 for r in results["ddp_cpu"].values())
    assert 0 < results["data_rss_mb"]["fmdist"] and results["data_rss_mb"]["raw_dataset"] > 50
    assert results["fmdist_precision"] == resolve_mixed_precision("auto", "cpu") and results["fmdist_channels_last"]
    text = table(results)
    assert "| data pipeline, images/s |" in text and "2/1 =" in text and ">= 20x:" in text
