"""Reading IDX files (the (Fashion-)MNIST format), gzip-compressed or not.

Format: two zero bytes, one type byte, one byte with the number of dimensions, then one big-endian
uint32 per dimension, then the values in big-endian C order.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file into a numpy array (native byte order); gzip is detected from the content.

    Raises ``ValueError`` naming the file when the header is not IDX or the data is truncated.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(
                f"{path} is a damaged gzip file ({error}); delete it and fetch it again"
            ) from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad header {raw[:4]!r})")
    dtype = _IDX_TYPES[raw[2]]
    num_dims = raw[3]
    header_size = 4 + 4 * num_dims
    if len(raw) < header_size:
        raise ValueError(f"{path} is truncated inside its IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=num_dims, offset=4))
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload_bytes = len(raw) - header_size
    if payload_bytes != expected_bytes:
        raise ValueError(
            f"{path} holds {payload_bytes} data bytes but its IDX header (shape {shape}) needs "
            f"{expected_bytes}; the file is truncated or damaged, fetch it again"
        )
    values = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzip when ``compress`` or, by default, when the name ends in .gz).

    Used to build small fixtures; the inverse of :func:`read_idx`.
    """
    path = Path(path)
    codes = {dtype.newbyteorder("="): code for code, dtype in _IDX_TYPES.items()}
    native = np.dtype(array.dtype).newbyteorder("=")
    if native not in codes:
        raise ValueError(
            f"IDX cannot store dtype {array.dtype}; use uint8, int8, int16, int32, float32 or float64"
        )
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = np.ascontiguousarray(array, dtype=_IDX_TYPES[code]).tobytes()
    data = header + payload
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path
