"""What the run's figures draw: the sample grid with class names, the curves, the confusion matrix."""

import numpy as np
import pytest
import torch
from PIL import Image

from fmdist import plots
from fmdist.data import FASHION_MNIST_CLASSES


@pytest.fixture
def drawn(monkeypatch):
    """The figures plots.* draw, captured before they are saved (and still saved)."""
    figures = []
    save = plots._save

    def capture(fig, path):
        figures.append(
            [
                {
                    "title": ax.get_title(),
                    "xlabel": ax.get_xlabel(),
                    "ylabel": ax.get_ylabel(),
                    "lines": [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()],
                    "line_labels": [line.get_label() for line in ax.get_lines()],
                    "line_styles": [line.get_linestyle() for line in ax.get_lines()],
                    "line_colors": [line.get_color() for line in ax.get_lines()],
                    "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [],
                    "images": [np.asarray(image.get_array()) for image in ax.get_images()],
                    "xticklabels": [t.get_text() for t in ax.get_xticklabels()],
                    "yticklabels": [t.get_text() for t in ax.get_yticklabels()],
                }
                for ax in fig.axes
            ]
        )
        save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    return figures


def test_samples_grid_titles_each_image_with_its_class_name(tmp_path, drawn):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.tensor([(7 * i) % 10 for i in range(40)])
    plots.save_samples_grid(images, labels, FASHION_MNIST_CLASSES, tmp_path / "samples.png", rows=4, cols=8)

    (axes,) = drawn
    assert len(axes) == 32  # the first rows x cols images, no more
    assert [ax["title"] for ax in axes] == [FASHION_MNIST_CLASSES[int(label)] for label in labels[:32]]
    for index, ax in enumerate(axes):
        np.testing.assert_array_equal(ax["images"][0], images[index].numpy())
    with Image.open(tmp_path / "samples.png") as png:
        assert png.format == "PNG" and png.size == (1120, 640)  # figsize 8*1.4 x 4*1.6 inches at 100 dpi


def test_samples_grid_leaves_empty_cells_blank_for_a_small_split(tmp_path, drawn):
    images = torch.zeros(3, 28, 28, dtype=torch.uint8)
    plots.save_samples_grid(images, torch.tensor([0, 9, 4]), FASHION_MNIST_CLASSES, tmp_path / "s.png")
    (axes,) = drawn
    assert [ax["title"] for ax in axes[:3]] == ["T-shirt/top", "Ankle boot", "Coat"]
    assert all(ax["title"] == "" and not ax["images"] for ax in axes[3:])


def test_curves_draw_both_losses_and_the_accuracy_per_epoch(tmp_path, drawn):
    history = [
        {"epoch": 1, "train_loss": 0.9, "val_loss": 0.7, "val_acc": 0.71},
        {"epoch": 2, "train_loss": 0.5, "val_loss": 0.6, "val_acc": 0.80},
        {"epoch": 3, "train_loss": 0.3, "val_loss": 0.65, "val_acc": 0.79},
    ]
    plots.save_curves(history, tmp_path / "curves.png", title="scratch")

    (axes,) = drawn
    loss, accuracy = axes
    assert loss["ylabel"] == "cross-entropy" and accuracy["ylabel"] == "validation accuracy (%)"
    assert loss["lines"] == [([1, 2, 3], [0.9, 0.5, 0.3]), ([1, 2, 3], [0.7, 0.6, 0.65])]
    assert accuracy["lines"][0][0] == [1, 2, 3]
    assert accuracy["lines"][0][1] == pytest.approx([71.0, 80.0, 79.0])
    with Image.open(tmp_path / "curves.png") as png:
        assert png.format == "PNG" and png.size == (1000, 400)


