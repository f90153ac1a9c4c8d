"""How much memory each DataLoader worker copies from its parent over an epoch of an image folder.

    python benchmarks/loader_memory.py --paths 1000000 --workers 2 \
        --output benchmarks/results/cpu_loader_memory.json

A forked worker shares its parent's memory until it writes to a page. Reading a Python object
writes its reference count, so a worker that reads every path of a list of path strings ends up
with a private copy of every page holding them: at ImageNet-21k's 14M images, ~1.3 GB per
worker (~94 B per path), times the workers of every rank of a node. This builds an
:class:`~look.data.sources.ImageFolderSource` of ``--paths`` made-up paths (no file is read:
``decode_image_file`` is replaced by one that returns a 1-pixel image), runs an epoch over it
in random order (as training draws it) with ``--workers`` forked workers, and reports each worker's private dirty memory
(``/proc/self/smaps_rollup``, Linux only) when it starts and after its last batch: the growth is
what the epoch copied (with the worker's own batches and indices, a few MB). Prints one line per worker and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from look.data import sources
from look.data.sources import ImageFolderSource

_PIXEL = torch.zeros(3, 1, 1, dtype=torch.uint8)


def private_dirty_mb() -> float:
    """This process's private dirty memory (pages it wrote itself or copied on write), in MB."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Private_Dirty in /proc/self/smaps_rollup")


def _one_pixel(path: str) -> torch.Tensor:
    if not isinstance(path, str):
        raise TypeError(f"a path must be a str, got {type(path).__name__}")
    return _PIXEL


class _Loads(Dataset):
    def __init__(self, source: ImageFolderSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> int:
        self.source.load(index)
        return index


_at_start: list[float] = []


def _note_start(worker: int) -> None:
    _at_start.append(private_dirty_mb())


def _worker_memory(indices: list[int]) -> tuple[int, float, float, int]:
    """(worker id, its private dirty MB when it started and after this batch, batch size)."""
    info = get_worker_info()
    worker = info.id if info is not None else -1
    return worker, _at_start[0], private_dirty_mb(), len(indices)


def measure(paths: int, workers: int, batch_size: int) -> dict[str, object]:
    samples = [(f"/data/images/train/class_{i % 21000:05d}/{i:08d}.JPEG", i % 21000)
               for i in range(paths)]  # fmt: skip
    classes = [f"class_{c:05d}" for c in range(21000)]
    source = ImageFolderSource(samples, classes, corrupt_images="fail", description="benchmark")
    del samples
    sources.decode_image_file = _one_pixel  # (inherited by the forked workers)
    loader = DataLoader(
        _Loads(source), batch_size=batch_size, shuffle=True, num_workers=workers,
        collate_fn=_worker_memory, worker_init_fn=_note_start, multiprocessing_context="fork",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    loaded: dict[int, int] = {}
    started = time.perf_counter()
    for worker, at_start, memory, count in loader:
        first[worker] = at_start
        last[worker] = memory
        loaded[worker] = loaded.get(worker, 0) + count
    seconds = time.perf_counter() - started
    rows = [
        {"worker": w, "images": loaded[w], "at_start_mb": first[w], "at_end_mb": last[w],
         "copied_mb": last[w] - first[w]}
        for w in sorted(first)
    ]  # fmt: skip
    return {"paths": paths, "workers": workers, "batch_size": batch_size, "seconds": seconds,
            "per_worker": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=20_000)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    report = measure(args.paths, args.workers, args.batch_size)
    for row in report["per_worker"]:  # type: ignore[attr-defined]
        print(
            f"worker {row['worker']}: {row['images']} images, private dirty "
            f"{row['at_start_mb']:.1f} MB when it started, {row['at_end_mb']:.1f} MB after its "
            f"last batch: {row['copied_mb']:.1f} MB copied over the epoch"
        )
    print(f"epoch of {args.paths} paths: {report['seconds']:.1f} s")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        report["machine"] = {"cpu_count": os.cpu_count()}
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
