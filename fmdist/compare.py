"""Run the regimes with the same settings, then write one report: `fmdist-compare --config PATH`.

Each regime trains into its own folder under the comparison folder, as one process in this
one or as a torchrun job (--nproc N). A regime that fails does not stop the others; the report
covers what finished. Rerunning the command resumes or skips what is already done.

`--plan` only writes the runs down (plan/*.plan in the comparison folder, one run per line,
its arguments separated by tabs) for slurm/compare.sh to submit as jobs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from fmdist import train
from fmdist.config import keys_help, load_config
from fmdist.errors import FmdistError
from fmdist.outputs import WEIGHTS_FILE, atomic_write
from fmdist.preemption import EXIT_CHECKPOINTED
from fmdist.report import report_folders

STAND_IN_FOLDER = "stand-in-pretraining"
PLAN_FOLDER = "plan"


@dataclass
class Plan:
    """Every run of one comparison, as trainer arguments, and how to report on them."""

    stand_in: list[str] | None  # pre-trains the stand-in weights, before the regimes
    regimes: dict[str, list[str]]
    folders: list[Path]
    title: str
    notes: list[str]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fmdist-compare",
        description="Train pretrained, scratch and frozen with the same settings and write one comparison report.",
        epilog=keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="PATH", help="YAML config shared by every regime")
    parser.add_argument("--nproc", type=int, default=1, help="processes per regime (>1: a torchrun job each)")
    parser.add_argument("--output-dir", type=Path, help="comparison folder (default runs/compare-<config name>)")
    parser.add_argument("--plan", action="store_true", help="only write the runs to plan/*.plan (slurm/compare.sh)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every regime")
    return parser.parse_args(argv)


def make_plan(config: str | None, overrides: list[str], out: Path | None) -> tuple[Plan, Path]:
    cfg = load_config(config, overrides)
    if cfg.compare.stand_in_weights and cfg.data.source != "synthetic":
        raise FmdistError(
            "compare.stand_in_weights needs data.source=synthetic (it pre-trains on another synthetic task)"
        )
    out = out or Path("runs") / f"compare-{cfg.name}"
    base = (["--config", config] if config else []) + [
        *overrides,
        f"wandb.group={cfg.wandb.group or out.resolve().name}",
    ]
    stand_in, notes = None, []
    weights = []
    if cfg.compare.stand_in_weights and any(regime != "scratch" for regime in cfg.compare.regimes):
        stand_in = [*base, "regime=scratch", f"data.synthetic_seed={cfg.data.synthetic_seed + 1}",
                    f"epochs={cfg.compare.stand_in_epochs}", "wandb.mode=disabled",
                    f"output_dir={out / STAND_IN_FOLDER}"]  # fmt: skip
        weights = [f"model.weights={out / STAND_IN_FOLDER / WEIGHTS_FILE}"]
        named = [regime for regime in cfg.compare.regimes if regime != "scratch"]
        starting_from_weights = " and ".join([", ".join(named[:-1]), named[-1]] if len(named) > 1 else named)
        notes.append(
            f"Smoke run: {starting_from_weights} start from stand-in weights ({out / STAND_IN_FOLDER / WEIGHTS_FILE}), "
            f"pre-trained for {cfg.compare.stand_in_epochs} epochs on a different synthetic task, not from ImageNet."
        )
    regimes = {
        regime: [*base, f"regime={regime}", f"output_dir={out / regime}", *(weights if regime != "scratch" else [])]
        for regime in cfg.compare.regimes
    }
    folders = [out / regime for regime in cfg.compare.regimes]
    return Plan(stand_in, regimes, folders, f"fmdist comparison: {cfg.name}", notes), out


def write_plan(plan: Plan, out: Path) -> None:
    """One run per line, its arguments separated by tabs, for slurm/ to read with `read -ra`."""

    def lines(runs: list[list[str]]) -> str:
        for args in runs:
            if any("\t" in a or "\n" in a for a in args):
                raise FmdistError(f"an argument holds a tab or a newline, which a plan cannot carry: {args}")
        return "".join("\t".join(args) + "\n" for args in runs)

    folder = out / PLAN_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    report_args = [*map(str, plan.folders), "--output", str(out), "--title", plan.title]
    for note in plan.notes:
        report_args += ["--note", note]
    atomic_write(folder / "stand-in.plan", lines([plan.stand_in] if plan.stand_in else []).encode())
    atomic_write(folder / "regimes.plan", lines(list(plan.regimes.values())).encode())
    atomic_write(folder / "report.plan", lines([report_args]).encode())
    print(f"fmdist-compare: plan written to {folder} (regimes: {' '.join(plan.regimes)})", flush=True)


def launch(args: list[str], nproc: int, what: str) -> int:
    """Train once with these arguments; the exit code as the trainer documents it (1 for a crash)."""
    if nproc == 1:
        return train_in_process(args, what)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fmdist.train", *args]  # fmt: skip
    return subprocess.run(command).returncode


def train_in_process(args: list[str], what: str) -> int:
    """train.main in this process, where a crash (any exception the trainer does not turn into an
    exit code) would otherwise end the whole comparison."""
    try:
        return train.main(args)
    except Exception as e:
        print(f"fmdist-compare: {what} crashed: {crash_line(e)}", file=sys.stderr, flush=True)
        return 1


def crash_line(error: Exception) -> str:
    """The exception's type and first line, and the last place in fmdist it passed through."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    package = Path(__file__).resolve().parent
    ours = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve().parent == package]
    where = f" (in {ours[-1].name}, fmdist/{Path(ours[-1].filename).name}:{ours[-1].lineno})" if ours else ""
    return f"{type(error).__name__}{': ' + first_line if first_line else ''}{where}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.nproc < 1:
            raise FmdistError(f"--nproc: expected at least 1, got {args.nproc}")
        plan, out = make_plan(args.config, args.overrides, args.output_dir)
        if args.plan:
            write_plan(plan, out)
            return 0
    except FmdistError as e:
        print(f"fmdist: error: {e}", file=sys.stderr)
        return e.exit_code

    if plan.stand_in is not None:
        print(f"fmdist-compare: pre-training stand-in weights in {out / STAND_IN_FOLDER}", flush=True)
        code = launch(plan.stand_in, args.nproc, "the stand-in pre-training")
        if code != 0:
            print(f"fmdist-compare: the stand-in pre-training failed (exit code {code})", file=sys.stderr)
            return code

    statuses = {}
    for regime, regime_args in plan.regimes.items():
        print(f"fmdist-compare: {regime} -> {out / regime}", flush=True)
        statuses[regime] = launch(regime_args, args.nproc, regime)
        if statuses[regime] == EXIT_CHECKPOINTED:
            print(f"fmdist-compare: stopped during {regime}; run the same command again to resume", file=sys.stderr)
            return EXIT_CHECKPOINTED

    (out / "comparison.json").write_text(
        json.dumps(
            {
                "config": args.config,
                "overrides": args.overrides,
                "nproc": args.nproc,
                "stand_in_weights": None if plan.stand_in is None else str(out / STAND_IN_FOLDER / WEIGHTS_FILE),
                "exit_codes": statuses,
            },
            indent=2,
        )
        + "\n"  # fmt: skip
    )
    try:
        report = report_folders(plan.folders, out, title=plan.title, notes=plan.notes)
    except FmdistError as e:
        print(f"fmdist: error: {e}", file=sys.stderr)
        return e.exit_code
    failed = {regime: code for regime, code in statuses.items() if code != 0}
    print(f"fmdist-compare: report written to {report}" + (f"; failed: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
