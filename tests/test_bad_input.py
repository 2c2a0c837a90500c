"""Every bad input the README's table lists, end to end over 2 (or 3) processes started directly.

Not under torchrun, which ends the other workers once one fails: here every rank must end by
itself within the timeout, with exit code 2. Rank 0's stderr holds exactly one `fmdist: error:`
line naming the problem and no traceback; the other ranks print nothing at all; and the earlier
run in output_dir is byte-for-byte as it was, although the command asks to overwrite it.
"""

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from fmdist import models
from fmdist.errors import FmdistError

from helpers import CONFIGS, REPO, train, train_ranks, write_fashion_mnist_idx, write_kaggle_csv

HEADER = "label," + ",".join(f"pixel{i}" for i in range(1, 785))
GOOD_ROW = "3," + ",".join(["7"] * 784)
SMALL = ("data.source=synthetic", "data.train_size=512", "data.test_size=100", "model.width=16", "epochs=1")
BATCH = ("batch_size=32",)


def csv_with(tmp: Path, *rows: str, header: str = HEADER) -> Path:
    path = tmp / "bad.csv"
    path.write_text("\n".join([header, GOOD_ROW, *rows]) + "\n")
    return path


def row_with(column: int, value: str) -> str:
    cells = GOOD_ROW.split(",")
    cells[column] = value
    return ",".join(cells)


def csv_case(make_test_csv, *more: str):
    """A run on a good 64-image training CSV and the test CSV make_test_csv(tmp) writes."""

    def args(tmp: Path) -> list[str]:
        good = write_kaggle_csv(tmp / "good.csv", np.zeros((64, 28, 28), np.uint8), np.arange(64) % 10)
        test = make_test_csv(tmp)
        sizes = ["data.train_size=null", "data.test_size=null"]
        return ["data.source=csv", f"data.train_csv={good}", f"data.test_csv={test}", *sizes, *BATCH, "epochs=1", *more]

    return args


def weights_case(write):
    def args(tmp: Path) -> list[str]:
        path = tmp / "weights.pth"
        if write is not None:
            write(path)
        return ["regime=pretrained", f"model.weights={path}", "model.width=64", *SMALL[:3], *BATCH]

    return args


def garble_checkpoints(run: Path) -> None:
    for path in (run / "checkpoints").iterdir():
        path.write_bytes(b"\x00garbage" * 64)


class NotATensor:
    pass


@dataclass
class Case:
    args: object  # (tmp) -> list of command-line overrides
    shows: str  # the part of the one-line message the README's table shows too
    nproc: int = 2
    env: dict = field(default_factory=dict)
    keep_earlier_run: bool = True  # run into a copy of an earlier run with resume=never overwrite=true
    damage: object = None  # (copy of the earlier run) -> None, before the command runs


