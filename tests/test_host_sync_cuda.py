"""On a real GPU (skipped without CUDA): a LOOK training step with an fp32 bank never makes the
host wait (``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising call), and a
refused memory row is reported through the pinned-memory deferred check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from look.memory import MemoryBank
from look.methods import Batch, MethodContext, build_method
from look.models import create_backbone

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _batch(rows: int, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return Batch(
        views=[torch.randn(64, 3, 28, 28, generator=generator)],
        labels=torch.randint(0, 5, (64,), generator=generator),
        indices=torch.randperm(rows, generator=generator)[:64],
    ).to(torch.device("cuda"))


@pytest.mark.parametrize("memory", ["bank", "queue", "sharded_bank"])
def test_look_step_never_synchronises_on_gpu(memory: str) -> None:
    torch.manual_seed(0)
    backbone, feature_dim = create_backbone("look_cnn_small")
    options = {"name": "look", "k": 20, "temperature": 0.1, "memory": memory, "queue_size": 256}
    ctx = MethodContext(num_classes=5, num_samples=1000)
    method = build_method(options, backbone, feature_dim, ctx).cuda().train()
    for seed in range(2):  # warm-up: lazy CUDA/cuBLAS initialisation may synchronise once
        method(_batch(1000, seed)).loss.backward()
    batch = _batch(1000, seed=5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = method(batch)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss)


def test_refused_row_reported_by_next_update_on_gpu() -> None:
    bank = MemoryBank(10, 4).cuda()
    features = F.normalize(torch.randn(2, 4, device="cuda"), dim=1)
    features[0] = float("nan")
    bank.update(torch.tensor([1, 2], device="cuda"), features, torch.tensor([0, 1], device="cuda"))
    assert bank.valid.tolist() == [False, False, True] + [False] * 7
    with pytest.raises(ValueError, match="1 feature rows were NaN/Inf"):
        bank.update(
            torch.tensor([3], device="cuda"),
            F.normalize(torch.randn(1, 4, device="cuda"), dim=1),
            torch.tensor([0], device="cuda"),
        )


@pytest.mark.parametrize("memory", ["bank", "sharded_bank"])
@pytest.mark.parametrize(("deferred", "expected_waits"), [(False, 1), (True, 0)])
def test_look_step_with_the_fused_search_waits_once(
    deferred: bool, expected_waits: int, memory: str
) -> None:
    """With a bf16 bank the fused search's overflow check is the step's one host wait (read after
    the loss terms are queued), none when the caller (the trainer) reads the flag itself; the
    same for a sharded bank (here one process holding every shard)."""
    import warnings

    from look.search_triton import triton_available

    if not triton_available():
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    backbone, feature_dim = create_backbone("look_cnn_small")
    options = {
        "name": "look", "k": 20, "temperature": 0.1, "memory_dtype": "bfloat16", "memory": memory
    }  # fmt: skip
    ctx = MethodContext(num_classes=5, num_samples=20000)
    method = build_method(options, backbone, feature_dim, ctx).cuda().train()
    method.defer_exactness_check = deferred
    for seed in range(2):  # warm-up: kernel compilation, lazy initialisation
        method(_batch(20000, seed)).loss.backward()
    batch = _batch(20000, seed=5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = method(batch)
            out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    waits = [w for w in caught if "synchronizing CUDA operation" in str(w.message)]
    assert len(waits) == expected_waits, [str(w.message) for w in waits]
    assert (out.inexact is not None) == deferred
    if deferred:
        assert not bool(out.inexact)  # random rows do not overflow the candidate buffer
    assert torch.isfinite(out.loss)


def test_overflowing_fused_search_is_flagged_and_the_redo_is_exact() -> None:
    """On the GPU, as the interpreter case of tests/search_triton_cases.py on the CPU: copies of a
    query's embedding make its candidate buffer overflow; the deferred step says it is inexact
    and the step redone under exact_redo equals the scan's loss."""
    from look.search_triton import triton_available
    from tests.neighbour_checks import overflowing_look_step

    if not triton_available():
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    backbone, feature_dim = create_backbone("look_cnn_small")
    options = {"name": "look", "k": 20, "temperature": 0.1, "memory_dtype": "bfloat16"}
    rows = 20000
    method = (
        build_method(options, backbone, feature_dim, MethodContext(num_classes=5, num_samples=rows))
        .cuda()
        .train()
    )
    batch = _batch(rows, seed=0)
    _, redone, expected = overflowing_look_step(
        method, batch, copies=6000, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(redone.loss, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory_dtype", ["float32", "bfloat16"])
def test_the_trainer_writes_the_memory_before_its_host_read_on_gpu(
    tmp_path: Path, memory_dtype: str
) -> None:
    """As tests/test_host_sync.py under the accelerator policy, on a real GPU (the bf16 bank with
    the fused search): the memory holds the batch when the trainer reads its flags, and a NaN
    step skipped under train.nan_policy=skip leaves the memory as it was, with nothing to
    report at the next check."""
    from look.engine.trainer import Trainer
    from tests.engine.test_trainer import tiny_config
    from tests.test_host_sync import check_the_memory_is_written_before_the_flag_read

    trainer = Trainer(
        tiny_config("train.device=cuda", "train.nan_policy=skip",
                    f"method.memory_dtype={memory_dtype}"),
        tmp_path / "run",
    )  # fmt: skip
    check_the_memory_is_written_before_the_flag_read(trainer)
