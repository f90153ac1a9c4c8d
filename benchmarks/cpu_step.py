"""CPU cost of one training step of the Fashion-MNIST LOOK recipe: CE vs LOOK, and the parts.

Example::

    python benchmarks/cpu_step.py --output results/cpu_step.json --steps 20

Defaults follow ``configs/look_cnn-small_fmnist-coarse.yaml``: ``look_cnn_small``, batch 256, a
60,000-row fp32 bank, 4 classes, k = 3,750 (``k_fraction: 0.25`` of 15,000 images per class),
τ = 0.05. Every row runs the package's real code: the methods are built with
``look.methods.build_method`` and stepped like the trainer does (forward, backward, SGD step,
``after_optimizer_step``) on synthetic 28×28 images. The bank holds ``--rows`` random unit rows
before timing, so the search scans the whole bank from the first step. LOOK is timed with the
default search (``search_backend: auto``, which for this small bank and large k searches the
loss's own B × N product) and with ``search_backend: torch`` (the chunked scan, then the loss's
product again), and its loss, its search, the B × N product and the top-k selection alone.
Each figure is the median of ``--steps`` timed repetitions after ``--warmup-steps`` untimed ones,
the rows taking turns so that a change of load slows all of them alike; the load average is
recorded because a shared machine slows every row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _machine import cpu_name

from look.losses import look_loss_terms
from look.methods import Batch, Method, MethodContext, build_method
from look.models import create_backbone
from look.search import knn_search

NUM_CLASSES = 4
IMAGE_SIZE = 28
FILL_CHUNK_ROWS = 8192


def _interleaved_medians(
    runs: dict[str, Callable[[], None]], *, steps: int, warmup_steps: int
) -> dict[str, float]:
    """Median seconds of each run. The runs take turns (one repetition of each per round), so a
    change in the machine's load during the benchmark slows all of them alike."""
    for _ in range(warmup_steps):
        for run in runs.values():
            run()
    durations: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            durations[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in durations.items()}


def _random_batch(batch_size: int, rows: int, generator: torch.Generator) -> Batch:
    """Synthetic images, labels, and distinct dataset indices (so leave-one-out applies)."""
    return Batch(
        views=[torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)],
        labels=torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator),
        indices=torch.randperm(rows, generator=generator)[:batch_size],
    )


def _build(method_cfg: dict[str, Any], backbone_name: str, rows: int) -> Method:
    torch.manual_seed(0)
    backbone, feature_dim = create_backbone(backbone_name, small_stem=True)
    ctx = MethodContext(num_classes=NUM_CLASSES, num_samples=rows)
    return build_method(method_cfg, backbone, feature_dim, ctx).train()


def _fill_bank(method: Method, rows: int, generator: torch.Generator) -> None:
    """Every bank row written with a random unit vector and a random label (mask is then moot)."""
    memory = method.memory
    for start in range(0, rows, FILL_CHUNK_ROWS):
        ids = torch.arange(start, min(start + FILL_CHUNK_ROWS, rows))
        features = torch.randn(len(ids), memory.dim, generator=generator)
        labels = torch.randint(0, NUM_CLASSES, (len(ids),), generator=generator)
        memory.fill_(ids, features, labels)


