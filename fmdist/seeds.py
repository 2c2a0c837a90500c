"""Configs against each other over several seeds: `python -m fmdist.seeds --config A --config B`.

Every (config, seed) pair trains in this process into DIR/<config name>/seed-<seed>, with the same
overrides; then DIR/seeds.md and DIR/seeds.json give the best and final validation accuracy of
each config as mean ± standard deviation over the seeds. Rerunning skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from fmdist import train
from fmdist.outputs import HISTORY_FILE, atomic_write

TABLE_FILE = "seeds.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fmdist.seeds", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, metavar="PATH", help="a config (repeat)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/seeds"), help="default runs/seeds")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every run")
    return parser.parse_args(argv)


def summarise(histories: dict[str, list[list[dict]]]) -> dict[str, dict]:
    """Per config: the best and final validation accuracies of its runs, their mean and std."""
    summary = {}
    for name, runs in histories.items():
        best = [max(r["val_acc"] for r in history) for history in runs]
        final = [history[-1]["val_acc"] for history in runs]
        summary[name] = {
            "runs": len(runs),
            "epochs": len(runs[0]),
            "best": best,
            "final": final,
            "best_mean": statistics.fmean(best),
            "best_std": statistics.stdev(best) if len(best) > 1 else 0.0,
            "final_mean": statistics.fmean(final),
            "final_std": statistics.stdev(final) if len(final) > 1 else 0.0,
        }
    return summary


def table(summary: dict[str, dict], seeds: list[int], overrides: list[str]) -> str:
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; overrides: {' '.join(overrides) or 'none'}",
        "",
        "| config | runs | epochs | best val acc, mean ± std | final val acc, mean ± std |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {s['runs']} | {s['epochs']} | {100 * s['best_mean']:.1f}% ± {100 * s['best_std']:.1f} "
            f"| {100 * s['final_mean']:.1f}% ± {100 * s['final_std']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    histories: dict[str, list[list[dict]]] = {}
    for config in args.config:
        name = Path(config).stem
        if name in histories:
            print(f"fmdist-seeds: error: two configs named {name}", file=sys.stderr)
            return 2
        histories[name] = []
        for seed in args.seeds:
            out = args.output_dir / name / f"seed-{seed}"
            print(f"fmdist-seeds: {name}, seed {seed} -> {out}", flush=True)
            code = train.main(["--config", config, *args.overrides, f"seed={seed}", f"output_dir={out}"])
            if code != 0:
                print(f"fmdist-seeds: error: {name} seed {seed} failed (exit code {code})", file=sys.stderr)
                return code
            histories[name].append(json.loads((out / HISTORY_FILE).read_text()))
    summary = summarise(histories)
    text = table(summary, args.seeds, args.overrides)
    atomic_write(args.output_dir / TABLE_FILE, text.encode())
    atomic_write(args.output_dir / "seeds.json", (json.dumps(summary, indent=2) + "\n").encode())
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
