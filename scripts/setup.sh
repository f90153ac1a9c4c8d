#!/usr/bin/env bash
# Idempotent set-up: a .venv in the repository root with look installed (editable, with dev extras)
# and Fashion-MNIST from Debian's package where apt exists. Fast when everything is already there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="$venv/bin/python"

sudo=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi

if [ ! -x "$py" ]; then
  echo "setup: creating $venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian and Ubuntu ship venv's pip bootstrap apart (python3-venv): install it where apt is.
    rm -rf "$venv"
    if command -v apt-get >/dev/null 2>&1; then
      version=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
      echo "setup: installing python$version-venv (Debian/Ubuntu ship venv apart)"
      $sudo apt-get install -y -q "python$version-venv" >/dev/null 2>&1 \
        || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "python$version-venv" >/dev/null; } \
        || echo "setup: could not install python$version-venv"
    fi
    python3 -m venv "$venv"  # (its own error, if it still fails)
  fi
fi

stamp="$venv/.look-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$py" -m pip install -q --upgrade pip
  if ! "$py" -c "import torch, torchvision" 2>/dev/null; then
    # These releases lie on the project's build machines; elsewhere take what pip resolves.
    "$py" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" \
      || "$py" -m pip install -q torch torchvision
  fi
  "$py" -m pip install -q -e ".[dev]"
  rm -f "$venv"/.look-installed-*
  touch "$stamp"
fi

fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || echo "setup: could not install dataset-fashion-mnist; tests that need it will be skipped"
fi
