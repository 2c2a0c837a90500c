"""Every bad input the README's table lists, end to end under a 2-process torchrun.

Each case must end with exactly one `fmdist: error:` line (from rank 0) that names the
problem, a non-zero exit of every process within the timeout, and the earlier run in
output_dir byte-for-byte as it was, although the command asks to overwrite it.
"""

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from fmdist import models

from helpers import CONFIGS, REPO, train, write_kaggle_csv

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


def csv_case(make_bad):
    def args(tmp: Path) -> list[str]:
        good = write_kaggle_csv(tmp / "good.csv", np.zeros((64, 28, 28), np.uint8), np.arange(64) % 10)
        bad = make_bad(tmp)
        sizes = ["data.train_size=null", "data.test_size=null"]
        return ["data.source=csv", f"data.train_csv={good}", f"data.test_csv={bad}", *sizes, *BATCH, "epochs=1"]

    return args


def weights_case(write):
    def args(tmp: Path) -> list[str]:
        path = tmp / "weights.pth"
        if write is not None:
            write(path)
        return ["regime=pretrained", f"model.weights={path}", "model.width=64", *SMALL[:3], *BATCH]

    return args


class NotATensor:
    pass


@dataclass
class Case:
    args: object  # (tmp) -> list of command-line overrides
    shows: str  # the part of the one-line message the README's table shows too
    nproc: int = 2
    env: dict = field(default_factory=dict)
    keep_earlier_run: bool = True  # run into a copy of an earlier run with resume=never overwrite=true


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
    "csv: file missing": Case(csv_case(lambda t: t / "missing.csv"), "missing.csv: CSV file not found"),
    "csv: empty file": Case(csv_case(lambda t: _text(t / "bad.csv", "")), "bad.csv: empty file"),
    "csv: wrong header": Case(csv_case(lambda t: csv_with(t, header=HEADER.replace("pixel5,", "px5,"))),
                              "line 1 (header), column 6: expected 'pixel5', found 'px5'"),
    "csv: wrong column count": Case(csv_case(lambda t: csv_with(t, GOOD_ROW + ",1")), "line 3 has 786 columns, expected 785"),
    "csv: blank line": Case(csv_case(lambda t: csv_with(t, "", GOOD_ROW)), "line 3 is blank"),
    "csv: non-numeric cell": Case(csv_case(lambda t: csv_with(t, row_with(12, "abc"))), "line 3, column 'pixel12': 'abc' is not a number"),
    "csv: NaN or empty cell": Case(csv_case(lambda t: csv_with(t, row_with(700, "NaN"))), "line 3, column 'pixel700': empty or NaN cell"),
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
    "weights: init_from missing": Case(lambda t: [f"model.init_from={t / 'nope.pt'}", *SMALL], "nope.pt: file not found"),
    "data: torchvision files missing, download off": Case(
        lambda t: ["data.source=torchvision", f"data.root={t}", "data.download=false", *BATCH], "(data.download is false); put the IDX files"),
    "processes: more than training images": Case(
        lambda t: [*SMALL[:1], "data.train_size=2", "data.test_size=10", "batch_size=1"],
        "2 training images cannot be shared by 3 processes", nproc=3),
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
}  # fmt: skip


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _yaml(tmp: Path, text: str) -> str:
    path = tmp / "mine.yaml"
    path.write_text(f"extends: {CONFIGS / 'smoke.yaml'}\n" + text)
    return str(path)


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
    before = snapshot(out) if out.exists() else {}
    command = ["--config", config, f"output_dir={out}", "resume=never", "overwrite=true", *args]
    env = {k: v.format(tmp=tmp_path) for k, v in case.env.items()}
    result = train(tmp_path, *command, nproc=case.nproc, env=env, check=False, timeout=120)

    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("fmdist: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert case.shows in errors[0]
    assert (snapshot(out) if out.exists() else {}) == before


def test_the_readme_table_lists_every_case():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("### Bad input") :]
    for name, case in CASES.items():
        assert f"| {name} |" in table, name
        assert case.shows.replace("|", "\\|") in table, name
