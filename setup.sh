#!/usr/bin/env bash
# Set up fcclass on this machine: Fashion-MNIST from Debian (where apt exists), a .venv with the package.
set -euo pipefail
cd "$(dirname "$0")"

# Offline machines get Fashion-MNIST from Debian's package (files in /usr/share/datasets/fashion-mnist/).
if command -v apt-get >/dev/null 2>&1 && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
    echo "Installed Debian's dataset-fashion-mnist."
  else
    echo "warning: could not install dataset-fashion-mnist; torchvision will download Fashion-MNIST instead." >&2
  fi
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
echo "Ready: .venv/bin/fcclass --help"
