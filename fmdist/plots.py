"""PNG figures of a run: a grid of sample images with class names, and loss/accuracy curves."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def save_confusion(confusion: list[list[int]], classes: tuple[str, ...], path: Path, title: str = "") -> None:
    """One confusion matrix: rows are true classes, columns predictions, cells row-normalised."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    _draw_confusion(ax, confusion, classes, title)
    fig.tight_layout()
    _save(fig, path)


def _draw_confusion(ax, confusion: list[list[int]], classes, title: str) -> None:
    counts = torch.tensor(confusion, dtype=torch.float64)
    shares = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(ticks, classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for row in ticks:
        for col in ticks:
            if counts[row, col] > 0:
                color = "white" if shares[row, col] > 0.5 else "black"
                ax.text(col, row, f"{int(counts[row, col])}", ha="center", va="center", fontsize=6, color=color)
    if title:
        ax.set_title(title)


def save_overlay(runs: dict[str, list[dict]], keys: list[tuple[str, str]], ylabel: str, path: Path,
                 title: str, scale: float = 1.0) -> None:  # fmt: skip
    """Several runs' curves on shared axes: one colour per run, one line style per key."""
    styles = ["-", "--", ":"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for color, (name, history) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs.items(), strict=False):
        epochs = [r["epoch"] for r in history]
        for style, (key, label) in zip(styles, keys, strict=False):
            ax.plot(epochs, [scale * r[key] for r in history], style, color=color, marker="o", markersize=3,
                    label=f"{name} {label}".strip())  # fmt: skip
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def save_confusion_grid(confusions: dict[str, list[list[int]]], classes: tuple[str, ...], path: Path) -> None:
    fig, axes = plt.subplots(1, len(confusions), figsize=(5.2 * len(confusions), 5), squeeze=False)
    for ax, (name, confusion) in zip(axes[0], confusions.items(), strict=True):
        _draw_confusion(ax, confusion, classes, name)
    fig.tight_layout()
    _save(fig, path)


def save_per_class_accuracy(accuracies: dict[str, list[float]], classes: tuple[str, ...], path: Path) -> None:
    """Grouped bars: for each class, one bar per run."""
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(len(accuracies), 1)
    for index, (name, values) in enumerate(accuracies.items()):
        positions = [c + (index - (len(accuracies) - 1) / 2) * width for c in range(len(classes))]
        ax.bar(positions, [100 * v for v in values], width=width, label=name)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(Path(path), buffer.getvalue())
