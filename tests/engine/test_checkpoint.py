from __future__ import annotations

import argparse
import json
import random
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from look.engine.checkpoint import (
    MANIFEST_NAME,
    CheckpointCorruptError,
    capture_rng_state,
    checkpoint_path,
    discard_checkpoints,
    find_latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    remove_leftover_temp_files,
    restore_rng_state,
    save_checkpoint,
)


def _state(step: int) -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": {"name": "look", "k": 10, "tau": 0.07, "betas": (0.9, 0.99), "extra": None},
        "marker": torch.full((2,), float(step)),
    }


def _manifest(directory: Path) -> list[dict]:
    return json.loads((directory / MANIFEST_NAME).read_text())["checkpoints"]


def test_save_and_load_roundtrip(tmp_path: Path) -> None:
    state = _state(7)
    path = save_checkpoint(tmp_path, 7, state)
    assert path == tmp_path / "ckpt-000000007.pt" == checkpoint_path(tmp_path, 7)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7
    assert loaded["config"] == state["config"]
    assert isinstance(loaded["model"], OrderedDict)
    for key, value in state["model"].items():
        torch.testing.assert_close(loaded["model"][key], value)
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    entries = _manifest(tmp_path)
    assert [e["file"] for e in entries] == [path.name]
    assert entries[0]["step"] == 7
    assert entries[0]["bytes"] == path.stat().st_size
    assert len(entries[0]["sha256"]) == 64
    assert entries[0]["created"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_manifest_lists_newest_last_and_prunes_to_keep_last(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, step, _state(step), keep_last=3)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == [
        "ckpt-000000030.pt",
        "ckpt-000000040.pt",
        "ckpt-000000050.pt",
    ]
    assert [e["step"] for e in _manifest(tmp_path)] == [30, 40, 50]


def test_saving_an_earlier_step_removes_later_checkpoints(tmp_path: Path) -> None:
    # A run restarted from scratch (or from an earlier checkpoint) must not leave the abandoned
    # run's later checkpoints behind: the next resume would take them as the newest.
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=3)
    with pytest.warns(RuntimeWarning, match=r"ckpt-000000020\.pt, ckpt-000000030\.pt"):
        path = save_checkpoint(tmp_path, 15, {"step": 15}, keep_last=3)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == [
        "ckpt-000000010.pt",
        "ckpt-000000015.pt",
    ]
    assert [e["step"] for e in _manifest(tmp_path)] == [10, 15]
    assert load_latest_checkpoint(tmp_path)[1] == path  # type: ignore[index]


def test_keep_last_none_keeps_everything(tmp_path: Path) -> None:
    for step in range(5):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=None)
    assert len(list(tmp_path.glob("ckpt-*.pt"))) == 5


def test_resave_same_step_replaces_manifest_entry(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, {"value": 1})
    save_checkpoint(tmp_path, 5, {"value": 2})
    assert [e["step"] for e in _manifest(tmp_path)] == [5]
    assert load_checkpoint(checkpoint_path(tmp_path, 5))["value"] == 2


def test_non_checkpointable_values_are_rejected_with_key_path(tmp_path: Path) -> None:
    state = _state(1)
    state["config"]["args"] = argparse.Namespace(lr=0.1)
    with pytest.raises(TypeError, match=r"state\['config'\]\['args'\].*Namespace"):
        save_checkpoint(tmp_path, 1, state)
    with pytest.raises(TypeError, match=r"state\['lrs'\]\[1\].*float64"):
        save_checkpoint(tmp_path, 1, {"lrs": [0.1, np.float64(0.2)]})
    with pytest.raises(TypeError, match=r"state\['array'\].*ndarray"):
        save_checkpoint(tmp_path, 1, {"array": np.zeros(3)})
    with pytest.raises(TypeError, match="key"):
        save_checkpoint(tmp_path, 1, {"bad": {(1, 2): 3}})
    assert list(tmp_path.iterdir()) == []  # checked before anything is written


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, {})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, {}, keep_last=0)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "ckpt-000000001.pt")


