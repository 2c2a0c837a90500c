"""fmdist-compare and fmdist-report: three regimes, one report, derived from the runs' numbers."""

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fmdist import plots, report
from fmdist.config import load_config
from fmdist.models import resnet
from fmdist.report import RunResult, analysis, overfitting_sentence, run_summary

from helpers import (
    CONFIGS,
    REPO,
    TINY_SYNTHETIC_RUN,
    launch_env,
    read_history,
    read_wandb_run,
    run_command,
    train,
    write_kaggle_csv,
)

REGIMES = ["pretrained", "scratch", "frozen"]
# A row's name: the regime, and for partial fine-tuning what it unfreezes, e.g. "partial (layer4, bn)".
ROW_NAME = re.compile(r"(pretrained|scratch|frozen|partial)( \(.+\))?")
OVERFITTING_VERDICT = r"(started to overfit|shows no overfitting|levelled off|was unstable rather than overfitting)"


def compare_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fmdist.compare", "--config", str(CONFIGS / "smoke.yaml"), *args]


@pytest.fixture(scope="module")
def smoke_comparison(tmp_path_factory):
    """The README's offline demo, as users run it: one command, three regimes, one report."""
    out = tmp_path_factory.mktemp("compare") / "smoke"
    result = run_command(compare_command("--output-dir", str(out)), cwd=REPO, timeout=600)
    return out, result


def table_rows(report: str) -> dict[str, list[str]]:
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and ROW_NAME.fullmatch(cells[0]) and len(cells) == 9:
            rows[cells[0]] = cells
    return rows


