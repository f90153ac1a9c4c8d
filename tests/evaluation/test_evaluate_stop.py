"""`look evaluate` stops on a signal outside fine-tuning too: a feature extraction after its batch
in progress, a frozen protocol before the next one. It raises ``EvaluationStopped`` (the command:
status 75), keeps the finished protocols in results.json, marked incomplete, and writes no partial
feature cache; the same call goes on. Under DDP a signal to one rank stops every rank after the same batch, also when the
shards have different numbers of batches."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from look.data import DataSpec, build_eval_dataset
from look.engine.stop_signals import (
    EXIT_STOPPED,
    STOPPABLE_SIGNALS,
    EvaluationStopped,
    StopSignals,
    signal_numbers,
)
from look.evaluation import KnnOptions, LinearProbeOptions, ModelSource, evaluate, load_model
from look.evaluation import features as features_module
from look.evaluation import suite as suite_module
from tests.ddp import free_port, init_gloo

SPEC_TEXT = "synthetic:samples=40,classes=3,size=12"
EVALUATE_KWARGS: dict[str, Any] = {
    "device": "cpu",
    "batch_size": 8,  # 40 training images: 5 batches
    "progress": False,
    "linear_options": LinearProbeOptions(c_grid=(0.1, 1.0), warn_grid_edge=False),
    "knn_options": KnnOptions(ks=(3,)),
    "stop_signals": ("SIGTERM",),
}


@pytest.fixture
def sigterm_restored() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _signal_at_forward(monkeypatch: pytest.MonkeyPatch, call: int) -> list[int]:
    """The ``call``-th forward pass of the evaluated model (counted from 1) sends SIGTERM to
    this process; returns the running list of calls."""
    calls: list[int] = []
    original = suite_module.FeatureModel.forward

    def forward(self: nn.Module, images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, images)

    monkeypatch.setattr(suite_module.FeatureModel, "forward", forward)
    return calls


def _evaluate(output: Path, cache: Path) -> dict[str, Any]:
    return evaluate(
        ModelSource(timm="look_cnn_small"),
        SPEC_TEXT,
        ["linear", "knn"],
        output_dir=output,
        cache_dir=cache,
        **EVALUATE_KWARGS,
    )


def test_a_signal_during_an_extraction_stops_after_its_batch_and_the_rerun_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm_restored: None
) -> None:
    whole = _evaluate(tmp_path / "whole", tmp_path / "whole_cache")
    calls = _signal_at_forward(monkeypatch, call=2)
    output, cache = tmp_path / "eval", tmp_path / "cache"
    with pytest.raises(
        EvaluationStopped, match=r"SIGTERM during synthetic train features \(batch 2 of 5\)"
    ):
        _evaluate(output, cache)
    assert len(calls) == 2, "the extraction went on after the signal"
    assert not (output / "results.json").exists(), "no protocol had started"
    assert not list(cache.glob("*")), "a stopped extraction wrote features"

    monkeypatch.undo()
    resumed = _evaluate(output, cache)
    assert resumed["complete"]
    assert resumed["protocols"] == whole["protocols"]


def test_a_signal_during_a_frozen_protocol_stops_before_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm_restored: None
) -> None:
    original = suite_module.linear_probe

    def signalled_probe(*args: Any, **kwargs: Any) -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGTERM)  # mid-protocol: it finishes, and is written
        return original(*args, **kwargs)

    monkeypatch.setattr(suite_module, "linear_probe", signalled_probe)
    output, cache = tmp_path / "eval", tmp_path / "cache"
    with pytest.raises(EvaluationStopped, match="before its knn protocol"):
        _evaluate(output, cache)
    written = json.loads((output / "results.json").read_text())
    assert "linear" in written["protocols"] and written["pending_protocols"] == ["knn"]
    assert not written["complete"] and "failed_protocol" not in written, "a stop is no failure"
    assert len(list(cache.glob("*.pt"))) == 2, "both finished feature sets are cached"


def test_without_stop_signals_a_signal_keeps_its_usual_effect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        _signal_at_forward(monkeypatch, call=2)
        report = evaluate(
            ModelSource(timm="look_cnn_small"),
            SPEC_TEXT,
            ["knn"],
            output_dir=tmp_path / "eval",
            cache_dir=None,
            **{**EVALUATE_KWARGS, "stop_signals": ()},
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM] and report["complete"]


def test_the_command_exits_with_status_75_naming_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from look.cli import main

    _signal_at_forward(monkeypatch, call=3)
    handlers = {number: signal.getsignal(number) for number in signal_numbers(STOPPABLE_SIGNALS)}
    try:
        status = main(
            ["evaluate", "--timm", "look_cnn_small", "--dataset", SPEC_TEXT, "--protocol", "knn",
             "--knn-k", "3", "--batch-size", "8", "--device", "cpu", "--no-cache",
             "--no-progress", "--output", str(tmp_path / "eval")]
        )  # fmt: skip
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert status == EXIT_STOPPED
    assert capsys.readouterr().err.endswith(
        "look: stopped on SIGTERM during synthetic train features (batch 3 of 5); the finished "
        "protocols are in results.json and the finished feature sets in the feature cache; run "
        "the same command to go on\n"
    )


# --- two gloo ranks: shards of 21 images in batches of 5 are 11 (3 batches) and 10 (2 batches).
WORLD_SIZE = 2
SPEC = DataSpec(
    dataset="synthetic", synthetic_num_samples=21, synthetic_num_classes=3, synthetic_image_size=12
)


class _SignalAt(nn.Module):
    def __init__(self, backbone: nn.Module, call: int) -> None:
        super().__init__()
        self.backbone, self.call, self.calls = backbone, call, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.call:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.backbone(images)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, WORLD_SIZE, port, timeout_s=60)
    outcome: dict[str, Any] = {}
    try:
        backbone = load_model(ModelSource(timm="look_cnn_small"), seed=0).backbone
        dataset, _ = build_eval_dataset(SPEC, "train")
        with StopSignals(("SIGTERM",)) as stop:
            outcome["caught_none"] = features_module.extract_features(
                _SignalAt(backbone, 0), dataset, batch_size=5, progress=False, stop=stop
            ).tolist()
        # Rank 1 at its last batch (2nd); rank 0 at its 3rd, a round rank 1 has no batch in.
        for name, signalled_rank, call in (("rank1", 1, 2), ("rank0", 0, 3)):
            model = _SignalAt(backbone, call if rank == signalled_rank else 0)
            with StopSignals(("SIGTERM",)) as stop:
                try:
                    features_module.extract_features(
                        model, dataset, batch_size=5, progress=False, stop=stop
                    )
                except EvaluationStopped as stopped:
                    outcome[name] = [stopped.signal_name, stopped.during, model.calls]
    finally:
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(outcome))
        dist.destroy_process_group()


@pytest.mark.ddp
def test_under_ddp_one_signalled_rank_stops_every_rank_after_the_same_batch(
    tmp_path: Path,
) -> None:
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    backbone = load_model(ModelSource(timm="look_cnn_small"), seed=0).backbone
    dataset, _ = build_eval_dataset(SPEC, "train")
    expected = features_module.extract_features(backbone, dataset, batch_size=5, progress=False)
    other = "a signal another rank received"
    during = "features (batch {} of 3)"
    for rank, outcome in enumerate(ranks):
        torch.testing.assert_close(torch.tensor(outcome["caught_none"]), expected)
        assert outcome["rank1"] == [
            "SIGTERM" if rank == 1 else other,
            during.format(2),
            2,
        ]
        assert outcome["rank0"] == [
            "SIGTERM" if rank == 0 else other,
            during.format(3),
            3 if rank == 0 else 2,  # rank 1 has no 3rd batch: it only agreed to stop
        ]
