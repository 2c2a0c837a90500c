"""Fixtures shared by the tests; the helpers they use live in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import load_real_sample, write_kaggle_csv


@pytest.fixture(scope="session")
def real_sample():
    return load_real_sample()


@pytest.fixture(scope="session")
def real_csv_split(tmp_path_factory, real_sample) -> tuple[Path, Path]:
    """The real sample split as the tests use it: the first 800 rows train, the rest are held out."""
    images, labels = real_sample
    folder = tmp_path_factory.mktemp("real_csv")
    train_csv = write_kaggle_csv(folder / "train.csv", images[:800], labels[:800])
    test_csv = write_kaggle_csv(folder / "test.csv", images[800:], labels[800:])
    return train_csv, test_csv


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps process-wide state; reset it so each in-process test sets its own precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
