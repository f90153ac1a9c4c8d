from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from look.data.idx import read_idx, write_idx


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_uint8_images_round_trip_plain_and_gzip(tmp_path: Path, name: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 27), dtype=np.uint8)
    path = write_idx(tmp_path / name, images)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    loaded = read_idx(path)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, images)


def test_header_is_parsed_by_hand_from_the_format(tmp_path: Path) -> None:
    # Written byte by byte from the format description, not by write_idx.
    header = bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big")
    (tmp_path / "labels").write_bytes(header + bytes([7, 0, 9]))
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), [7, 0, 9])


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64, np.int8])
def test_multi_byte_types_are_big_endian_on_disk(tmp_path: Path, dtype: type) -> None:
    values = np.arange(-3, 9, dtype=dtype).reshape(3, 4)
    path = write_idx(tmp_path / "values", values)
    itemsize = np.dtype(dtype).itemsize
    first_value_bytes = path.read_bytes()[4 + 2 * 4 : 4 + 2 * 4 + itemsize]
    assert first_value_bytes == np.array([-3], dtype=np.dtype(dtype).newbyteorder(">")).tobytes()
    loaded = read_idx(path)
    assert loaded.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(loaded, values)


def test_gzip_is_detected_from_content_not_name(tmp_path: Path) -> None:
    labels = np.array([1, 2, 3], dtype=np.uint8)
    path = write_idx(tmp_path / "labels-without-gz-suffix", labels, compress=True)
    np.testing.assert_array_equal(read_idx(path), labels)


def test_truncated_file_names_the_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "images", np.zeros((4, 6, 6), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"images.*truncated"):
        read_idx(path)


def test_non_idx_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)


def test_damaged_gzip_is_rejected(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "images.gz", np.zeros((50, 8, 8), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="damaged gzip"):
        read_idx(path)
