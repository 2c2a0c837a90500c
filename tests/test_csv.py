"""Kaggle-format CSV: the real sample loads; every defect is one line naming file, line and column."""

import re

import numpy as np
import pytest
import torch

from fmdist.csvdata import read_kaggle_csv
from fmdist.errors import FmdistError

from helpers import REAL_SAMPLE_CSV, REPO, train, write_kaggle_csv

HEADER = "label," + ",".join(f"pixel{i}" for i in range(1, 785))


def row(label=3, pixels=None) -> list[str]:
    return [str(label)] + [str(v) for v in (pixels if pixels is not None else [7] * 784)]


def write_rows(path, rows, header=HEADER):
    path.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return path


def test_real_sample_loads_as_uint8_images(real_sample):
    images, labels = read_kaggle_csv(REAL_SAMPLE_CSV, num_classes=10)
    expected_images, expected_labels = real_sample
    assert images.dtype == torch.uint8 and images.shape == (len(expected_labels), 28, 28)
    assert torch.equal(images, torch.from_numpy(expected_images))
    assert torch.equal(labels, torch.from_numpy(expected_labels))
    assert set(labels.tolist()) == set(range(10))


def bad_pixel(column, value):
    pixels = [7] * 784
    pixels[column - 1] = value
    return pixels


CASES = {
    "empty-file": (lambda p: p.write_text(""), "empty file"),
    "header-only": (lambda p: p.write_text(HEADER + "\n"), "no data rows after the header"),
    "header-short": (
        lambda p: write_rows(p, [row()], header="label,pixel1"),
        r"line 1 \(header\) has 2 columns, expected 785",
    ),
    "header-misnamed": (
        lambda p: write_rows(p, [row()], header=HEADER.replace("pixel5,", "px5,")),
        r"line 1 \(header\), column 6: expected 'pixel5', found 'px5'",
    ),
    "row-too-long": (lambda p: write_rows(p, [row(), row() + ["1"]]), "line 3 has 786 columns, expected 785"),
    "row-too-short": (lambda p: write_rows(p, [row(), row(), row()[:-2]]), "line 4 has 783 columns, expected 785"),
    "blank-line": (lambda p: write_rows(p, [row(), [""], row()]), "line 3 is blank"),
    "non-numeric": (
        lambda p: write_rows(p, [row(), row(pixels=bad_pixel(12, "abc"))]),
        "line 3, column 'pixel12': 'abc' is not a number",
    ),
    "nan": (
        lambda p: write_rows(p, [row(pixels=bad_pixel(700, "NaN"))]),
        "line 2, column 'pixel700': empty or NaN cell",
    ),
    "empty-cell": (
        lambda p: write_rows(p, [row(), row(), row(pixels=bad_pixel(1, ""))]),
        "line 4, column 'pixel1': empty or NaN cell",
    ),
    "label-too-big": (
        lambda p: write_rows(p, [row(), row(label=10)]),
        r"line 3, column 'label': label 10 is outside 0\.\.9",
    ),
    "label-negative": (lambda p: write_rows(p, [row(label=-1)]), r"line 2, column 'label': label -1 is outside 0\.\.9"),
    "label-fractional": (lambda p: write_rows(p, [row(label="2.5")]), "line 2, column 'label': 2.5 is not an integer"),
    "pixel-too-big": (
        lambda p: write_rows(p, [row(pixels=bad_pixel(784, 256))]),
        r"line 2, column 'pixel784': pixel value 256 is outside 0\.\.255",
    ),
    "pixel-negative": (
        lambda p: write_rows(p, [row(), row(pixels=bad_pixel(3, -4))]),
        r"line 3, column 'pixel3': pixel value -4 is outside 0\.\.255",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_each_defect_is_one_line_naming_the_file_and_first_bad_cell(tmp_path, case):
    write, expected = CASES[case]
    path = tmp_path / "fashion.csv"
    write(path)
    with pytest.raises(FmdistError, match=expected) as error:
        read_kaggle_csv(path, num_classes=10)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(FmdistError, match="nope.csv: CSV file not found"):
        read_kaggle_csv(tmp_path / "nope.csv", num_classes=10)


def test_first_bad_row_is_reported_when_there_are_several(tmp_path):
    path = write_rows(tmp_path / "f.csv", [row(), row(pixels=bad_pixel(9, 300)), row(label=12)])
    with pytest.raises(FmdistError, match="line 3, column 'pixel9'"):
        read_kaggle_csv(path, num_classes=10)


def short_row():
    return row()[:-2]


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([row(), row(pixels=bad_pixel(5, "abc"))] + [row()] * 5 + [short_row()], "line 3, column 'pixel5': 'abc'"),
        ([row(), short_row()] + [row()] * 5 + [row(pixels=bad_pixel(5, "abc"))], "line 3 has 783 columns"),
        ([row(), row(label=11)] + [row()] * 5 + [row() + ["1"]], "line 3, column 'label': label 11 is outside"),
        ([row(), row() + ["1"]] + [row()] * 5 + [row(label=11)], "line 3 has 786 columns"),
        ([row(pixels=bad_pixel(1, "")), row(), [""], row()], "line 2, column 'pixel1': empty or NaN cell"),
        ([row(), [""], row(pixels=bad_pixel(1, ""))], "line 3 is blank"),
    ],
    ids=["cell-then-short-row", "short-row-then-cell", "label-then-long-row", "long-row-then-label",
         "cell-then-blank-line", "blank-line-then-cell"],
)  # fmt: skip
def test_the_defect_nearest_the_top_is_reported_whether_a_bad_cell_or_a_malformed_row(tmp_path, rows, expected):
    path = write_rows(tmp_path / "f.csv", rows)
    with pytest.raises(FmdistError, match=re.escape(f"{path}: {expected}")):
        read_kaggle_csv(path, num_classes=10)


