"""Running the ``case_*`` functions of a module in Triton's CPU interpreter (a child process with
``TRITON_INTERPRET=1``: Triton reads it when the kernels are defined, so it cannot be set
in-process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


_Case = Callable[[], None]


def slow_case(case: _Case) -> _Case:
    """Mark a case as slow: run by the suite's ``slow`` tests only (``--speed slow``), so that
    the default suite keeps to its time budget."""
    case.slow = True  # type: ignore[attr-defined]
    return case


def run_cases(namespace: dict[str, Any]) -> None:
    """Run the ``case_*`` callables of ``namespace`` in name order, printing ``name: ok (T s)``;
    with ``--shard I/N`` on the command line only every N-th of them, from the I-th (0-based);
    with ``--speed fast`` or ``--speed slow`` only the cases not marked, or marked, by
    :func:`slow_case` (default: all)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    speed = sys.argv[sys.argv.index("--speed") + 1] if "--speed" in sys.argv else "all"
    assert speed in ("fast", "slow", "all"), speed
    cases: list[tuple[str, _Case]] = sorted(
        (name, case) for name, case in namespace.items()
        if name.startswith("case_")
        and (speed == "all" or getattr(case, "slow", False) == (speed == "slow"))
    )  # fmt: skip
    if "--shard" in sys.argv:
        index, count = map(int, sys.argv[sys.argv.index("--shard") + 1].split("/"))
        cases = cases[index::count]
    for name, case in cases:
        started = time.perf_counter()
        case()
        print(f"{name}: ok ({time.perf_counter() - started:.1f} s)", flush=True)


def run_case_module(
    module: str, *, shards: int = 2, timeout: float = 600, speed: str = "all"
) -> str:
    """Run ``python -m module`` under the interpreter in ``shards`` child processes at once (the
    interpreter runs on one core; the suite waits for this test alone), returning their output;
    ``speed`` as :func:`run_cases`'s ``--speed``. Fails naming the shard's output if any exits
    with an error."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    children = []
    for index in range(shards):
        children.append(subprocess.Popen(
            [sys.executable, "-m", module, "--shard", f"{index}/{shards}", "--speed", speed],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    outputs = []
    for child in children:
        output, _ = child.communicate(timeout=timeout)
        assert child.returncode == 0, output
        outputs.append(output)
    return "".join(outputs)
