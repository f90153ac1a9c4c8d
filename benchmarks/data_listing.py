"""How the data steps before training grow with the number of classes and images (CPU, no GPU).

    python benchmarks/data_listing.py --classes 1000 4000 --paths 100000 1000000 \
        --output benchmarks/results/cpu_data_listing.json

For each class count it writes an image folder of that many classes (two empty ``.png`` files
each: listing never opens them) and times ``read_image_folder`` on it, once with plain class
folders and once with every class folder a symbolic link to a folder elsewhere (a "view" of a
dataset; the case that checks each link against the other classes). For each path count it
times the training-data identity's path part (:func:`look.data.datasets.paths_below` and the
sha256 over it) and :func:`look.data.sources.class_members` for 1,000 and 10,000 classes.
Prints one line per measurement and writes them all as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from look.data.datasets import paths_below
from look.data.sources import class_members, read_image_folder


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


def time_identity(count: int) -> float:
    paths = [f"/data/images/train/class_{i % 21000:05d}/{i:08d}.JPEG" for i in range(count)]
    started = time.perf_counter()
    digest = hashlib.sha256()
    for relative in paths_below(paths):
        digest.update(relative + b"\n")
    return time.perf_counter() - started


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
