"""The comparison report: runs side by side, built from their folders (`fmdist-report DIR...`).

Each finished run leaves a summary.json (written by the trainer through run_summary below);
the report puts the runs in one table, overlays their curves, shows their confusion matrices
and per-class accuracy, and writes an analysis derived from the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import yaml

from fmdist import plots
from fmdist.errors import FmdistError
from fmdist.optim import scaled_lr
from fmdist.outputs import CONFIG_FILE, HISTORY_FILE, SUMMARY_FILE, atomic_write

REPORT_FILE = "report.md"
TRACKED_SUMMARY_KEYS = ("best_val_acc", "best_epoch", "final_val_acc", "final_train_loss", "final_val_loss",
                        "overfitting_gap")  # fmt: skip
# Validation loss this far above its minimum at the end counts as overfitting (absolute, relative).
OVERFIT_MARGIN = (0.02, 0.05)


def run_summary(cfg, world_size: int, counts, history: list[dict], confusion, classes, gflops: float) -> dict:
    """The numbers a report needs from one finished run."""
    best = max(history, key=lambda r: r["val_acc"])
    lowest = min(history, key=lambda r: r["val_loss"])
    last = history[-1]
    per_class = [row[i] / max(sum(row), 1) for i, row in enumerate(confusion)]
    return {
        "regime": cfg.regime,
        "unfreeze": list(cfg.model.unfreeze) if cfg.regime == "partial" else None,
        "arch": cfg.model.arch,
        "weights": None if cfg.regime == "scratch" else cfg.model.weights,
        "stem": cfg.model.stem,
        "image_size": cfg.data.image_size,
        "forward_gflops_per_image": gflops,
        "world_size": world_size,
        "global_batch_size": cfg.batch_size * world_size,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "epochs": len(history),
        "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"],
        "final_val_acc": last["val_acc"],
        "final_train_loss": last["train_loss"],
        "final_val_loss": last["val_loss"],
        "min_val_loss": lowest["val_loss"],
        "min_val_loss_epoch": lowest["epoch"],
        "overfitting_gap": last["val_loss"] - lowest["val_loss"],
        "wall_seconds": history_wall_seconds(history),
        "train_images_per_sec": sum(r["train_images_per_sec"] for r in history) / len(history),
        **ema_summary(history),
        "classes": list(classes),
        "confusion": confusion,
        "per_class_accuracy": per_class,
    }


def history_wall_seconds(history: list[dict]) -> float:
    """From the start of the run to the end of its last epoch (histories written before wall_seconds
    existed timed only their epochs: their sum)."""
    return history[-1].get("wall_seconds", sum(record["epoch_seconds"] for record in history))


def ema_summary(history: list[dict]) -> dict:
    """Best and final validation accuracy of the moving average of the weights (None without ema_decay)."""
    averaged = [r for r in history if "ema_val_acc" in r]
    if not averaged:
        return {"best_ema_val_acc": None, "best_ema_epoch": None, "final_ema_val_acc": None}
    best = max(averaged, key=lambda r: r["ema_val_acc"])
    return {"best_ema_val_acc": best["ema_val_acc"], "best_ema_epoch": best["epoch"],
            "final_ema_val_acc": averaged[-1]["ema_val_acc"]}  # fmt: skip


def run_label(summary: dict) -> str:
    """The run's name in the report: its regime, and for partial fine-tuning what it unfreezes, so
    that two partial variants are two rows."""
    if summary["regime"] == "partial" and summary.get("unfreeze"):
        return f"partial ({', '.join(summary['unfreeze'])})"
    return summary["regime"]


@dataclass
class RunResult:
    name: str
    folder: Path
    config: dict
    history: list[dict]
    summary: dict


def load_run(folder: Path) -> RunResult:
    folder = Path(folder)
    missing = [name for name in (CONFIG_FILE, HISTORY_FILE, SUMMARY_FILE) if not (folder / name).is_file()]
    if missing:
        raise FmdistError(f"{folder}: no {missing[0]}; the run did not finish")
    try:
        config = yaml.safe_load((folder / CONFIG_FILE).read_text())
        history = json.loads((folder / HISTORY_FILE).read_text())
        summary = json.loads((folder / SUMMARY_FILE).read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise FmdistError(f"{folder}: unreadable run files ({e})") from None
    return RunResult(run_label(summary), folder, config, history, summary)


# ---------------------------------------------------------------------------------- analysis


def overfitting_sentence(run: RunResult) -> str:
    s, history = run.summary, run.history
    lowest_epoch, last_epoch = s["min_val_loss_epoch"], history[-1]["epoch"]
    train_at_lowest = next(r["train_loss"] for r in history if r["epoch"] == lowest_epoch)
    margin = max(OVERFIT_MARGIN[0], OVERFIT_MARGIN[1] * s["min_val_loss"])
    if lowest_epoch == last_epoch:
        return (
            f"**{run.name}** shows no overfitting: validation loss was still at its lowest in the last epoch "
            f"({s['final_val_loss']:.4f})."
        )
    if s["overfitting_gap"] > margin and s["final_train_loss"] < train_at_lowest:
        return (
            f"**{run.name}** started to overfit after epoch {lowest_epoch}: validation loss rose from "
            f"{s['min_val_loss']:.4f} to {s['final_val_loss']:.4f} by epoch {last_epoch} while training loss "
            f"fell from {train_at_lowest:.4f} to {s['final_train_loss']:.4f}."
        )
    if s["overfitting_gap"] > margin:
        # Overfitting is the training loss falling while the validation loss rises; both rising is not it.
        return (
            f"**{run.name}** was unstable rather than overfitting: validation loss rose by {s['overfitting_gap']:.4f} "
            f"after epoch {lowest_epoch} (from {s['min_val_loss']:.4f} to {s['final_val_loss']:.4f} by epoch "
            f"{last_epoch}) while training loss did not fall ({train_at_lowest:.4f} to {s['final_train_loss']:.4f})."
        )
    return (
        f"**{run.name}** levelled off: validation loss was lowest at epoch {lowest_epoch} ({s['min_val_loss']:.4f}) "
        f"and ended within {s['overfitting_gap']:.4f} of it, not enough to call overfitting."
    )


def analysis(runs: list[RunResult]) -> list[str]:
    ranked = sorted(runs, key=lambda r: r.summary["best_val_acc"], reverse=True)
    winner = ranked[0].summary
    lines = []
    behind = ", ".join(
        f"{100 * (winner['best_val_acc'] - r.summary['best_val_acc']):.1f} points above {r.name} "
        f"({100 * r.summary['best_val_acc']:.1f}%)"
        for r in ranked[1:]
    )
    lines.append(
        f"**{ranked[0].name}** reached the best validation accuracy, {100 * winner['best_val_acc']:.1f}% at epoch "
        f"{winner['best_epoch']}" + (f", {behind}." if behind else ".")
    )
    for run in ranked:
        s = run.summary
        if s["best_epoch"] != s["epochs"] and s["best_val_acc"] - s["final_val_acc"] >= 0.005:
            lines.append(
                f"**{run.name}** ended {100 * (s['best_val_acc'] - s['final_val_acc']):.1f} points below its best "
                f"(final {100 * s['final_val_acc']:.1f}%): keeping the best checkpoint (best.pt) pays off."
            )
    lines.extend(overfitting_sentence(run) for run in ranked)
    return lines


# ------------------------------------------------------------------------------------ report


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def write_report(runs: list[RunResult], out_dir: Path, title: str, notes: list[str] = (),
                 unfinished: list[str] = ()) -> Path:  # fmt: skip
    """report.md and its figures in out_dir."""
    if not runs:
        raise FmdistError("no finished run to report on" + (f" ({'; '.join(unfinished)})" if unfinished else ""))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _unique_names(runs)
    histories = {run.name: run.history for run in runs}
    classes = tuple(runs[0].summary["classes"])
    plots.save_overlay(histories, [("val_acc", "")], "validation accuracy (%)", out_dir / "accuracy.png",
                       "Validation accuracy", scale=100)  # fmt: skip
    plots.save_overlay(histories, [("train_loss", "training"), ("val_loss", "validation")], "cross-entropy",
                       out_dir / "loss.png", "Training (solid) and validation (dashed) loss")  # fmt: skip
    plots.save_confusion_grid({run.name: run.summary["confusion"] for run in runs}, classes, out_dir / "confusion.png")
    plots.save_per_class_accuracy(
        {run.name: run.summary["per_class_accuracy"] for run in runs}, classes, out_dir / "per_class.png"
    )

    first = runs[0]
    setup = (
        f"{first.summary['arch']}, {first.summary['epochs']} epochs, global batch {first.summary['global_batch_size']} "
        f"on {first.summary['world_size']} process(es), data: {first.config['data']['source']}, "
        f"optimizer {first.config['optimizer']['name']} "
        f"{_learning_rate(first.config['optimizer'], first.summary['global_batch_size'])}, seed {first.config['seed']}"
    )
    lines = [f"# {title}", ""]
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])
    lines += [f"Setup: {setup}.", ""]
    lines += [
        "| regime | best val acc (epoch) | final val acc | final train loss | final val loss | overfitting gap "
        "| trainable / total params | wall time | train images/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        s = run.summary
        lines.append(
            f"| {run.name} | {100 * s['best_val_acc']:.2f}% ({s['best_epoch']}) | {100 * s['final_val_acc']:.2f}% "
            f"| {s['final_train_loss']:.4f} | {s['final_val_loss']:.4f} | {s['overfitting_gap']:.4f} "
            f"| {s['trainable_params']:,} / {s['total_params']:,} | {_duration(s['wall_seconds'])} "
            f"| {s['train_images_per_sec']:,.0f} |"
        )
    lines += [
        "",
        "The overfitting gap is the final validation loss minus its minimum over the epochs. The wall time "
        "runs from the start of the run to the end of its last epoch, start-up included.",
        "",
    ]
    lines += ema_table(runs)
    if unfinished:
        lines += ["Not in this report: " + "; ".join(unfinished) + ".", ""]
    lines += ["## Analysis", ""] + [f"- {sentence}" for sentence in analysis(runs)] + [""]
    lines += ["## Curves", "", "![Validation accuracy](accuracy.png)", "", "![Loss](loss.png)", ""]
    lines += ["## Per class", "", "| class | " + " | ".join(run.name for run in runs) + " |",
              "| --- |" + " --- |" * len(runs)]  # fmt: skip
    for index, name in enumerate(classes):
        cells = " | ".join(f"{100 * run.summary['per_class_accuracy'][index]:.1f}%" for run in runs)
        lines.append(f"| {name} | {cells} |")
    lines += ["", "![Per-class accuracy](per_class.png)", "", "![Confusion matrices](confusion.png)", ""]
    lines += ["Runs: " + ", ".join(f"{run.name}: `{run.folder}`" for run in runs), ""]
    path = out_dir / REPORT_FILE
    atomic_write(path, "\n".join(lines).encode())
    return path


def _learning_rate(optimizer: dict, global_batch: int) -> str:
    """The rate the runs trained with: with optimizer.scale_lr, not the configured lr."""
    if not optimizer.get("scale_lr"):
        return f"lr {optimizer['lr']}"
    rate = scaled_lr(SimpleNamespace(**optimizer), global_batch)
    return (
        f"lr {rate:g} (optimizer.scale_lr: {optimizer['lr']} x global batch {global_batch} / "
        f"{optimizer['reference_batch']})"
    )


def ema_table(runs: list[RunResult]) -> list[str]:
    """The moving average's accuracy, when any run kept one (ema_decay)."""
    if all(run.summary.get("best_ema_val_acc") is None for run in runs):
        return []
    lines = ["Validation accuracy of the exponential moving average of the weights (`ema_decay`):", "",
             "| regime | best EMA val acc (epoch) | final EMA val acc |", "| --- | --- | --- |"]  # fmt: skip
    for run in runs:
        s = run.summary
        if s.get("best_ema_val_acc") is None:
            lines.append(f"| {run.name} | off | off |")
        else:
            lines.append(
                f"| {run.name} | {100 * s['best_ema_val_acc']:.2f}% ({s['best_ema_epoch']}) "
                f"| {100 * s['final_ema_val_acc']:.2f}% |"
            )
    return lines + [""]


