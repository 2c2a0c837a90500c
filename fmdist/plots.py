"""PNG figures of a run: a grid of sample images with class names, and loss/accuracy curves."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fmdist.outputs import atomic_write  # noqa: E402


def save_samples_grid(
    images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], path: Path, rows: int = 4, cols: int = 8
) -> None:
    """The first rows*cols images, each titled with its class name."""
    count = min(rows * cols, len(images))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.6))
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < count:
            ax.imshow(images[index].numpy(), cmap="gray", vmin=0, vmax=255)
            ax.set_title(classes[int(labels[index])], fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def save_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Training and validation loss (left) and validation accuracy (right) per epoch."""
    epochs = [record["epoch"] for record in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="training loss")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], marker="o", label="validation loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.legend()
    acc_ax.plot(epochs, [100 * r["val_acc"] for r in history], marker="o", color="tab:green")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("validation accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(Path(path), buffer.getvalue())
