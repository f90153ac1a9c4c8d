"""Memory and time of the NCA loss (k = every row) with and without the recomputing backward.

    python benchmarks/nca_memory.py --output nca_memory.json [--rows 300000 --batch-size 256]

Each mode runs in a fresh process (peak resident memory is per process): one forward and backward
of ``look_loss_terms(k=None)`` over an fp32 bank of ``--rows`` random rows. ``kept`` lets autograd
keep every chunk's logits (what NCA does below ``B × N = 2**26``); ``recomputed`` is what it does
above: only the queries and a copy of the rows are kept, and the backward recomputes the chunks.
Reported: the growth of peak resident memory over the process's state before the loss, and the
wall time of forward + backward.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from look.losses import look_loss_terms


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _measure(mode: str, rows: int, batch: int, dim: int) -> dict[str, float]:
    module = importlib.import_module("look.losses.look_loss")
    module._NCA_RECOMPUTE_ABOVE = 0 if mode == "recomputed" else rows * batch  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(rows, dim, generator=generator), dim=1)
    labels = torch.randint(0, 100, (rows,), generator=generator)
    query = F.normalize(torch.randn(batch, dim, generator=generator), dim=1).requires_grad_(True)
    query_labels = torch.randint(0, 100, (batch,), generator=generator)
    before = _peak_rss_mb()
    start = time.perf_counter()
    terms = look_loss_terms(
        query, query_labels, memory, labels, k=None, temperature=0.1,
        query_indices=torch.arange(batch),
    )  # fmt: skip
    terms.loss.sum().backward()
    seconds = time.perf_counter() - start
    return {"peak_growth_mb": _peak_rss_mb() - before, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--mode", choices=["kept", "recomputed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # the child process: one measurement, printed as JSON
        print(json.dumps(_measure(args.mode, args.rows, args.batch_size, args.dim)))
        return
    report: dict[str, object] = {
        "rows": args.rows, "batch_size": args.batch_size, "dim": args.dim,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }  # fmt: skip
    for mode in ("kept", "recomputed"):
        child = subprocess.run(
            [
                sys.executable, __file__, "--output", args.output, "--rows", str(args.rows),
                "--batch-size", str(args.batch_size), "--dim", str(args.dim), "--mode", mode,
            ],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        report[mode] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{mode:>10}: {report[mode]}")
    Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