def expected_row(run_dir: Path) -> list[str]:
    """A run's row of the report table, worked out from its history.json (and, for the parameter
    counts and the layers partial fine-tuning unfreezes, which only the summary holds, its summary.json)."""
    history = read_history(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    best = max(history, key=lambda r: r["val_acc"])
    last = history[-1]
    # The run's wall time: from its start to the end of its last epoch (older histories: the epochs' sum).
    seconds = round(last["wall_seconds"] if "wall_seconds" in last else sum(r["epoch_seconds"] for r in history))
    images_per_sec = sum(r["train_images_per_sec"] for r in history) / len(history)
    name = summary["regime"]
    if name == "partial":
        name = f"partial ({', '.join(summary['unfreeze'])})"
    return [
        name,
        f"{100 * best['val_acc']:.2f}% ({best['epoch']})",
        f"{100 * last['val_acc']:.2f}%",
        f"{last['train_loss']:.4f}",
        f"{last['val_loss']:.4f}",
        f"{last['val_loss'] - min(r['val_loss'] for r in history):.4f}",
        f"{summary['trainable_params']:,} / {summary['total_params']:,}",
        f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s",
        f"{images_per_sec:,.0f}",
    ]


def test_smoke_comparison_trains_three_regimes_and_writes_the_report(smoke_comparison):
    out, result = smoke_comparison
    assert f"report written to {out / 'report.md'}" in result.stdout
    report = (out / "report.md").read_text()
    for figure in ("accuracy.png", "loss.png", "confusion.png", "per_class.png"):
        assert (out / figure).stat().st_size > 10_000 and f"({figure})" in report
    rows = table_rows(report)
    assert list(rows) == REGIMES
    for regime in REGIMES:
        assert rows[regime] == expected_row(out / regime)
        history = read_history(out / regime)
        summary = json.loads((out / regime / "summary.json").read_text())
        assert summary["regime"] == regime and len(summary["confusion"]) == 10
        assert sum(map(sum, summary["confusion"])) == history[-1]["val_count"]
    assert rows["frozen"][6].split(" / ")[0] != rows["scratch"][6].split(" / ")[0]
    assert "EMA" not in report, "no run kept a moving average: no EMA table"


def test_smoke_comparison_is_labelled_and_pretrained_regimes_use_the_stand_in(smoke_comparison):
    out, _ = smoke_comparison
    report = (out / "report.md").read_text()
    assert "Smoke run: pretrained and frozen start from stand-in weights" in report and "not from ImageNet" in report
    stand_in = out / "stand-in-pretraining" / "model.pt"
    assert stand_in.is_file()
    for regime in ("pretrained", "frozen"):
        assert json.loads((out / regime / "summary.json").read_text())["weights"] == str(stand_in)
    stand_in_config = (out / "stand-in-pretraining" / "config.yaml").read_text()
    assert "synthetic_seed: 1" in stand_in_config  # another task than the comparison's (seed 0)


def test_the_analysis_names_the_winner_from_the_numbers(smoke_comparison):
    out, _ = smoke_comparison
    summaries = {r: json.loads((out / r / "summary.json").read_text()) for r in REGIMES}
    winner = max(REGIMES, key=lambda r: summaries[r]["best_val_acc"])
    report = (out / "report.md").read_text()
    assert (
        f"- **{winner}** reached the best validation accuracy, {100 * summaries[winner]['best_val_acc']:.1f}%" in report
    )
    for regime in REGIMES:
        assert re.search(rf"- \*\*{regime}\*\* {OVERFITTING_VERDICT}", report)


def per_class_table(text: str) -> dict[str, dict[str, str]]:
    """The report's per-class table as {run: {class: cell}}, in the table's order."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| class | "))
    names = [c.strip() for c in lines[start].strip("|").split("|")][1:]
    table = {name: {} for name in names}
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        label, *cells = [c.strip() for c in line.strip("|").split("|")]
        for name, cell in zip(names, cells, strict=True):
            table[name][label] = cell
    return table


def test_per_class_accuracy_table_has_a_column_per_regime_matching_its_summary(smoke_comparison):
    out, _ = smoke_comparison
    table = per_class_table((out / "report.md").read_text())
    assert list(table) == REGIMES
    for regime in REGIMES:
        summary = json.loads((out / regime / "summary.json").read_text())
        # per_class_accuracy is the diagonal of the confusion matrix over its rows' sums
        assert summary["per_class_accuracy"] == pytest.approx([row[i] / sum(row) for i, row in
                                                               enumerate(summary["confusion"])])  # fmt: skip
        assert list(table[regime]) == summary["classes"]
        assert table[regime] == {
            name: f"{100 * accuracy:.1f}%"
            for name, accuracy in zip(summary["classes"], summary["per_class_accuracy"], strict=True)
        }


def test_the_report_draws_one_confusion_matrix_per_regime_titled_by_it(smoke_comparison, tmp_path, monkeypatch):
    out, _ = smoke_comparison
    panels = {}
    save = plots._save

    def record_panels(fig, path):
        panels[Path(path).name] = [(ax.get_title(), [np.asarray(i.get_array()) for i in ax.get_images()])
                                   for ax in fig.axes]  # fmt: skip
        save(fig, path)

    monkeypatch.setattr(plots, "_save", record_panels)
    assert report.main([*(str(out / r) for r in REGIMES), "--output", str(tmp_path)]) == 0
    assert [title for title, _ in panels["confusion.png"]] == REGIMES
    for regime, (_, (matrix,)) in zip(REGIMES, panels["confusion.png"], strict=True):
        confusion = np.array(json.loads((out / regime / "summary.json").read_text())["confusion"], dtype=float)
        np.testing.assert_allclose(matrix, confusion / confusion.sum(axis=1, keepdims=True))


def test_rerunning_the_comparison_resumes_instead_of_retraining(smoke_comparison):
    out, _ = smoke_comparison
    before = {r: (out / r / "model.pt").read_bytes() for r in REGIMES}
    result = run_command(compare_command("--output-dir", str(out)), cwd=REPO, timeout=600)
    assert result.stdout.count("already complete") == 4  # the stand-in and the three regimes
    assert "Epoch:" not in result.stdout
    assert {r: (out / r / "model.pt").read_bytes() for r in REGIMES} == before


def test_fmdist_report_rebuilds_the_report_from_folders_and_names_unfinished_ones(smoke_comparison, tmp_path):
    out, _ = smoke_comparison
    unfinished = tmp_path / "crashed-run"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("regime: scratch\n")
    result = run_command(
        [sys.executable, "-m", "fmdist.report", *(str(out / r) for r in REGIMES), str(unfinished),
         "--output", str(tmp_path / "again"), "--title", "Rebuilt"], cwd=REPO)  # fmt: skip
    report = (tmp_path / "again" / "report.md").read_text()
    assert report.startswith("# Rebuilt")
    assert table_rows(report) == table_rows((out / "report.md").read_text())
    assert f"Not in this report: {unfinished}: no history.json; the run did not finish." in report
    assert "report written to" in result.stdout


def test_comparison_with_two_processes_per_regime_runs_torchrun_jobs(tmp_path):
    out = tmp_path / "ddp"
    run_command(compare_command("--nproc", "2", "--output-dir", str(out), "epochs=1", "compare.stand_in_epochs=1",
                                "data.train_size=512", "data.test_size=101", "compare.regimes=[scratch,frozen]"),
                cwd=REPO, timeout=600)  # fmt: skip
    rows = table_rows((out / "report.md").read_text())
    assert list(rows) == ["scratch", "frozen"]
    for regime in ("scratch", "frozen"):
        summary = json.loads((out / regime / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["global_batch_size"] == 128
        assert read_history(out / regime)[0]["val_count"] == 101
        assert rows[regime] == expected_row(out / regime)


def test_each_regime_of_a_comparison_is_one_offline_wandb_run_grouped_under_the_comparison(tmp_path):
    out = tmp_path / "grouped"
    result = run_command(compare_command("--output-dir", str(out), "epochs=1", "compare.stand_in_epochs=1",
                                         "data.train_size=256", "data.test_size=64", "wandb.mode=offline"),
                         cwd=REPO, env={"WANDB_MODE": None, "HOME": str(tmp_path)}, timeout=600)  # fmt: skip
    offline_lines = [line for line in result.stdout.splitlines() if "W&B logging offline" in line]
    assert len(offline_lines) == 3 and all("(wandb.mode=offline)" in line for line in offline_lines)
    # The stand-in pre-training is not part of the comparison: no W&B run of its own.
    runs = sorted(out.rglob("offline-run-*"))
    assert [run.relative_to(out).parts[:2] for run in runs] == [(regime, "wandb") for regime in sorted(REGIMES)]
    for run in runs:
        regime = run.relative_to(out).parts[0]
        logged = read_wandb_run(next(run.glob("run-*.wandb")))
        assert logged["run"].run_group == "grouped", "one group per comparison: its folder's name"
        assert logged["run"].job_type == regime and logged["run"].display_name == regime
        assert logged["config"]["regime"] == regime and logged["config"]["wandb"]["group"] == "grouped"
        assert [row["epoch"] for row in logged["history"]] == [1]


def test_partial_fine_tuning_is_compared_as_its_own_regime(tmp_path):
    out = tmp_path / "partial"
    run_command(compare_command("--output-dir", str(out), "epochs=1", "compare.stand_in_epochs=1",
                                "data.train_size=512", "data.test_size=100", "compare.regimes=[frozen,partial]",
                                "model.unfreeze=[layer4,bn]"), cwd=REPO, timeout=600)  # fmt: skip
    report = (out / "report.md").read_text()
    rows = table_rows(report)
    assert list(rows) == ["frozen", "partial (layer4, bn)"]
    assert list(rows.values()) == [expected_row(out / "frozen"), expected_row(out / "partial")]
    trainable = {name: int(rows[name][6].split(" / ")[0].replace(",", "")) for name in rows}
    assert trainable["frozen"] < trainable["partial (layer4, bn)"]
    partial = json.loads((out / "partial" / "summary.json").read_text())
    assert partial["regime"] == "partial" and partial["trainable_params"] == trainable["partial (layer4, bn)"]
    assert "Smoke run: frozen and partial start from stand-in weights" in report
    assert re.search(rf"- \*\*partial \(layer4, bn\)\*\* {OVERFITTING_VERDICT}", report)


def test_a_regime_that_crashes_in_process_does_not_stop_the_others(tmp_path):
    # Weights without data (meta tensors) pass every check fmdist makes and then crash the copy into the
    # model with a RuntimeError, not an fmdist error: in the comparing process it would end the comparison.
    weights = tmp_path / "no-data.pth"
    with torch.device("meta"):
        torch.save(resnet("resnet18", 1, 10, width=16).state_dict(), weights)
    out = tmp_path / "crashed"
    result = run_command(compare_command("--output-dir", str(out), "compare.stand_in_weights=false",
                                         "compare.regimes=[frozen,scratch]", f"model.weights={weights}",
                                         *TINY_SYNTHETIC_RUN), cwd=REPO, check=False, timeout=600)  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    (crash,) = [line for line in result.stderr.splitlines() if line.startswith("fmdist-compare: frozen crashed: ")]
    assert crash.startswith("fmdist-compare: frozen crashed: RuntimeError: ") and "Traceback" not in result.stderr
    text = (out / "report.md").read_text()
    assert list(table_rows(text)) == ["scratch"]
    assert f"Not in this report: {out / 'frozen'}: no config.yaml; the run did not finish." in text
    assert json.loads((out / "comparison.json").read_text())["exit_codes"] == {"frozen": 1, "scratch": 0}
    assert "failed: {'frozen': 1}" in result.stdout


@pytest.fixture(scope="module")
def partial_variants(tmp_path_factory):
    """Two partial fine-tunings from the same weights, one unfreezing layer4 and keeping a moving
    average of the weights, one unfreezing the BatchNorm layers; the learning rate scaled to the
    batch; and their report."""
    folder = tmp_path_factory.mktemp("partial-variants")
    weights = folder / "weights.pth"
    torch.save(resnet("resnet18", 1, 10, width=16).state_dict(), weights)
    common = ("--config", str(CONFIGS / "smoke.yaml"), *TINY_SYNTHETIC_RUN, "epochs=2", "regime=partial",
              f"model.weights={weights}", "optimizer.scale_lr=true")  # fmt: skip
    train(folder, *common, "model.unfreeze=[layer4]", "ema_decay=0.9", f"output_dir={folder / 'layer4'}")
    train(folder, *common, "model.unfreeze=[bn]", f"output_dir={folder / 'bn'}")
    assert report.main([str(folder / "layer4"), str(folder / "bn"), "--output", str(folder / "report")]) == 0
    return folder, (folder / "report" / "report.md").read_text()


def test_partial_fine_tunings_of_different_layers_are_rows_named_by_what_they_unfreeze(partial_variants):
    folder, text = partial_variants
    rows = table_rows(text)
    assert list(rows) == ["partial (layer4)", "partial (bn)"]
    assert list(rows.values()) == [expected_row(folder / "layer4"), expected_row(folder / "bn")]
    for variant in ("layer4", "bn"):
        summary = json.loads((folder / variant / "summary.json").read_text())
        assert summary["regime"] == "partial" and summary["unfreeze"] == [variant]
    assert list(per_class_table(text)) == ["partial (layer4)", "partial (bn)"]


def test_a_run_with_a_moving_average_reports_its_best_and_final_accuracy(partial_variants):
    folder, text = partial_variants
    history = read_history(folder / "layer4")
    best = max(history, key=lambda r: r["ema_val_acc"])
    summary = json.loads((folder / "layer4" / "summary.json").read_text())
    assert (summary["best_ema_val_acc"], summary["best_ema_epoch"], summary["final_ema_val_acc"]) == (
        best["ema_val_acc"], best["epoch"], history[-1]["ema_val_acc"])  # fmt: skip
    without = json.loads((folder / "bn" / "summary.json").read_text())
    assert (without["best_ema_val_acc"], without["best_ema_epoch"], without["final_ema_val_acc"]) == (None,) * 3
    assert "| regime | best EMA val acc (epoch) | final EMA val acc |" in text
    assert (
        f"| partial (layer4) | {100 * best['ema_val_acc']:.2f}% ({best['epoch']}) "
        f"| {100 * history[-1]['ema_val_acc']:.2f}% |"
    ) in text
    assert "| partial (bn) | off | off |" in text


def test_the_setup_line_gives_the_learning_rate_scaled_to_the_global_batch(partial_variants):
    folder, text = partial_variants
    # lr 0.001 for a global batch of 256 (smoke.yaml's reference), here 32: an eighth of it
    assert all(record["lr"] == pytest.approx(0.000125) for record in read_history(folder / "layer4"))
    (setup,) = [line for line in text.splitlines() if line.startswith("Setup: ")]
    assert "optimizer adam lr 0.000125 (optimizer.scale_lr: 0.001 x global batch 32 / 256), seed 0" in setup


# Written out, not imported from fmdist.data: a misspelt or reordered name there must fail here.
FASHION_MNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle boot"]  # fmt: skip


def test_a_report_on_fashion_mnist_data_names_the_classes_in_its_table_and_figures(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(300, 28, 28), dtype=np.uint8)
    labels = np.arange(300) % 10
    train_csv = write_kaggle_csv(tmp_path / "train.csv", images[:200], labels[:200])
    test_csv = write_kaggle_csv(tmp_path / "test.csv", images[200:], labels[200:])
    run_dir = tmp_path / "scratch"
    train(tmp_path, "--config", str(CONFIGS / "smoke.yaml"), "data.source=csv", f"data.train_csv={train_csv}",
          f"data.test_csv={test_csv}", "data.train_size=200", "data.test_size=100", "epochs=1", "batch_size=50",
          f"output_dir={run_dir}")  # fmt: skip

    tick_labels = {}
    save = plots._save

    def record_tick_labels(fig, path):
        tick_labels[Path(path).name] = [
            ([t.get_text() for t in ax.get_xticklabels()], [t.get_text() for t in ax.get_yticklabels()])
            for ax in fig.axes
        ]
        save(fig, path)

    monkeypatch.setattr(plots, "_save", record_tick_labels)
    assert report.main([str(run_dir), "--output", str(tmp_path / "report")]) == 0

    ((bars_x, _),) = tick_labels["per_class.png"]
    assert bars_x == FASHION_MNIST_NAMES
    matrix_x, matrix_y = tick_labels["confusion.png"][0]
    assert matrix_x == FASHION_MNIST_NAMES and matrix_y == FASHION_MNIST_NAMES
    text = (tmp_path / "report" / "report.md").read_text()
    table = re.findall(r"^\| (.+?) \| \d+\.\d% \|$", text, flags=re.M)
    assert table == FASHION_MNIST_NAMES


HELP_MENTIONS = {
    "fmdist-compare": ["--config PATH", "--nproc", "processes per regime", "--output-dir", "--plan", "key=value",
                       "compare.regimes"],
    "fmdist-report": ["DIR", "run folders", "--output", "--title", "--note"],
}  # fmt: skip


@pytest.mark.parametrize("script", HELP_MENTIONS)
def test_console_script_help_describes_its_arguments(script):
    result = subprocess.run([str(Path(sys.executable).parent / script), "--help"], capture_output=True, text=True,
                            env=launch_env(), timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script} ")
    for mention in HELP_MENTIONS[script]:
        assert mention in result.stdout


# ------------------------------------------------------------------------------ analysis rules


def run_result(name, train_losses, val_losses, accuracies):
    history = [
        {"epoch": e, "train_loss": t, "val_loss": v, "val_acc": a}
        for e, (t, v, a) in enumerate(zip(train_losses, val_losses, accuracies, strict=True), start=1)
    ]
    lowest = min(history, key=lambda r: r["val_loss"])
    best = max(history, key=lambda r: r["val_acc"])
    summary = {
        "best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "final_val_acc": history[-1]["val_acc"],
        "epochs": len(history), "final_train_loss": history[-1]["train_loss"], "final_val_loss": history[-1]["val_loss"],
        "min_val_loss": lowest["val_loss"], "min_val_loss_epoch": lowest["epoch"],
        "overfitting_gap": history[-1]["val_loss"] - lowest["val_loss"],
    }  # fmt: skip
    return RunResult(name, None, {}, history, summary)


def test_overfitting_is_dated_from_the_validation_minimum_while_training_loss_falls():
    run = run_result("scratch", [0.9, 0.5, 0.3, 0.2, 0.1, 0.05], [0.6, 0.4, 0.3, 0.28, 0.35, 0.45],
                     [0.80, 0.85, 0.88, 0.89, 0.89, 0.88])  # fmt: skip
    assert overfitting_sentence(run) == (
        "**scratch** started to overfit after epoch 4: validation loss rose from 0.2800 to 0.4500 by epoch 6 "
        "while training loss fell from 0.2000 to 0.0500."
    )


def test_no_overfitting_when_validation_loss_is_lowest_at_the_end_or_barely_above():
    falling = run_result("frozen", [1.0, 0.8, 0.7], [0.9, 0.8, 0.75], [0.6, 0.7, 0.72])
    assert "shows no overfitting" in overfitting_sentence(falling)
    flat = run_result("pretrained", [0.5, 0.3, 0.2], [0.40, 0.300, 0.305], [0.8, 0.9, 0.9])
    assert "levelled off" in overfitting_sentence(flat)


def test_validation_loss_rising_while_training_loss_does_not_fall_is_called_unstable_not_overfitting():
    run = run_result("pretrained", [0.40, 0.30, 0.35, 0.45], [0.50, 0.30, 0.42, 0.55], [0.80, 0.88, 0.85, 0.82])
    assert overfitting_sentence(run) == (
        "**pretrained** was unstable rather than overfitting: validation loss rose by 0.2500 after epoch 2 "
        "(from 0.3000 to 0.5500 by epoch 4) while training loss did not fall (0.3000 to 0.4500)."
    )


def test_analysis_ranks_regimes_and_flags_a_final_epoch_below_the_best():
    runs = [
        run_result("frozen", [1.0, 0.9], [0.9, 0.85], [0.70, 0.81]),
        run_result("pretrained", [0.5, 0.2], [0.3, 0.35], [0.913, 0.90]),
        run_result("scratch", [0.6, 0.3], [0.4, 0.3], [0.85, 0.909]),
    ]
    lines = analysis(runs)
    assert lines[0] == (
        "**pretrained** reached the best validation accuracy, 91.3% at epoch 1, 0.4 points above scratch (90.9%), "
        "10.3 points above frozen (81.0%)."
    )
    assert any(line.startswith("**pretrained** ended 1.3 points below its best") for line in lines)


def summary_of(history: list[dict], *overrides: str) -> dict:
    cfg = load_config(CONFIGS / "smoke.yaml", list(overrides))
    counts = SimpleNamespace(trainable=1, total=2)
    return run_summary(cfg, 1, counts, history, [[3, 1], [0, 4]], ("a", "b"), gflops=0.1)


def record(epoch: int, **fields) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.0 / epoch, "val_acc": 0.5 + epoch / 10,
            "epoch_seconds": 2.0, "train_images_per_sec": 100.0, **fields}  # fmt: skip


def test_a_summary_s_wall_time_runs_from_the_start_to_the_last_epoch_s_end():
    # 7 s of start-up before two 2-second epochs: the last record's wall_seconds, not the epochs' 4 s
    assert summary_of([record(1, wall_seconds=9.0), record(2, wall_seconds=11.0)])["wall_seconds"] == 11.0
    assert summary_of([record(1), record(2)])["wall_seconds"] == 4.0  # a history written before wall_seconds


def test_a_summary_records_what_partial_fine_tuning_unfreezes_and_the_moving_average():
    history = [record(1, ema_val_acc=0.7), record(2, ema_val_acc=0.9), record(3, ema_val_acc=0.8)]
    summary = summary_of(history, "regime=partial", "model.unfreeze=[layer3,bn]", "ema_decay=0.9")
    assert summary["unfreeze"] == ["layer3", "bn"]
    assert (summary["best_ema_val_acc"], summary["best_ema_epoch"], summary["final_ema_val_acc"]) == (0.9, 2, 0.8)
    assert summary_of([record(1)], "regime=frozen", "model.unfreeze=[layer3]")["unfreeze"] is None


def test_plan_writes_the_runs_as_tab_separated_trainer_arguments_and_trains_nothing(tmp_path):
    out = tmp_path / "planned"
    result = run_command(compare_command("--output-dir", str(out), "--plan", "epochs=2", "model.width=8"), cwd=REPO)
    assert f"plan written to {out / 'plan'} (regimes: pretrained scratch frozen)" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["plan"]

    def lines(name):
        return [line.split("\t") for line in (out / "plan" / name).read_text().splitlines()]

    (stand_in,) = lines("stand-in.plan")
    assert stand_in[:2] == ["--config", str(CONFIGS / "smoke.yaml")]
    assert {"regime=scratch", "data.synthetic_seed=1", "epochs=2", f"output_dir={out / 'stand-in-pretraining'}"} <= set(
        stand_in
    )
    weights = f"model.weights={out / 'stand-in-pretraining' / 'model.pt'}"
    regimes = lines("regimes.plan")
    assert [next(a for a in args if a.startswith("regime=")) for args in regimes] == [f"regime={r}" for r in REGIMES]
    for regime, args in zip(REGIMES, regimes, strict=True):
        assert {"epochs=2", "model.width=8", f"output_dir={out / regime}", "wandb.group=planned"} <= set(args)
        assert (weights in args) == (regime != "scratch")
    (report,) = lines("report.plan")
    assert report[:5] == [str(out / r) for r in REGIMES] + ["--output", str(out)]
    assert report[report.index("--note") + 1].startswith("Smoke run: pretrained and frozen start from stand-in")
