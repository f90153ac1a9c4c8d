"""Small fixtures for the data tests: tiny IDX datasets and image folders written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from look.data.idx import write_idx


def write_tiny_idx_dataset(
    folder: Path, *, compress: bool, num_train: int = 30, num_test: int = 10, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the four (Fashion-)MNIST IDX files with random 28×28 images; returns what was written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if compress else ""
    written = {}
    for split, prefix, count in (("train", "train", num_train), ("test", "t10k", num_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        written[split] = (images, labels)
    return written


def write_png(path: Path, colour: tuple[int, int, int], size: int = 20) -> Path:
    """A solid-colour RGB PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def write_truncated_png(path: Path, size: int = 40) -> Path:
    """A PNG cut in half: it opens, but decoding fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """root/train/{cat,dog}/ with 3 images each and root/val/{cat,dog}/ with 1 each."""
    root = tmp_path / "images"
    colours = {"cat": (200, 30, 30), "dog": (30, 30, 200)}
    for name, colour in colours.items():
        for i in range(3):
            write_png(root / "train" / name / f"{i}.png", colour)
        write_png(root / "val" / name / "0.png", colour)
    return root


@pytest.fixture
def make_idx_dataset():
    """The :func:`write_tiny_idx_dataset` helper (fixtures avoid importing conftest by name)."""
    return write_tiny_idx_dataset


@pytest.fixture
def make_png():
    return write_png


@pytest.fixture
def make_truncated_png():
    return write_truncated_png
