from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from look.engine.metrics_log import JSONL_NAME, MetricsLogger, csv_path, read_metrics


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def test_jsonl_and_csv_contents(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": 2.5, "lr": torch.tensor(0.1)})
        logger.log(2, {"loss": 2.0, "lr": 0.2, "acc": 0.5})
        logger.log(2, {"knn_top1": 0.75}, split="val")
        # JSON lines are written at once, before any flush.
        assert len((tmp_path / JSONL_NAME).read_text().splitlines()) == 3

    lines = [json.loads(line) for line in (tmp_path / JSONL_NAME).read_text().splitlines()]
    assert lines[0] == {"split": "train", "step": 1, "loss": 2.5, "lr": pytest.approx(0.1)}
    assert lines[2] == {"split": "val", "step": 2, "knn_top1": 0.75}

    columns, rows = _csv_rows(csv_path(tmp_path, "train"))
    assert columns == ["step", "loss", "lr", "acc"]  # union, first-seen order
    assert rows[0] == {"step": "1", "loss": "2.5", "lr": rows[0]["lr"], "acc": ""}
    assert float(rows[0]["lr"]) == pytest.approx(0.1)
    assert rows[1]["acc"] == "0.5"
    columns, rows = _csv_rows(csv_path(tmp_path, "val"))
    assert columns == ["step", "knn_top1"]
    assert rows == [{"step": "2", "knn_top1": "0.75"}]
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1, 2]


def test_truncate_after_matches_uninterrupted_run(tmp_path: Path) -> None:
    def curve(step: int) -> dict[str, float]:
        return {"loss": 1.0 / (step + 1)}

    reference_dir = tmp_path / "reference"
    with MetricsLogger(reference_dir, tensorboard=False) as logger:
        for step in range(10):
            logger.log(step, curve(step))
            if step % 5 == 4:
                logger.log(step, {"acc": step / 10}, split="val")

    resumed_dir = tmp_path / "resumed"
    with MetricsLogger(resumed_dir, tensorboard=False) as logger:
        for step in range(8):  # crashed after step 7, checkpoint at step 5
            logger.log(step, curve(step))
            if step % 5 == 4:
                logger.log(step, {"acc": step / 10}, split="val")
    with MetricsLogger(resumed_dir, tensorboard=False) as logger:
        logger.truncate_after(5)
        assert [r["step"] for r in read_metrics(resumed_dir, "train")] == list(range(6))
        for step in range(6, 10):
            logger.log(step, curve(step))
            if step % 5 == 4:
                logger.log(step, {"acc": step / 10}, split="val")

    assert (resumed_dir / JSONL_NAME).read_text() == (reference_dir / JSONL_NAME).read_text()
    for split in ("train", "val"):
        assert (
            csv_path(resumed_dir, split).read_text() == csv_path(reference_dir, split).read_text()
        )


def test_truncate_all_leaves_header_only_csv(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(3, {"acc": 0.1}, split="val")
        logger.flush()
        logger.truncate_after(-1)
    assert read_metrics(tmp_path) == []
    assert csv_path(tmp_path, "val").read_text().strip() == "step"


def test_torn_last_line_is_dropped_on_open(tmp_path: Path) -> None:
    (tmp_path / JSONL_NAME).write_text('{"split": "train", "step": 0, "loss": 1.0}\n{"split": "tr')
    with pytest.warns(RuntimeWarning, match="partial line"):
        logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]


def test_disabled_logger_writes_nothing(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path / "out", enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.truncate_after(0)
    logger.close()
    assert not (tmp_path / "out").exists()


def test_bad_input(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(ValueError, match="step"):
            logger.log(-1, {"loss": 1.0})
        with pytest.raises(ValueError, match="split"):
            logger.log(1, {"loss": 1.0}, split="a/b")
        with pytest.raises(ValueError, match="'name'"):
            logger.log(1, {"name": "resnet"})
        with pytest.raises(ValueError, match="metric names"):
            logger.log(1, {"step": 3.0})
        with pytest.raises(ValueError, match="'vector'"):
            logger.log(1, {"vector": torch.ones(3)})
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(1, {"loss": 1.0})


def test_non_finite_values_are_kept(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(0, {"loss": float("nan")})
    assert math.isnan(read_metrics(tmp_path)[0]["loss"])


def test_tensorboard_scalars_are_written(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as logger:
        for step in range(4):
            logger.log(step, {"loss": float(step)})
        logger.truncate_after(1)
        logger.log(2, {"loss": 20.0})
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    events = accumulator.Scalars("train/loss")
    assert [(e.step, e.value) for e in events] == [(0, 0.0), (1, 1.0), (2, 20.0)]


def test_missing_tensorboard_warns_once_and_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from look.engine import metrics_log

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    monkeypatch.setattr(metrics_log, "_warned_missing_tensorboard", False)
    with pytest.warns(RuntimeWarning, match="tensorboard"):
        first = MetricsLogger(tmp_path / "a")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = MetricsLogger(tmp_path / "b")
    for logger in (first, second):
        logger.log(0, {"loss": 1.0})
        logger.close()
    assert not (tmp_path / "a" / "tensorboard").exists()
    assert read_metrics(tmp_path / "b") == [{"split": "train", "step": 0, "loss": 1.0}]
