"""Running the ``case_*`` functions of a module in Triton's CPU interpreter (a child process with
``TRITON_INTERPRET=1``: Triton reads it when the kernels are defined, so it cannot be set
in-process)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def run_cases(namespace: dict[str, Any]) -> None:
    """Run every ``case_*`` callable of ``namespace`` in name order, printing ``name: ok``."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    cases: list[tuple[str, Callable[[], None]]] = sorted(
        (name, case) for name, case in namespace.items() if name.startswith("case_")
    )
    for name, case in cases:
        case()
        print(f"{name}: ok", flush=True)