def test_tampered_bytes_raise_corrupt_error(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 3, _state(3))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"ckpt-000000003\.pt.*sha256"):
        load_checkpoint(path)


def test_truncated_file_raises_corrupt_error_without_manifest(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 3, _state(3))
    (tmp_path / MANIFEST_NAME).unlink()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointCorruptError, match=r"ckpt-000000003\.pt.*torch\.load"):
        load_checkpoint(path)


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt-000000001.pt"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)  # written by someone else
    with pytest.raises(CheckpointCorruptError, match="weights_only"):
        load_checkpoint(path)


def test_crash_leftovers_fall_back_to_latest_good_checkpoint(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _state(step))
    newest = checkpoint_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:-50])  # truncated newest
    leftover = tmp_path / ".ckpt-crashed.tmp"
    leftover.write_bytes(b"partial")

    with pytest.warns(RuntimeWarning, match=r"ckpt-000000003\.pt"):
        result = load_latest_checkpoint(tmp_path)
    assert result is not None
    state, path = result
    assert path == checkpoint_path(tmp_path, 2)
    assert state["step"] == 2
    assert leftover.exists()  # a reader leaves it: it may be a save in progress
    remove_leftover_temp_files(tmp_path)  # the writer's, under its run lock
    assert not leftover.exists()

    with pytest.warns(RuntimeWarning, match=r"ckpt-000000003\.pt"):
        assert find_latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 2)


def test_unlisted_newer_checkpoint_is_used_when_manifest_is_stale(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, {"step": 1})
    stale_manifest = (tmp_path / MANIFEST_NAME).read_text()
    save_checkpoint(tmp_path, 2, {"step": 2})
    (tmp_path / MANIFEST_NAME).write_text(stale_manifest)  # crash before the manifest update
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, path = load_latest_checkpoint(tmp_path)  # type: ignore[misc]
        assert find_latest_checkpoint(tmp_path) == path
    assert state["step"] == 2


def test_missing_manifest_and_truncated_newest(tmp_path: Path) -> None:
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"step": step})
    (tmp_path / MANIFEST_NAME).unlink()
    newest = checkpoint_path(tmp_path, 2)
    newest.write_bytes(newest.read_bytes()[:40])
    with pytest.warns(RuntimeWarning, match=r"ckpt-000000002\.pt"):
        assert find_latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)
    with pytest.warns(RuntimeWarning, match=r"ckpt-000000002\.pt"):
        state, _ = load_latest_checkpoint(tmp_path)  # type: ignore[misc]
    assert state["step"] == 1


def test_unreadable_manifest_warns_and_still_loads(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 4, {"step": 4})
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.warns(RuntimeWarning, match="manifest"):
        state, _ = load_latest_checkpoint(tmp_path)  # type: ignore[misc]
    assert state["step"] == 4
    # The next save rebuilds a valid manifest.
    with pytest.warns(RuntimeWarning, match="manifest"):
        save_checkpoint(tmp_path, 5, {"step": 5})
    assert [e["step"] for e in _manifest(tmp_path)] == [4, 5]


def test_empty_or_missing_directory_gives_none(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path / "absent") is None
    assert load_latest_checkpoint(tmp_path) is None


def test_all_checkpoints_corrupt_raises(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {"step": 1})
    path.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointCorruptError, match="none of the"):
        load_latest_checkpoint(tmp_path)


def test_rng_state_survives_weights_only_load_and_reproduces(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.standard_normal()  # and in numpy's
    rng = capture_rng_state()
    expected = (
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3),
        np.random.standard_normal(),
        torch.rand(3),
    )

    save_checkpoint(tmp_path, 1, {"rng": rng})
    loaded = load_checkpoint(checkpoint_path(tmp_path, 1))  # weights_only=True inside

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(loaded["rng"])
    assert [random.random() for _ in range(3)] == expected[0]
    assert random.gauss(0, 1) == expected[1]
    np.testing.assert_array_equal(np.random.rand(3), expected[2])
    assert np.random.standard_normal() == expected[3]
    torch.testing.assert_close(torch.rand(3), expected[4], rtol=0, atol=0)


