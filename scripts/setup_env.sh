#!/usr/bin/env bash
# Creates .venv in the repository root (once) and installs repro with its test extra into it.
# Used by the README's two commands and by CI. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# A range that admits 2.14.1 lets pip take the wheels a machine already has; any 2.4+ works.
.venv/bin/python -m pip install -q "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
# Fashion-MNIST, the default dataset, from Debian's package where we may install it (best effort:
# the training script also finds a torchvision-style copy or downloads one where a network exists).
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) ||
   echo "setup_env: could not install dataset-fashion-mnist; see README for other ways to get the data"
fi