def _training_step(method: Method, batch_size: int, rows: int) -> Callable[[], None]:
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(1)

    def step() -> None:
        batch = _random_batch(batch_size, rows, generator)
        output = method(batch)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        method.after_optimizer_step(0.5)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--steps", type=int, default=20, help="timed repetitions per row")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--backbone", default="look_cnn_small")
    parser.add_argument("--rows", type=int, default=60000, help="LOOK memory bank rows")
    parser.add_argument("--k", type=int, default=3750)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's own choice")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "rows", "k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.k >= args.rows:
        parser.error(f"--k must be < --rows (leave-one-out), got k={args.k}, rows={args.rows}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load_average_at_start = os.getloadavg()
    ce = _build({"name": "ce"}, args.backbone, args.rows)
    look_cfg = {
        "name": "look", "k": args.k, "temperature": args.temperature, "memory": "bank",
        "memory_dtype": "float32",
    }  # fmt: skip
    generator = torch.Generator().manual_seed(2)
    look = {}
    for backend in ("auto", "torch"):
        look[backend] = _build({**look_cfg, "search_backend": backend}, args.backbone, args.rows)
        _fill_bank(look[backend], args.rows, torch.Generator().manual_seed(2))

    memory = look["auto"].memory
    query = F.normalize(torch.randn(args.batch_size, memory.dim, generator=generator), dim=1)
    query_labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=generator)
    query_ids = torch.randperm(args.rows, generator=generator)[: args.batch_size]

    similarities = query @ memory.features.T

    def product() -> None:  # the B × N product the loss's search runs on
        torch.matmul(query, memory.features.T)

    def selection() -> None:  # that search's selection: an unsorted top-k per query
        similarities.topk(args.k, dim=1, sorted=False)

    def search() -> None:  # as the LOOK method calls it for a bank
        knn_search(query, memory.features, args.k, query_ids=query_ids, memory_valid=memory.valid)

    def loss_only(backend: str) -> Callable[[], None]:
        def run() -> None:
            leaf = query.clone().requires_grad_(True)
            terms = look_loss_terms(
                leaf, query_labels, memory.features, memory.labels, k=args.k,
                temperature=args.temperature, query_indices=query_ids,
                memory_valid=memory.valid, search_backend=backend,  # type: ignore[arg-type]
            )  # fmt: skip
            terms.loss.sum().backward()

        return run

    seconds = _interleaved_medians(
        {
            "ce_step": _training_step(ce, args.batch_size, args.rows),
            "look_step": _training_step(look["auto"], args.batch_size, args.rows),
            "look_step_scan": _training_step(look["torch"], args.batch_size, args.rows),
            "look_loss_forward_backward": loss_only("auto"),
            "look_loss_forward_backward_scan": loss_only("torch"),
            "knn_search": search,
            "product": product,
            "selection": selection,
        },
        steps=args.steps,
        warmup_steps=args.warmup_steps,
    )
    ce_seconds = seconds["ce_step"]
    rows = [
        ("CE training step", seconds["ce_step"]),
        (f"LOOK training step (k={args.k}, {args.rows} rows)", seconds["look_step"]),
        ("LOOK training step, search_backend=torch", seconds["look_step_scan"]),
        ("LOOK loss alone (search + fwd/bwd)", seconds["look_loss_forward_backward"]),
        ("LOOK loss alone, search_backend=torch", seconds["look_loss_forward_backward_scan"]),
        (f"knn_search alone ({args.batch_size} queries)", seconds["knn_search"]),
        ("B x N product alone", seconds["product"]),
        (f"unsorted top-{args.k} of the B x N similarities alone", seconds["selection"]),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"{'':{width}}  {'ms (median)':>12}  {'x CE step':>9}")
    for label, row_seconds in rows:
        print(f"{label:{width}}  {row_seconds * 1e3:12.1f}  {row_seconds / ce_seconds:9.2f}")

    report = {
        "benchmark": "CPU training step: CE vs LOOK (Fashion-MNIST recipe), and its parts",
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "image_size": IMAGE_SIZE,
        "bank_rows": args.rows,
        "bank_dim": memory.dim,
        "bank_dtype": str(memory.storage_dtype).removeprefix("torch."),
        "k": args.k,
        "temperature": args.temperature,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "seconds_median": seconds,
        "look_step_over_ce_step": seconds["look_step"] / ce_seconds,
        "look_step_scan_over_ce_step": seconds["look_step_scan"] / ce_seconds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "load_average_at_start": load_average_at_start,
        "load_average_at_end": os.getloadavg(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
