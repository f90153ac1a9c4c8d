#!/usr/bin/env bash
# Set up (idempotent) and run the demo. Extra arguments go to `look demo` (e.g. --quick).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/look demo "$@"
