"""Decode every image of a source once, before a long run, and list the files that fail.

Training meets an unreadable file only when the sampler reaches it, possibly hours into a run
(with ``corrupt_images='fail'`` the run stops there). :func:`find_unreadable_images` finds all of
them up front, in parallel DataLoader workers, so a cluster job can be checked before it is queued
(``look pretrain --dry-run --check-images``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from look.data.sources import (
    DECODE_ERRORS,
    ImageSource,
    PackedPaths,
    UnsupportedImageError,
    decode_image_file,
)

# Files per DataLoader item: large enough that inter-process traffic is negligible, small enough
# that the progress bar moves.
_FILES_PER_ITEM = 64


@dataclass(frozen=True)
class UnreadableImage:
    """A file that failed to decode, with the decoder's error and its index in the source."""

    path: str
    error: str
    index: int


class _DecodeProbe(Dataset):
    """Item ``i`` decodes files ``[i·F, (i+1)·F)`` of ``paths`` (the source's files ``first``,
    ``first + step``, …) and returns ``(count, failures)``."""

    def __init__(self, paths: Sequence[str], first: int = 0, step: int = 1) -> None:
        self.paths = PackedPaths(paths)  # (read by forked workers: no object per path)
        self.first, self.step = first, step

    def __len__(self) -> int:
        return -(-len(self.paths) // _FILES_PER_ITEM)

    def __getitem__(self, item: int) -> tuple[int, list[UnreadableImage]]:
        start = item * _FILES_PER_ITEM
        chunk = self.paths[start : start + _FILES_PER_ITEM]
        failures = []
        for position, path in enumerate(chunk, start=start):
            try:
                decode_image_file(path)
            except UnsupportedImageError:
                raise  # the same for every such file: one error, not a list of them
            except DECODE_ERRORS as error:
                index = self.first + position * self.step
                failures.append(UnreadableImage(path, f"{type(error).__name__}: {error}", index))
        return len(chunk), failures


def _first(items: list[tuple[int, list[UnreadableImage]]]) -> tuple[int, list[UnreadableImage]]:
    return items[0]


def find_unreadable_images(
    source: ImageSource,
    *,
    num_workers: int = 0,
    progress: bool = False,
    share: tuple[int, int] = (0, 1),
) -> tuple[int, list[UnreadableImage]]:
    """Decode every file of ``source``; returns (files decoded, the unreadable ones in index order).

    ``share=(r, W)`` decodes only files ``r, r + W, r + 2W, …``: W processes split the work.
    Sources held in memory (IDX, CIFAR, digits, synthetic) have no files: ``(0, [])``.
    """
    rank, world = share
    if not 0 <= rank < world:
        raise ValueError(f"share={share}: the rank must be in [0, {world})")
    paths = source.file_paths
    if not paths:
        return 0, []
    paths = paths[rank::world]
    loader = DataLoader(
        _DecodeProbe(paths, rank, world),
        batch_size=1,
        collate_fn=_first,
        num_workers=num_workers,
    )
    checked = 0
    unreadable: list[UnreadableImage] = []
    # (disable=None: no bar where stderr is no terminal, a batch log it would fill with one line)
    shown = None if progress else True
    with tqdm(total=len(paths), desc="check images", unit="img", disable=shown) as bar:
        for count, failures in loader:
            checked += count
            unreadable.extend(failures)
            bar.update(count)
    return checked, unreadable
