"""Checking every image of a dataset before a run: :func:`look.data.find_unreadable_images`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from look.data import DataSpec, find_unreadable_images, load_source
from look.data.sources import SubsetSource


def _bad_folder(image_folder: Path, make_truncated_png) -> tuple[Path, Path]:
    truncated = make_truncated_png(image_folder / "train" / "cat" / "1.png")
    garbage = image_folder / "train" / "dog" / "2.png"
    garbage.write_bytes(b"this is not a png")
    return truncated, garbage


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_unreadable_file_is_listed_with_its_error(
    image_folder: Path, make_truncated_png, num_workers: int
) -> None:
    truncated, garbage = _bad_folder(image_folder, make_truncated_png)
    # The policy of the source does not matter: the check decodes every file itself.
    source = load_source(DataSpec("imagefolder", root=str(image_folder)), "train")
    checked, unreadable = find_unreadable_images(source, num_workers=num_workers)
    assert checked == 6
    assert [image.path for image in unreadable] == [str(truncated), str(garbage)]
    assert "UnidentifiedImageError" in unreadable[1].error
    assert source.num_skipped_files == 0  # the check leaves the source's own record alone


def test_shares_split_the_files_without_overlap(image_folder: Path, make_truncated_png) -> None:
    truncated, garbage = _bad_folder(image_folder, make_truncated_png)
    source = load_source(DataSpec("imagefolder", root=str(image_folder)), "train")
    results = [find_unreadable_images(source, share=(rank, 4)) for rank in range(4)]
    assert [checked for checked, _ in results] == [2, 2, 1, 1]
    found = sorted(image.path for _, images in results for image in images)
    assert found == sorted([str(truncated), str(garbage)])
    # Each names its index in the whole source, whichever share found it.
    for _, images in results:
        assert all(source.path(image.index) == image.path for image in images)
    with pytest.raises(ValueError, match="rank must be in"):
        find_unreadable_images(source, share=(4, 4))


def test_a_subset_checks_only_its_own_files(image_folder: Path, make_truncated_png) -> None:
    truncated, _ = _bad_folder(image_folder, make_truncated_png)
    source = load_source(DataSpec("imagefolder", root=str(image_folder)), "train")
    subset = SubsetSource(source, torch.tensor([0, 1, 3]))  # cat/0, cat/1 (bad), dog/0
    checked, unreadable = find_unreadable_images(subset)
    assert checked == 3 and [image.path for image in unreadable] == [str(truncated)]
    assert unreadable[0].index == 1  # (in the subset's own order)


def test_images_held_in_memory_have_nothing_to_check() -> None:
    source = load_source(DataSpec("synthetic", synthetic_num_samples=8), "train")
    assert source.file_paths is None
    assert find_unreadable_images(source) == (0, [])
    source.record_unreadable([])  # nothing to note
    with pytest.raises(ValueError, match="has no files"):
        source.record_unreadable(["x.png"])