@pytest.mark.parametrize(
    "ending",
    ["\n\n", "\n\n\n\n", "\n\n\n", "\n   \t", "\n\n  ", "\r\n\r\n\r\n"],
    ids=["one-blank-line", "three-blank-lines", "two-blank-lines-no-final-newline", "spaces-no-final-newline",
         "blank-then-spaces-no-final-newline", "crlf-blank-lines"],
)  # fmt: skip
def test_blank_lines_at_the_end_of_the_file_are_ignored(tmp_path, ending):
    rows = [",".join(row(label=i, pixels=[i * 20 + j % 5 for j in range(784)])) for i in range(3)]
    newline = "\r\n" if ending.startswith("\r\n") else "\n"
    clean = tmp_path / "clean.csv"
    clean.write_bytes(newline.join([HEADER, *rows]).encode() + newline.encode())
    trailing = tmp_path / "trailing.csv"
    trailing.write_bytes(newline.join([HEADER, *rows]).encode() + ending.encode())
    images, labels = read_kaggle_csv(trailing, num_classes=10)
    expected_images, expected_labels = read_kaggle_csv(clean, num_classes=10)
    assert labels.tolist() == [0, 1, 2]
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


@pytest.mark.parametrize("blank", ["", "   "], ids=["empty", "spaces"])
def test_a_blank_line_inside_the_file_is_a_defect_even_when_the_file_also_ends_with_blank_lines(tmp_path, blank):
    path = tmp_path / "f.csv"
    path.write_text("\n".join([HEADER, ",".join(row()), ",".join(row()), blank, ",".join(row())]) + "\n\n\n")
    with pytest.raises(FmdistError, match=re.escape(f"{path}: line 4 is blank; expected 785 comma-separated values")):
        read_kaggle_csv(path, num_classes=10)


def test_labels_are_checked_against_the_configured_number_of_classes(tmp_path):
    path = write_kaggle_csv(tmp_path / "f.csv", np.zeros((3, 28, 28), np.uint8), np.array([0, 4, 5]))
    read_kaggle_csv(path, num_classes=6)
    with pytest.raises(FmdistError, match=r"line 4, column 'label': label 5 is outside 0\.\.4"):
        read_kaggle_csv(path, num_classes=5)


def test_trainer_reports_a_bad_csv_once_exits_2_and_keeps_earlier_results(tmp_path):
    good = write_rows(tmp_path / "good.csv", [row(label=i % 10) for i in range(8)])
    bad = write_rows(tmp_path / "bad.csv", [row(), row(pixels=bad_pixel(40, "x"))])
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.json").write_text("[]")  # an earlier run's results must survive
    (out / "config.yaml").write_text("epochs: 1\n")
    result = train(
        tmp_path,
        "--config",
        str(REPO / "configs/scratch.yaml"),
        "data.source=csv",
        f"data.train_csv={good}",
        f"data.test_csv={bad}",
        f"output_dir={out}",
        "overwrite=true",
        nproc=2,
        check=False,
    )
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("fmdist: error:")]
    assert error_lines == [f"fmdist: error: {bad}: line 3, column 'pixel40': 'x' is not a number"]
    assert (out / "history.json").read_text() == "[]"
    assert (out / "config.yaml").read_text() == "epochs: 1\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "history.json"]
