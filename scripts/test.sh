#!/usr/bin/env bash
# Set up (idempotent) and run the lint and the default test suite. Extra arguments go to pytest,
# e.g. `scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest "$@"