CASES = {
    "config: unknown key": Case(lambda t: ["optimizer.lrr=0.1"], "unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'?"),
    "config: unknown key in a file": Case(
        lambda t: ["--config-file", _yaml(t, "optimiser:\n  lr: 0.1\n")], "unknown key 'optimiser.lr'; did you mean 'optimizer.lr'?"),
    "config: wrong type": Case(lambda t: ["epochs=three"], "key 'epochs': expected an integer, got 'three'"),
    "config: impossible value": Case(lambda t: ["optimizer.lr=-1"], "key 'optimizer.lr': expected a positive number"),
    "config: unknown choice": Case(lambda t: ["regime=froze"], "key 'regime': expected one of scratch|pretrained|frozen|partial, got 'froze' (did you mean 'frozen'?)"),
    "config: unfreezing a module the model lacks": Case(
        lambda t: ["regime=partial", f"model.weights={_weights(t)}", "model.unfreeze=[layer4.2]"],
        "model.unfreeze: ResNet has no module 'layer4.2'"),
    "config: file missing": Case(lambda t: ["--config-file", str(t / "nope.yaml")], "nope.yaml: config file not found"),
    "config: not valid YAML": Case(lambda t: ["--config-file", _yaml(t, "epochs: [1\n")], "mine.yaml: line 3 not valid YAML"),
    "config: file not a mapping": Case(
        lambda t: ["--config-file", str(_text(t / "list.yaml", "- epochs\n- 3\n"))],
        "list.yaml: expected a mapping of config keys at the top level"),
    "config: section given one value": Case(
        lambda t: ["--config-file", _yaml(t, "optimizer: adam\n")],
        "mine.yaml: key 'optimizer' is a section; expected a mapping such as 'optimizer: {...}'"),
    "config: extends cycle": Case(
        lambda t: ["--config-file", _extends_cycle(t)], "a.yaml: 'extends' forms a cycle"),
    "config: command-line item without =": Case(lambda t: ["epochs"], "command line: expected key=value, got 'epochs'"),
    "config: unknown command-line option": Case(
        lambda t: ["--epochs=3"], "unrecognized arguments: --epochs=3; see fmdist-train --help"),
    "config: batch_size of one image": Case(
        lambda t: [*SMALL, "batch_size=1"], "key 'batch_size': expected at least 2 for training"),
    "csv: file missing": Case(csv_case(lambda t: t / "missing.csv"), "missing.csv: CSV file not found"),
    "csv: empty file": Case(csv_case(lambda t: _text(t / "bad.csv", "")), "bad.csv: empty file"),
    "csv: header only": Case(csv_case(lambda t: _text(t / "bad.csv", HEADER + "\n")), "bad.csv: no data rows after the header"),
    "csv: wrong header": Case(csv_case(lambda t: csv_with(t, header=HEADER.replace("pixel5,", "px5,"))),
                              "line 1 (header), column 6: expected 'pixel5', found 'px5'"),
    "csv: header with a wrong column count": Case(
        csv_case(lambda t: csv_with(t, header=HEADER + ",pixel785")), "line 1 (header) has 786 columns, expected 785"),
    "csv: not readable as CSV": Case(
        csv_case(lambda t: csv_with(t, '"' + GOOD_ROW)), "bad.csv: not readable as CSV (Error tokenizing data."),
    "csv: wrong column count": Case(csv_case(lambda t: csv_with(t, GOOD_ROW + ",1")), "line 3 has 786 columns, expected 785"),
    "csv: short row": Case(csv_case(lambda t: csv_with(t, GOOD_ROW.rsplit(",", 1)[0])), "line 3 has 784 columns, expected 785"),
    "csv: blank line": Case(csv_case(lambda t: csv_with(t, "", GOOD_ROW)), "line 3 is blank"),
    "csv: non-numeric cell": Case(csv_case(lambda t: csv_with(t, row_with(12, "abc"))), "line 3, column 'pixel12': 'abc' is not a number"),
    "csv: NaN cell": Case(csv_case(lambda t: csv_with(t, row_with(700, "NaN"))), "line 3, column 'pixel700': empty or NaN cell"),
    "csv: empty cell": Case(csv_case(lambda t: csv_with(t, row_with(700, ""))), "line 3, column 'pixel700': empty or NaN cell"),
    "csv: fractional value": Case(csv_case(lambda t: csv_with(t, row_with(0, "2.5"))), "line 3, column 'label': 2.5 is not an integer"),
    "csv: label out of range": Case(csv_case(lambda t: csv_with(t, row_with(0, "10"))), "line 3, column 'label': label 10 is outside 0..9"),
    "csv: pixel out of range": Case(csv_case(lambda t: csv_with(t, row_with(784, "256"))), "line 3, column 'pixel784': pixel value 256 is outside 0..255"),
    "weights: file missing": Case(weights_case(None), "weights.pth: file not found"),
    "weights: corrupt file": Case(weights_case(lambda p: p.write_bytes(b"\x00garbage" * 64)), "not a readable PyTorch weights file"),
    "weights: not a state dict": Case(weights_case(lambda p: torch.save([torch.zeros(1)], p)), "expected a state dict"),
    "weights: pickle refused by weights_only": Case(
        weights_case(lambda p: torch.save({"w": NotATensor()}, p)), "refused by torch.load(weights_only=True)"),
    "weights: wrong keys": Case(
        weights_case(lambda p: torch.save(torchvision.models.resnet34().state_dict(), p)), "keys do not match resnet18"),
    "weights: wrong shapes": Case(
        weights_case(lambda p: torch.save(models.resnet18(width=32).state_dict(), p)),
        "'conv1.weight' has shape [32, 3, 7, 7], resnet18 (width 64) expects [64, 3, 7, 7]"),
    "weights: named weights offline, not cached": Case(
        lambda t: ["regime=frozen", "model.width=64", *SMALL[:3], *BATCH], "if offline, put resnet18-f37072fd.pth into",
        env={"TORCH_HOME": "{tmp}/empty-torch-home"}),
    "weights: unknown torchvision weights name": Case(
        lambda t: ["regime=pretrained", "model.weights=IMAGENET1K_V9", "model.width=64", *SMALL[:3], *BATCH],
        "torchvision has no resnet18 weights named 'IMAGENET1K_V9'"),
    "weights: init_from missing": Case(lambda t: [f"model.init_from={t / 'nope.pt'}", *SMALL], "nope.pt: file not found"),
    "data: torchvision files missing, download off": Case(
        lambda t: ["data.source=torchvision", f"data.root={t}", "data.download=false", *BATCH], "(data.download is false); put the IDX files"),
    "data: IDX label beyond num_classes": Case(
        lambda t: ["data.source=torchvision", f"data.root={_idx_files(t, top_label=10)}", "data.download=false",
                   "data.train_size=null", "data.test_size=null", *BATCH, "epochs=1"],
        "labels run up to 10, but model.num_classes is 10"),
    "data: train_size larger than the file": Case(
        csv_case(lambda t: t / "good.csv", "data.train_size=100"), "good.csv holds only 64 images"),
    "data: holdout not smaller than the file": Case(
        csv_case(lambda t: t / "good.csv", "data.test_csv=null", "data.holdout=64"),
        "good.csv holds only 64 images; expected fewer"),
    "processes: more than training images": Case(
        lambda t: [*SMALL[:1], "data.train_size=2", "data.test_size=10", "batch_size=1"],
        "2 training images cannot be shared by 3 processes", nproc=3),
    "processes: as many as training images": Case(
        lambda t: [*SMALL[:1], "data.train_size=2", "data.test_size=10", "batch_size=2"],
        "2 training images cannot be shared by 2 processes: each process needs at least 2"),
    "processes: batch larger than a process's share": Case(
        lambda t: [*SMALL, "batch_size=300"], "batch_size=300 is larger than each process's share"),
    "output_dir: not writable": Case(
        lambda t: [*SMALL, f"output_dir={_text(t / 'a-file', 'x') / 'run'}"], "not writable (Not a directory)",
        keep_earlier_run=False),
    "resume: checkpoint of a different run": Case(
        lambda t: [*SMALL, "batch_size=32", "resume=auto"], "belongs to a different run: batch_size (64 -> 32)"),
    "resume: earlier run with resume=never": Case(
        lambda t: [*SMALL, "resume=never", "overwrite=false"], "already holds a finished run (resume=never)"),
    "resume: named checkpoint missing": Case(lambda t: [*SMALL, f"resume={t / 'nope.pt'}"], "nope.pt not found"),
    "resume: named file is not a checkpoint": Case(
        lambda t: [*SMALL, f"resume={_weights(t)}"], "not an fmdist checkpoint"),
    "resume: checkpoint that does not fit the model": Case(
        lambda t: [*SMALL, "resume=auto", "overwrite=false"],
        "checkpoint does not fit this run's model or optimizer (Error(s) in loading state_dict for ResNet: size "
        "mismatch for fc.weight", damage=lambda run: _shrink_the_head_of_every_checkpoint(run),
        nproc=1),  # the earlier run's world size
    "eval_only: results already there": Case(
        lambda t: [*SMALL, "eval_only=true", "overwrite=false"], "already holds eval.json; set overwrite=true",
        damage=lambda run: _text(run / "eval.json", "{}\n")),
    "resume: every checkpoint unreadable": Case(
        lambda t: [*SMALL, "resume=auto", "overwrite=false"], "best.pt unreadable); set overwrite=true",
        damage=garble_checkpoints),
}  # fmt: skip


