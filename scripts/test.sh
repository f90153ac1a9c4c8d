#!/usr/bin/env bash
# Set up (idempotent) and run the lint and the default test suite. Extra arguments go to pytest,
# e.g. `scripts/test.sh -m slow` for the slow tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
# The suite writes checkpoints under the temp dir; say so up front rather than failing mid-run
# with "No space left on device".
tmp_dir="${TMPDIR:-/tmp}"
free_mb="$(df -Pm "$tmp_dir" | awk 'NR==2 {print $4}')"
if [ "${free_mb:-0}" -lt 2048 ]; then
  echo "test.sh: warning: only ${free_mb} MB free in $tmp_dir; the tests write checkpoints there" >&2
fi
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest "$@"
