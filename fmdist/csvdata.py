"""FashionMNIST in Kaggle's CSV format (`label,pixel1..pixel784`, one image per row), validated on load.

Every defect is reported as one line naming the file, the line (the header is line 1) and the
column of the first bad cell, so a 60,000-row file can be fixed without guessing.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fmdist.errors import FmdistError

IMAGE_SIDE = 28
COLUMNS = ["label"] + [f"pixel{i}" for i in range(1, IMAGE_SIDE * IMAGE_SIDE + 1)]


def read_kaggle_csv(path: str | Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 [N, 28, 28] and labels as int64 [N]."""
    path = Path(path)
    if not path.is_file():
        raise FmdistError(f"{path}: CSV file not found")
    raw = path.read_bytes()
    if not raw.strip():
        raise FmdistError(f"{path}: empty file; expected the header label,pixel1..pixel784 and one row per image")
    lines = raw.splitlines()
    _check_header(path, lines[0])
    rows = _without_trailing_blank_lines(lines[1:])
    if not rows:
        raise FmdistError(f"{path}: no data rows after the header")
    malformed = _first_malformed_row(path, rows)
    # Cells are checked only in the rows above the first malformed one, so whichever defect is
    # reported is the one nearest the top of the file.
    well_formed = malformed[0] if malformed else len(rows)
    frame = _read_rows(path, raw, well_formed)
    values = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    _check_cells(path, frame, values, num_classes)
    if malformed:
        raise FmdistError(malformed[1])

    labels = torch.from_numpy(values[:, 0].astype(np.int64))
    images = torch.from_numpy(values[:, 1:].astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE))
    return images, labels


def _without_trailing_blank_lines(rows: list[bytes]) -> list[bytes]:
    """Editors and exports often end a file with blank lines; they hold no image."""
    end = len(rows)
    while end and not rows[end - 1].strip():
        end -= 1
    return rows[:end]


def _read_rows(path: Path, raw: bytes, count: int) -> pd.DataFrame:
    """The first `count` data rows; pandas would read the blank lines after them as rows of NaN."""
    try:
        return pd.read_csv(io.BytesIO(raw), header=0, nrows=count, skip_blank_lines=False, low_memory=False)
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as e:
        raise FmdistError(f"{path}: not readable as CSV ({str(e).strip().splitlines()[-1]})") from None


def _check_header(path: Path, first_line: bytes) -> None:
    header = [cell.strip().strip('"') for cell in first_line.decode("utf-8", errors="replace").split(",")]
    if len(header) != len(COLUMNS):
        raise FmdistError(
            f"{path}: line 1 (header) has {len(header)} columns, expected {len(COLUMNS)} (label,pixel1..pixel784)"
        )
    for index, (found, expected) in enumerate(zip(header, COLUMNS, strict=True), start=1):
        if found != expected:
            raise FmdistError(f"{path}: line 1 (header), column {index}: expected '{expected}', found '{found}'")


def _first_malformed_row(path: Path, rows: list[bytes]) -> tuple[int, str] | None:
    """(index in `rows`, message) of the first blank row or row with the wrong number of columns."""
    for index, line in enumerate(rows):
        number = index + 2  # the header is line 1
        if not line.strip():
            return index, f"{path}: line {number} is blank; expected {len(COLUMNS)} comma-separated values"
        columns = line.count(b",") + 1
        if columns != len(COLUMNS):
            return index, f"{path}: line {number} has {columns} columns, expected {len(COLUMNS)}"
    return None


def _check_cells(path: Path, frame: pd.DataFrame, values: np.ndarray, num_classes: int) -> None:
    with np.errstate(invalid="ignore"):
        low = np.zeros(values.shape[1])
        high = np.full(values.shape[1], 255.0)
        high[0] = num_classes - 1
        bad = np.isnan(values) | (values != np.floor(values)) | (values < low) | (values > high)
    bad_rows = bad.any(axis=1)
    if not bad_rows.any():
        return
    row = int(np.argmax(bad_rows))
    col = int(np.argmax(bad[row]))
    where = f"{path}: line {row + 2}, column '{COLUMNS[col]}'"
    original, value = frame.iat[row, col], values[row, col]
    if np.isnan(value):
        if pd.isna(original):
            raise FmdistError(f"{where}: empty or NaN cell, expected an integer")
        raise FmdistError(f"{where}: {str(original)!r} is not a number")
    if value != np.floor(value):
        raise FmdistError(f"{where}: {original} is not an integer")
    if col == 0:
        raise FmdistError(f"{where}: label {value:g} is outside 0..{num_classes - 1}")
    raise FmdistError(f"{where}: pixel value {value:g} is outside 0..255")
