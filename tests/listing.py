"""Counting the walks of image folders: which split folders ``look.data.sources`` lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from look.data import sources


def count_listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on (for the test), the name of each split folder walked is appended to the
    list returned."""
    listed: list[str] = []
    list_images = sources._list_images

    def counted(split_folder: Path, class_to_index: dict[str, int]) -> list[tuple[str, int]]:
        listed.append(Path(split_folder).name)
        return list_images(split_folder, class_to_index)

    monkeypatch.setattr(sources, "_list_images", counted)
    return listed
