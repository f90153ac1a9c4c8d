"""The kNN transfer monitor (``train.knn_monitor``): logged before training and after every epoch,
invisible to the training itself, exact across a resume, refused early when misconfigured."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from look.config import ConfigError
from look.engine.metrics_log import csv_path, read_metrics
from look.engine.trainer import Trainer, pretrain
from tests.engine.test_trainer import pretrain_on_rank, tiny_config, train_losses

MONITOR = ("train.knn_monitor=synthetic:samples=64,classes=4", "train.knn_monitor_images=40")
# MoCo v2 shuffling batch norm over two groups in one process draws a permutation from the
# global generator every step: a monitor that touched it would change the loss curve.
MOCO_SHUFFLE = ("method={name: mocov2, queue_size: 32, bn_splits: 2}",)


def _monitor_rows(run_dir: Path) -> list[dict[str, float]]:
    rows = read_metrics(run_dir, "monitor")
    return [{k: v for k, v in row.items() if k != "knn_seconds"} for row in rows]


def test_the_monitor_measures_before_training_and_after_every_epoch(tmp_path: Path) -> None:
    pretrain(tiny_config(*MONITOR), tmp_path / "run")
    rows = _monitor_rows(tmp_path / "run")
    assert [(row["step"], row["epochs_trained"]) for row in rows] == [(0, 0), (6, 1), (12, 2)]
    for row in rows:
        assert 0.0 <= row["knn_top1"] <= 100.0 and 0.0 <= row["knn_mean_per_class"] <= 100.0
    assert csv_path(tmp_path / "run", "monitor").is_file()


@pytest.mark.parametrize("method", [(), MOCO_SHUFFLE], ids=["look", "mocov2_shuffled_bn"])
def test_the_monitor_does_not_change_the_training(tmp_path: Path, method: tuple[str, ...]) -> None:
    pretrain(tiny_config(*method), tmp_path / "plain")
    pretrain(tiny_config(*method, *MONITOR), tmp_path / "monitored")
    assert train_losses(tmp_path / "monitored") == train_losses(tmp_path / "plain")


def test_a_resumed_run_logs_the_same_monitor_curve(tmp_path: Path) -> None:
    pretrain(tiny_config(*MONITOR), tmp_path / "full")
    pretrain(tiny_config(*MONITOR, "train.max_steps=5"), tmp_path / "split")
    pretrain(tiny_config(*MONITOR), tmp_path / "split")
    assert _monitor_rows(tmp_path / "split") == _monitor_rows(tmp_path / "full")


def test_a_bad_monitor_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.knn_monitor='no_such_set'.*unknown dataset"):
        Trainer(tiny_config("train.knn_monitor=no_such_set"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"knn_monitor_images=2.*number of classes"):
        Trainer(tiny_config(*MONITOR, "train.knn_monitor_images=2"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"train\.knn_monitor_k must be > 0"):
        tiny_config(*MONITOR, "train.knn_monitor_k=0")
    assert not (tmp_path / "run").exists()


def _statistics_digest(state: dict[str, torch.Tensor]) -> str:
    """A digest of the batch-norm running statistics in a state dict."""
    digest = hashlib.sha256()
    for name in sorted(state):
        if name.endswith(("running_mean", "running_var")):
            digest.update(name.removeprefix("backbone.").encode())
            digest.update(state[name].float().numpy().tobytes())
    return digest.hexdigest()


def _pretrain_recording_the_measured_model(rank: int, port: int, out_dir: str) -> None:
    """``pretrain_on_rank``, writing the digest of the statistics each measurement used."""
    from look.engine.monitor import KnnMonitor

    original = KnnMonitor.measure
    digests: list[str] = []

    def recording(self: KnnMonitor, backbone: torch.nn.Module, **kwargs: Any) -> Any:
        digests.append(_statistics_digest(backbone.state_dict()))
        return original(self, backbone, **kwargs)

    KnnMonitor.measure = recording  # type: ignore[method-assign]
    pretrain_on_rank(rank, port, str(Path(out_dir) / "run"), MONITOR)
    (Path(out_dir) / f"measured{rank}.json").write_text(json.dumps(digests))


@pytest.mark.ddp
def test_two_ranks_measure_the_monitor_together(tmp_path: Path) -> None:
    """Each rank extracts a shard of the monitor's images (a collective at every epoch end); the
    run finishes (no rank left waiting) and logs the curve once."""
    import torch.multiprocessing as mp

    from tests.ddp import free_port

    mp.spawn(
        _pretrain_recording_the_measured_model, args=(free_port(), str(tmp_path)), nprocs=2,
        join=True,
    )  # fmt: skip
    rows = _monitor_rows(tmp_path / "run")
    assert [(row["step"], row["epochs_trained"]) for row in rows] == [(0, 0), (6, 1), (12, 2)]
    assert all(0.0 <= row["knn_top1"] <= 100.0 for row in rows)
    # Every rank measured one model, the one the run saves (rank 0's batch-norm statistics;
    # without sync_batchnorm each rank's follow its own images).
    measured = [json.loads((tmp_path / f"measured{rank}.json").read_text()) for rank in (0, 1)]
    assert len(measured[0]) == 3 and measured[0] == measured[1]
    saved = torch.load(max((tmp_path / "run" / "checkpoints").glob("ckpt-*.pt")))["model"]
    assert measured[0][-1] == _statistics_digest(
        {name: tensor for name, tensor in saved.items() if name.startswith("backbone.")}
    )


def test_a_monitor_of_the_training_dataset_reads_the_training_root(tmp_path: Path) -> None:
    from look.engine.monitor import build_knn_monitor

    missing = tmp_path / "elsewhere"
    with pytest.raises((ValueError, FileNotFoundError), match="elsewhere"):
        build_knn_monitor(
            "fashion_mnist", labels="fine", k=20, images=100, image_size=28,
            training_data=("fashion_mnist", str(missing)),
        )  # fmt: skip
    # Another dataset, or an explicit root, is not redirected.
    with pytest.raises((ValueError, FileNotFoundError), match="given"):
        build_knn_monitor(
            f"fashion_mnist:{tmp_path / 'given'}", labels="fine", k=20, images=100,
            image_size=28, training_data=("fashion_mnist", str(missing)),
        )  # fmt: skip


def test_the_monitor_follows_the_runs_corrupt_images_setting(tmp_path: Path) -> None:
    """With data.corrupt_images=skip an undecodable monitor image is replaced as in training;
    with fail the step error names the file in one line, also from a loader worker."""
    from look.engine.trainer import TrainingStepError
    from tests.data.conftest import write_png

    root = tmp_path / "images"
    for split, count in (("train", 4), ("val", 2)):
        for name, colour in {"cat": (200, 30, 30), "dog": (30, 30, 200)}.items():
            for i in range(count):
                write_png(root / split / name / f"{i}.png", colour)
    (root / "train" / "cat" / "1.png").write_bytes(b"not a png")
    monitor = (f"train.knn_monitor=imagefolder:{root}", "train.knn_monitor_k=3", "optim.epochs=1")
    pretrain(tiny_config(*monitor, "data.corrupt_images=skip"), tmp_path / "skip")
    assert len(_monitor_rows(tmp_path / "skip")) == 2
    with pytest.raises(TrainingStepError) as failed:
        pretrain(tiny_config(*monitor, "data.num_workers=2"), tmp_path / "fail")
    message = str(failed.value)
    assert message.startswith("step 0 failed measuring the kNN monitor: cannot decode image file")
    assert "1.png" in message and "Traceback" not in message and "\n" not in message


def test_an_imagefolder_monitor_without_a_root_reads_the_training_folder(tmp_path: Path) -> None:
    from look.engine.monitor import build_knn_monitor
    from tests.data.conftest import write_png

    root = tmp_path / "images"
    for split, count in (("train", 3), ("val", 2)):
        for name in ("cat", "dog"):
            for i in range(count):
                write_png(root / split / name / f"{i}.png", (10, 20, 30))
    monitor = build_knn_monitor(
        "imagefolder", labels="fine", k=3, images=None, image_size=16,
        training_data=("imagefolder", str(root)),
    )  # fmt: skip
    assert (len(monitor.memory_labels), len(monitor.query_labels)) == (6, 4)


def test_a_monitor_of_the_training_folder_reuses_its_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training data and the monitor's training split are the same folder: it is listed
    once for both, and the monitor's test split once."""
    from tests.data.conftest import write_png
    from tests.listing import count_listings

    root = tmp_path / "images"
    for split, count in (("train", 4), ("val", 2)):
        for name, colour in {"cat": (200, 30, 30), "dog": (30, 30, 200)}.items():
            for i in range(count):
                write_png(root / split / name / f"{i}.png", colour)
    listed = count_listings(monkeypatch)
    trainer = Trainer(
        tiny_config(
            "data.dataset=imagefolder", f"data.root={root}", "data.image_size=16",
            "method.k=2", "optim.batch_size=4", "train.knn_monitor=imagefolder",
            "train.knn_monitor_k=3",
        ),
        tmp_path / "run",
    )  # fmt: skip
    assert trainer.knn_monitor is not None and len(trainer.knn_monitor.memory_labels) == 8
    assert sorted(listed) == ["train", "val"]
