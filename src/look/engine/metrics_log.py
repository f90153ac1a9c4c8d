"""Scalar metrics to JSON lines, per-split CSV files and (optionally) TensorBoard.

``metrics.jsonl`` is the record: one line ``{"split": ..., "step": ..., <metric>: <value>, ...}``
per :meth:`MetricsLogger.log` call, appended and flushed at once, so a crash loses at most the line
being written. ``metrics_{split}.csv`` (columns ``step`` + every metric seen for that split, in
first-seen order) are regenerated from it by :meth:`MetricsLogger.flush` and
:meth:`MetricsLogger.close`. After a resume from the checkpoint of step ``s``, the trainer calls
:meth:`MetricsLogger.truncate_after` so the curves equal those of an uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from look.atomic import atomic_write_text

__all__ = ["JSONL_NAME", "MetricsLogger", "csv_path", "read_metrics"]

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED_KEYS = ("split", "step")
_warned_missing_tensorboard = False


def csv_path(output_dir: Path | str, split: str) -> Path:
    """Path of the CSV file of ``split`` inside ``output_dir``."""
    return Path(output_dir) / f"metrics_{split}.csv"


def read_metrics(output_dir: Path | str, split: str | None = None) -> list[dict[str, Any]]:
    """Rows of ``output_dir/metrics.jsonl`` (all splits, or only ``split``), in logged order.

    A torn last line (crash while writing) is skipped.
    """
    rows = _read_jsonl(Path(output_dir) / JSONL_NAME)
    return rows if split is None else [row for row in rows if row["split"] == split]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(
                    f"{path}:{line_number} is not valid JSON (torn write?); skipped",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            if isinstance(row, dict) and "split" in row and "step" in row:
                rows.append(row)
    return rows


def _as_float(key: str, value: Any) -> float:
    try:
        return float(value)  # numbers, numpy scalars and one-element tensors
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"metric {key!r} has value {value!r} of type {type(value).__qualname__}; "
            "metrics must be scalars convertible with float()"
        ) from error


class MetricsLogger:
    """Append scalar metrics per step; a no-op everywhere when ``enabled`` is False (ranks > 0).

    TensorBoard scalars are written under ``output_dir/tensorboard`` as ``{split}/{metric}`` when
    ``tensorboard`` is set and the ``tensorboard`` package is importable (otherwise one warning).
    Log all metrics of one (split, step) in a single call: every call is one row.
    """

    def __init__(
        self, output_dir: Path | str, *, tensorboard: bool = True, enabled: bool = True
    ) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self._use_tensorboard = tensorboard
        self._writer: Any = None
        self._jsonl: Any = None
        self._closed = False
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._drop_torn_last_line()
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        if tensorboard:
            self._writer = self._open_tensorboard(purge_step=None)

    @property
    def jsonl_path(self) -> Path:
        return self.output_dir / JSONL_NAME

    def log(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> None:
        """Record ``metrics`` (name → scalar) of global step ``step`` for ``split``."""
        if not self.enabled:
            return
        self._check_open()
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if not isinstance(split, str) or not _SPLIT_NAME.match(split):
            raise ValueError(
                f"split must be a name of letters, digits, '_', '.', '-' (e.g. 'train'), "
                f"got {split!r}"
            )
        row: dict[str, Any] = {"split": split, "step": step}
        for key, value in metrics.items():
            if not isinstance(key, str) or not key or key in _RESERVED_KEYS:
                raise ValueError(
                    f"metric names must be non-empty strings other than {_RESERVED_KEYS}, "
                    f"got {key!r}"
                )
            row[key] = _as_float(key, value)
        # Non-finite values are kept (a NaN loss is worth seeing); Python's json reads them back.
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for key, value in row.items():
                if key not in _RESERVED_KEYS and math.isfinite(value):
                    self._writer.add_scalar(f"{split}/{key}", value, global_step=step)

    def truncate_after(self, step: int) -> None:
        """Drop every logged row with a step greater than ``step`` (resume from that step).

        TensorBoard events past ``step`` are hidden too (a new event file with ``purge_step``).
        ``step=-1`` drops everything.
        """
        if not self.enabled:
            return
        self._check_open()
        if type(step) is not int or step < -1:
            raise ValueError(f"step must be an int >= -1, got {step!r}")
        self._jsonl.close()
        kept = [row for row in _read_jsonl(self.jsonl_path) if row["step"] <= step]
        atomic_write_text(self.jsonl_path, "".join(json.dumps(row) + "\n" for row in kept))
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        if self._writer is not None:
            self._writer.close()
            self._writer = self._open_tensorboard(purge_step=step + 1)
        self._write_csv_files(kept)

    def flush(self) -> None:
        """Flush TensorBoard and regenerate the per-split CSV files from the JSON lines."""
        if not self.enabled or self._closed:
            return
        self._jsonl.flush()
        if self._writer is not None:
            self._writer.flush()
        self._write_csv_files(_read_jsonl(self.jsonl_path))

    def close(self) -> None:
        """Flush everything and close the files; further :meth:`log` calls raise."""
        if not self.enabled or self._closed:
            return
        self.flush()
        self._jsonl.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._closed = True

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"MetricsLogger for {self.output_dir} is closed")

    def _drop_torn_last_line(self) -> None:
        """Cut a partial last line left by a crash, so the next append starts on a fresh line."""
        path = self.jsonl_path
        if not path.is_file() or path.stat().st_size == 0:
            return
        data = path.read_bytes()
        if data.endswith(b"\n"):
            return
        warnings.warn(
            f"{path} ends with a partial line (interrupted write); it was dropped",
            RuntimeWarning,
            stacklevel=3,
        )
        atomic_write_text(path, data[: data.rfind(b"\n") + 1].decode("utf-8"))

    def _open_tensorboard(self, purge_step: int | None) -> Any:
        global _warned_missing_tensorboard
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if not _warned_missing_tensorboard:
                warnings.warn(
                    "the tensorboard package is not installed; metrics go to JSON lines and CSV "
                    "only (pip install 'look[tensorboard]' to get TensorBoard logs)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _warned_missing_tensorboard = True
            return None
        return SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def _write_csv_files(self, rows: list[dict[str, Any]]) -> None:
        columns_by_split: dict[str, dict[str, None]] = {}  # dict as an ordered set
        rows_by_split: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            split = row["split"]
            columns = columns_by_split.setdefault(split, {"step": None})
            for key in row:
                if key != "split":
                    columns.setdefault(key, None)
            rows_by_split.setdefault(split, []).append(row)
        # A split whose rows were all truncated away keeps a header-only file, not stale rows.
        for existing in self.output_dir.glob("metrics_*.csv"):
            split = existing.stem.removeprefix("metrics_")
            columns_by_split.setdefault(split, {"step": None})
            rows_by_split.setdefault(split, [])
        for split, columns in columns_by_split.items():
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="")
            writer.writeheader()
            for row in rows_by_split[split]:
                writer.writerow({k: v for k, v in row.items() if k != "split"})
            atomic_write_text(csv_path(self.output_dir, split), buffer.getvalue())
