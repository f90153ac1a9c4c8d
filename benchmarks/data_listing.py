"""How the data steps before training grow with the number of classes and images (CPU, no GPU).

    python benchmarks/data_listing.py --classes 1000 4000 --paths 100000 1000000 \
        --output benchmarks/results/cpu_data_listing.json

For each class count it writes an image folder of that many classes (two empty ``.png`` files
each: listing never opens them) and times ``read_image_folder`` on it, once with plain class
folders and once with every class folder a symbolic link to a folder elsewhere (a "view" of a
dataset; the case that checks each link against the other classes). For each path count it
times the training-data identity's path part (:func:`look.data.datasets.paths_below` and the
sha256 over it), :func:`look.data.sources.class_members` for 1,000 and 10,000 classes, and
what rank 0's listing costs to send under ``torchrun`` (``each_folder_listed_once``): the
payload pickled as ``broadcast_object_list`` pickles it, its size, and the other side's
unpickling and source construction (no process group: the transfer itself is not timed).
Prints one line per measurement and writes them all as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

from look.data.datasets import paths_below
from look.data.sources import (
    ImageFolderSource,
    class_members,
    listing_payload,
    read_image_folder,
    source_from_listing,
)


def _write_folder(root: Path, classes: int, *, linked: bool) -> None:
    train = root / "train"
    train.mkdir(parents=True)
    storage = root / "storage"
    for index in range(classes):
        name = f"class_{index:06d}"
        folder = (storage if linked else train) / name
        folder.mkdir(parents=True)
        for image in range(2):
            (folder / f"{image}.png").touch()
        if linked:
            (train / name).symlink_to(folder, target_is_directory=True)


def time_listing(classes: int, *, linked: bool) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        _write_folder(root, classes, linked=linked)
        started = time.perf_counter()
        source = read_image_folder(root, "train", "train", corrupt_images="fail")
        seconds = time.perf_counter() - started
        assert len(source.paths) == 2 * classes
    return seconds


def _paths(count: int) -> list[str]:
    return [f"/data/images/train/class_{i % 21000:05d}/{i:08d}.JPEG" for i in range(count)]


def time_identity(count: int) -> float:
    paths = _paths(count)
    started = time.perf_counter()
    digest = hashlib.sha256()
    for relative in paths_below(paths):
        digest.update(relative + b"\n")
    return time.perf_counter() - started


def time_listing_broadcast(count: int) -> dict[str, float]:
    """Seconds to pickle rank 0's payload and to rebuild the source from it, and its MB."""
    classes = [f"class_{c:05d}" for c in range(21000)]
    samples = [(path, i % 21000) for i, path in enumerate(_paths(count))]
    source = ImageFolderSource(samples, classes, corrupt_images="fail", description="benchmark")
    started = time.perf_counter()
    sent = pickle.dumps(("listing", listing_payload(source)))
    pickled = time.perf_counter() - started
    started = time.perf_counter()
    _, payload = pickle.loads(sent)
    received = source_from_listing(payload, corrupt_images="fail")
    rebuilt = time.perf_counter() - started
    assert received.paths == source.paths
    return {"send_s": pickled, "receive_s": rebuilt, "mb": len(sent) / 1e6}


def time_members(count: int, classes: int) -> float:
    labels = np.random.default_rng(0).integers(0, classes, size=count)
    started = time.perf_counter()
    class_members(labels, classes)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--paths", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for classes in args.classes:
        for linked in (False, True):
            seconds = time_listing(classes, linked=linked)
            kind = "linked" if linked else "plain"
            print(f"listing {classes} {kind} class folders: {seconds:.2f} s")
            rows.append({"what": "listing", "classes": classes, "folders": kind, "s": seconds})
    for count in args.paths:
        seconds = time_identity(count)
        print(f"identity over {count} paths: {seconds:.2f} s")
        rows.append({"what": "identity_paths", "paths": count, "s": seconds})
        sent = time_listing_broadcast(count)
        print(
            f"listing of {count} paths sent by rank 0: {sent['mb']:.1f} MB pickled in "
            f"{sent['send_s']:.2f} s, rebuilt in {sent['receive_s']:.2f} s"
        )
        rows.append({"what": "listing_broadcast", "paths": count, **sent})
        for classes in (1000, 10000):
            seconds = time_members(count, classes)
            print(f"class members of {count} labels in {classes} classes: {seconds:.3f} s")
            rows.append(
                {"what": "class_members", "labels": count, "classes": classes, "s": seconds}
            )
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        machine = {"cpu_count": os.cpu_count()}
        args.output.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