def _unique_names(runs: list[RunResult]) -> None:
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({run.folder.name})"


def report_folders(folders: list[Path], out_dir: Path, title: str, notes: list[str] = ()) -> Path:
    """Load what finished among `folders` and report on it; name the rest in the report."""
    runs, unfinished = [], []
    for folder in folders:
        try:
            runs.append(load_run(folder))
        except FmdistError as e:
            unfinished.append(str(e))
    return write_report(runs, out_dir, title, notes, unfinished)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fmdist-report", description="Write a comparison report (report.md and figures) from run folders."
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="DIR", help="run folders (output_dir of each run)")
    parser.add_argument("--output", type=Path, help="report folder (default: the runs' common parent folder)")
    parser.add_argument("--title", default="fmdist comparison", help="the report's heading")
    parser.add_argument("--note", action="append", default=[], help="a line under the heading (repeatable)")
    args = parser.parse_args(argv)
    out_dir = args.output or Path(*_common_parent([r.resolve() for r in args.runs]))
    try:
        path = report_folders(args.runs, out_dir, args.title, args.note)
    except FmdistError as e:
        print(f"fmdist: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"fmdist: report written to {path}")
    return 0


def _common_parent(paths: list[Path]) -> tuple[str, ...]:
    parts = [p.parent.parts for p in paths]
    common = []
    for items in zip(*parts, strict=False):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return tuple(common) or (".",)


if __name__ == "__main__":
    sys.exit(main())
