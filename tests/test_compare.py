"""fmdist-compare and fmdist-report: three regimes, one report, derived from the runs' numbers."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmdist import plots, report
from fmdist.report import RunResult, analysis, overfitting_sentence

from helpers import CONFIGS, REPO, launch_env, read_history, read_wandb_run, run_command, train, write_kaggle_csv

REGIMES = ["pretrained", "scratch", "frozen"]
ALL_REGIMES = [*REGIMES, "partial"]


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
        if cells and cells[0] in ALL_REGIMES and len(cells) == 9:
            rows[cells[0]] = cells
    return rows


def expected_row(run_dir: Path) -> list[str]:
    """A run's row of the report table, worked out from its history.json (and, for the parameter
    counts, which only the summary holds, its summary.json)."""
    history = read_history(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    best = max(history, key=lambda r: r["val_acc"])
    last = history[-1]
    seconds = round(sum(r["epoch_seconds"] for r in history))
    images_per_sec = sum(r["train_images_per_sec"] for r in history) / len(history)
    return [
        summary["regime"],
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
        assert re.search(rf"- \*\*{regime}\*\* (started to overfit|shows no overfitting|levelled off)", report)


def test_per_class_accuracy_uses_the_class_names(smoke_comparison):
    out, _ = smoke_comparison
    report = (out / "report.md").read_text()
    summary = json.loads((out / "scratch" / "summary.json").read_text())
    for name, accuracy in zip(summary["classes"], summary["per_class_accuracy"], strict=True):
        assert f"| {name} | " in report and f"{100 * accuracy:.1f}%" in report


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
    assert list(rows) == ["frozen", "partial"]
    assert [rows[regime] for regime in rows] == [expected_row(out / regime) for regime in rows]
    trainable = {regime: int(rows[regime][6].split(" / ")[0].replace(",", "")) for regime in rows}
    assert trainable["frozen"] < trainable["partial"]
    partial = json.loads((out / "partial" / "summary.json").read_text())
    assert partial["regime"] == "partial" and partial["trainable_params"] == trainable["partial"]
    assert "Smoke run: frozen and partial start from stand-in weights" in report
    assert re.search(r"- \*\*partial\*\* (started to overfit|shows no overfitting|levelled off)", report)


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