def test_confusion_matrix_names_the_classes_on_both_axes(tmp_path, drawn):
    confusion = np.eye(10, dtype=int) * 5
    confusion[0, 6] = 3  # T-shirts taken for shirts
    plots.save_confusion(confusion.tolist(), FASHION_MNIST_CLASSES, tmp_path / "confusion.png", title="frozen")

    (axes,) = drawn
    matrix = axes[0]
    assert matrix["xticklabels"] == list(FASHION_MNIST_CLASSES)
    assert matrix["yticklabels"] == list(FASHION_MNIST_CLASSES)
    cells = matrix["images"][0]
    assert cells[0, 6] == pytest.approx(3 / 8) and cells[0, 0] == pytest.approx(5 / 8)  # row-normalised
    assert (tmp_path / "confusion.png").stat().st_size > 0


# Three regimes as a comparison report overlays them; scratch trained one epoch fewer.
REGIME_HISTORIES = {
    "pretrained": [
        {"epoch": 1, "train_loss": 0.6, "val_loss": 0.5, "val_acc": 0.82},
        {"epoch": 2, "train_loss": 0.4, "val_loss": 0.45, "val_acc": 0.85},
        {"epoch": 3, "train_loss": 0.3, "val_loss": 0.44, "val_acc": 0.86},
    ],
    "scratch": [
        {"epoch": 1, "train_loss": 0.9, "val_loss": 0.7, "val_acc": 0.71},
        {"epoch": 2, "train_loss": 0.6, "val_loss": 0.6, "val_acc": 0.78},
    ],
    "partial (layer4)": [
        {"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_acc": 0.75},
        {"epoch": 2, "train_loss": 0.5, "val_loss": 0.55, "val_acc": 0.80},
        {"epoch": 3, "train_loss": 0.45, "val_loss": 0.5, "val_acc": 0.81},
    ],
}


def test_accuracy_overlay_draws_one_line_per_regime_on_one_axes(tmp_path, drawn):
    plots.save_overlay(REGIME_HISTORIES, [("val_acc", "")], "validation accuracy (%)", tmp_path / "accuracy.png",
                       "Validation accuracy", scale=100)  # fmt: skip

    (axes,) = drawn
    (ax,) = axes  # every regime on the same axes
    assert (ax["title"], ax["xlabel"]) == ("Validation accuracy", "epoch")
    assert ax["ylabel"] == "validation accuracy (%)"
    assert ax["line_labels"] == ax["legend"] == list(REGIME_HISTORIES)
    for (x, y), history in zip(ax["lines"], REGIME_HISTORIES.values(), strict=True):
        assert x == [r["epoch"] for r in history]
        assert y == pytest.approx([100 * r["val_acc"] for r in history])
    assert len(set(ax["line_colors"])) == 3, "one colour per regime"


def test_loss_overlay_draws_training_solid_and_validation_dashed_for_each_regime(tmp_path, drawn):
    plots.save_overlay(REGIME_HISTORIES, [("train_loss", "training"), ("val_loss", "validation")], "cross-entropy",
                       tmp_path / "loss.png", "Training (solid) and validation (dashed) loss")  # fmt: skip

    (axes,) = drawn
    (ax,) = axes
    assert ax["ylabel"] == "cross-entropy"
    expected = [(name, key, label) for name in REGIME_HISTORIES
                for key, label in (("train_loss", "training"), ("val_loss", "validation"))]  # fmt: skip
    assert ax["line_labels"] == ax["legend"] == [f"{name} {label}" for name, _, label in expected]
    for (x, y), (name, key, _) in zip(ax["lines"], expected, strict=True):
        assert x == [r["epoch"] for r in REGIME_HISTORIES[name]]
        assert y == [r[key] for r in REGIME_HISTORIES[name]]
    assert ax["line_styles"] == ["-", "--"] * 3
    colors = ax["line_colors"]
    assert colors[0::2] == colors[1::2], "a regime's two losses share its colour"
    assert len(set(colors)) == 3
    with Image.open(tmp_path / "loss.png") as png:
        assert png.format == "PNG" and png.size == (800, 450)