def test_restore_rng_state_rejects_incomplete_state() -> None:
    with pytest.raises(ValueError, match="capture_rng_state"):
        restore_rng_state({"python": {}})


def _rng_round_trip_on_rank(rank: int, port: int, directory: str) -> None:
    """Ranks on different streams save every rank's state; each must get its own back."""
    import torch.distributed as dist

    from look.engine.checkpoint import (
        capture_rng_state_of_every_rank,
        restore_rng_state_of_this_rank,
    )
    from tests.ddp import init_gloo

    init_gloo(rank, 2, port)
    try:
        torch.manual_seed(100 + rank)
        states = capture_rng_state_of_every_rank()
        expected = torch.rand(4)
        if rank == 0:
            save_checkpoint(Path(directory), 1, {"rng_per_rank": states})
        dist.barrier()
        loaded = load_checkpoint(checkpoint_path(Path(directory), 1))
        torch.manual_seed(7)  # both ranks alike, as after a restart
        assert restore_rng_state_of_this_rank(loaded["rng_per_rank"])
        torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_every_rank_gets_its_own_random_state_back(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from tests.ddp import free_port

    mp.spawn(_rng_round_trip_on_rank, args=(free_port(), str(tmp_path)), nprocs=2)


def test_another_number_of_ranks_takes_rank_0s_random_state() -> None:
    from look.engine.checkpoint import restore_rng_state_of_this_rank

    torch.manual_seed(1)
    first = capture_rng_state()
    expected = torch.rand(2)
    torch.manual_seed(2)
    assert not restore_rng_state_of_this_rank([first, capture_rng_state()])
    torch.testing.assert_close(torch.rand(2), expected, rtol=0, atol=0)


def test_discarding_removes_every_checkpoint_and_a_crashed_discards_leftover(
    tmp_path: Path,
) -> None:
    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(checkpoints, step, _state(step))
    # A discard that crashed between its rename and its delete left this behind.
    leftover = tmp_path / ".checkpoints-discarded-999"
    leftover.mkdir()
    (leftover / "ckpt-000000007.pt").write_bytes(b"old")
    assert discard_checkpoints(checkpoints) == 2
    assert not checkpoints.exists() and not leftover.exists()
    assert find_latest_checkpoint(checkpoints) is None  # a fresh start finds nothing
    assert discard_checkpoints(checkpoints) == 0  # nothing there: nothing to do


def test_a_short_write_says_the_disk_may_be_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch's writer says "unexpected pos 7104768 vs 7104656" when the disk fills up.
    import look.engine.checkpoint as checkpoint_module

    def short_write(state: object, path: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 96 vs 64")

    monkeypatch.setattr(checkpoint_module.torch, "save", short_write)
    with pytest.raises(
        OSError, match=r"ckpt-000000003.pt came up short .* the disk is full \(\d+ MB free"
    ):
        save_checkpoint(tmp_path, 3, {"x": 1})
    assert not list(tmp_path.iterdir()), "no temporary file left"


def test_without_a_manifest_checksum_a_damaged_record_is_caught_by_its_crc(tmp_path: Path) -> None:
    # torch.load reads a tensor whose bytes were flipped without complaint: with the manifest
    # gone, the damaged newest checkpoint was loaded.
    save_checkpoint(tmp_path, 4, {"weights": torch.arange(1000, dtype=torch.float32)})
    save_checkpoint(tmp_path, 5, {"weights": torch.arange(1000, dtype=torch.float32) + 1})
    newest = tmp_path / "ckpt-000000005.pt"
    data = bytearray(newest.read_bytes())
    start = data.index(torch.tensor([7.0]).numpy().tobytes())  # inside the tensor's record
    data[start : start + 8] = b"\xff" * 8
    newest.write_bytes(bytes(data))
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.warns(RuntimeWarning) as caught:
        state, path = load_latest_checkpoint(tmp_path)  # type: ignore[misc]
    assert path.name == "ckpt-000000004.pt" and state["weights"][7] == 7
    assert any("fails its CRC-32 check" in str(w.message) for w in caught)
