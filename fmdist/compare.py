"""Run the regimes with the same settings, then write one report: `fmdist-compare --config PATH`.

Each regime trains into its own folder under the comparison folder, as one process in this
one or as a torchrun job (--nproc N). A regime that fails does not stop the others; the report
covers what finished. Rerunning the command resumes or skips what is already done.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fmdist import train
from fmdist.config import keys_help, load_config
from fmdist.errors import FmdistError
from fmdist.outputs import WEIGHTS_FILE
from fmdist.preemption import EXIT_CHECKPOINTED
from fmdist.report import report_folders

STAND_IN_FOLDER = "stand-in-pretraining"


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
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every regime")
    return parser.parse_args(argv)


def launch(config: str | None, overrides: list[str], nproc: int) -> int:
    """Train once with these overrides; the exit code as the trainer documents it."""
    args = (["--config", config] if config else []) + overrides
    if nproc == 1:
        return train.main(args)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fmdist.train", *args]  # fmt: skip
    return subprocess.run(command).returncode


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.nproc < 1:
            raise FmdistError(f"--nproc: expected at least 1, got {args.nproc}")
        cfg = load_config(args.config, args.overrides)
        if cfg.compare.stand_in_weights and cfg.data.source != "synthetic":
            raise FmdistError(
                "compare.stand_in_weights needs data.source=synthetic (it pre-trains on another synthetic task)"
            )
    except FmdistError as e:
        print(f"fmdist: error: {e}", file=sys.stderr)
        return e.exit_code
    out = args.output_dir or Path("runs") / f"compare-{cfg.name}"
    group = cfg.wandb.group or out.resolve().name
    shared = [*args.overrides, f"wandb.group={group}"]
    notes, statuses = [], {}

    stand_in = None
    if cfg.compare.stand_in_weights and any(regime != "scratch" for regime in cfg.compare.regimes):
        stand_in_dir = out / STAND_IN_FOLDER
        print(f"fmdist-compare: pre-training stand-in weights in {stand_in_dir}", flush=True)
        code = launch(args.config, [*shared, "regime=scratch", f"data.synthetic_seed={cfg.data.synthetic_seed + 1}",
                                    f"epochs={cfg.compare.stand_in_epochs}", "wandb.mode=disabled",
                                    f"output_dir={stand_in_dir}"], args.nproc)  # fmt: skip
        if code != 0:
            print(f"fmdist-compare: the stand-in pre-training failed (exit code {code})", file=sys.stderr)
            return code
        stand_in = stand_in_dir / WEIGHTS_FILE
        notes.append(
            f"Smoke run: pretrained and frozen start from stand-in weights ({stand_in}), pre-trained for "
            f"{cfg.compare.stand_in_epochs} epochs on a different synthetic task, not from ImageNet."
        )

    for regime in cfg.compare.regimes:
        print(f"fmdist-compare: {regime} -> {out / regime}", flush=True)
        regime_overrides = [*shared, f"regime={regime}", f"output_dir={out / regime}"]
        if stand_in is not None and regime != "scratch":
            regime_overrides.append(f"model.weights={stand_in}")
        statuses[regime] = launch(args.config, regime_overrides, args.nproc)
        if statuses[regime] == EXIT_CHECKPOINTED:
            print(f"fmdist-compare: stopped during {regime}; run the same command again to resume", file=sys.stderr)
            return EXIT_CHECKPOINTED

    (out / "comparison.json").write_text(
        json.dumps(
            {
                "config": args.config,
                "overrides": args.overrides,
                "nproc": args.nproc,
                "stand_in_weights": None if stand_in is None else str(stand_in),
                "exit_codes": statuses,
            },
            indent=2,
        )
        + "\n"  # fmt: skip
    )
    try:
        report = report_folders([out / r for r in cfg.compare.regimes], out, title=f"fmdist comparison: {cfg.name}",
                                notes=notes)  # fmt: skip
    except FmdistError as e:
        print(f"fmdist: error: {e}", file=sys.stderr)
        return e.exit_code
    failed = {regime: code for regime, code in statuses.items() if code != 0}
    print(f"fmdist-compare: report written to {report}" + (f"; failed: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