def _shrink_the_head_of_every_checkpoint(run: Path) -> None:
    for path in (run / "checkpoints").iterdir():
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["model"]["fc.weight"] = checkpoint["model"]["fc.weight"][:5]
        torch.save(checkpoint, path)


def _idx_files(tmp: Path, top_label: int) -> Path:
    labels = np.arange(80) % 10
    labels[7] = top_label
    return write_fashion_mnist_idx(tmp / "idx", np.zeros((80, 28, 28), np.uint8), labels, train_count=64)


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _yaml(tmp: Path, text: str) -> str:
    path = tmp / "mine.yaml"
    path.write_text(f"extends: {CONFIGS / 'smoke.yaml'}\n" + text)
    return str(path)


def _extends_cycle(tmp: Path) -> str:
    _text(tmp / "a.yaml", "extends: b.yaml\n")
    _text(tmp / "b.yaml", "extends: a.yaml\n")
    return str(tmp / "a.yaml")


def _weights(tmp: Path) -> Path:
    path = tmp / "plain.pt"
    torch.save(models.resnet18(in_channels=1, num_classes=10, width=16).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("earlier") / "run"
    train(folder.parent, "--config", str(CONFIGS / "smoke.yaml"), *SMALL, f"output_dir={folder}")
    return folder


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_on_rank_zero_every_rank_exits_and_nothing_is_overwritten(tmp_path, earlier_run, name):
    case = CASES[name]
    args = case.args(tmp_path)
    config = str(CONFIGS / "smoke.yaml")
    if args and args[0] == "--config-file":
        config, args = args[1], args[2:]
    out = tmp_path / "out"
    if case.keep_earlier_run:
        shutil.copytree(earlier_run, out)
        if case.damage is not None:
            case.damage(out)
    before = snapshot(out) if out.exists() else {}
    command = ["--config", config, f"output_dir={out}", "resume=never", "overwrite=true", *args]
    env = {k: v.format(tmp=tmp_path) for k, v in case.env.items()}
    ranks = train_ranks(tmp_path, *command, nproc=case.nproc, env=env, timeout=120)

    assert [rank.returncode for rank in ranks] == [FmdistError.exit_code] * case.nproc, ranks[0].stderr[-3000:]
    main, others = ranks[0], ranks[1:]
    errors = [line for line in main.stderr.splitlines() if line.startswith("fmdist: error:")]
    assert len(errors) == 1, main.stderr[-3000:]
    assert case.shows in errors[0]
    assert "fmdist: error:" not in main.stdout
    assert "Traceback" not in main.stderr + main.stdout, main.stderr[-3000:]
    for rank in others:  # only rank 0 speaks
        assert (rank.stdout, rank.stderr) == ("", ""), f"rank {rank.rank}:\n{rank.stdout}{rank.stderr}"[-3000:]
    assert (snapshot(out) if out.exists() else {}) == before


def readme_table() -> dict[str, str]:
    """The rows of the README's bad-input table: bad input -> what the message says."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Bad input") :]
    section = section[: section.index("\n#", 1)]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith(("| bad input |", "| --- |")):
            name, message = line.removeprefix("| ").split(" | ", 1)
            rows[name] = message
    return rows


def test_the_readme_table_and_the_cases_match():
    rows = readme_table()
    assert [name for name in CASES if name not in rows] == [], "cases the README's table lacks"
    assert [name for name in rows if name not in CASES] == [], "README rows without a case"
    for name, case in CASES.items():
        assert case.shows.replace("|", "\\|") in rows[name], name
