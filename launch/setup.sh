#!/usr/bin/env bash
# Create (or update) .venv in the repository: the pinned PyTorch build, then fmdist itself,
# editable, with its test tools. Safe to rerun; a second run installs nothing new.
#   PYTHON=python3.11 bash launch/setup.sh      # choose the interpreter
#   FMDIST_TORCH="torch==2.14.1 torchvision==0.29.1" bash launch/setup.sh   # choose the PyTorch pins
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
FMDIST_TORCH=${FMDIST_TORCH:-"torch==2.14.1 torchvision==0.29.1"}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC2086  # the pins are a list of requirement specifiers
.venv/bin/python -m pip install --quiet --disable-pip-version-check $FMDIST_TORCH
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
.venv/bin/python -c 'import torch, torchvision, fmdist; print(f"fmdist {fmdist.__version__}: torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA available: {torch.cuda.is_available()}")'
