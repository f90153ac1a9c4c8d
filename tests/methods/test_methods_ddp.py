"""Two CPU processes (gloo) with half the batch each must equal one process with the whole batch:
same loss, same (averaged) gradients, same memory, same weights after a few SGD steps.

A sharded bank (each rank holds half the rows) must equal one process with the replicated bank;
its checkpoint state (the whole bank, gathered) must equal that bank's state dict."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import look.memory as memory_module
import look.methods.look as look_method
import look.methods.mocov2 as mocov2_module
import look.sharded as sharded_module
from look.methods import Batch, build_method
from tests.ddp import free_port, init_gloo

from .conftest import CTX, TinyBackbone, make_batch

HEAD = {"head_hidden_dim": 16, "head_out_dim": 8, "head_batch_norm": False}
CFGS = {
    "look": {"name": "look", "k": 5, **HEAD},
    "look_nearest_bf16": {
        "name": "look",
        "k": 3,
        "no_positive": "nearest",
        "memory_dtype": "bfloat16",
        **HEAD,
    },
    "look_queue_ema": {
        "name": "look",
        "k": 5,
        "memory": "queue",
        "queue_size": 24,
        "memory_update": "ema_encoder",
        **HEAD,
    },
    "look_sharded": {"name": "look", "k": 5, "memory": "sharded_bank", **HEAD},
    "nca": {"name": "nca", **HEAD},
    "supcon": {"name": "supcon", **HEAD},
    "ce": {"name": "ce"},
    "mocov2": {"name": "mocov2", "queue_size": 24, **HEAD},
    # Shuffling BN across ranks: the head's BN normalises each rank's queries and a random half of
    # the global batch's keys, which one process with two BN groups per batch reproduces.
    "mocov2_shuffle_bn": {"name": "mocov2", "queue_size": 24, **HEAD, "head_batch_norm": True},
}
# LOOK under the accelerator policy (host reads not free): under DDP it still writes its memory
# in forward, where the write's row-count read costs nothing extra...
CFGS["look_accelerator"] = CFGS["look"]
CFGS["look_sharded_accelerator"] = CFGS["look_sharded"]
# ...unless the method knows the per-rank batch (the trainer passes it): then the gather pads to
# it, reads nothing on the host, and the write follows the optimizer step.
PADDED_BASE = {
    "look_padded": "look",
    "look_queue_padded": "look_queue_ema",
    "look_sharded_padded": "look_sharded",
    "mocov2_padded": "mocov2",
    # Knowing the per-rank batch, the shuffle gathers the images without reading row counts.
    "mocov2_shuffle_bn_padded": "mocov2_shuffle_bn",
}
PADDED = {f"{name}_accelerator": base for name, base in PADDED_BASE.items()}
CFGS.update({name: CFGS[base] for name, base in PADDED_BASE.items()})
CFGS.update({name: CFGS[base] for name, base in PADDED.items()})
# The single-process run each DDP run is compared with (default: the same config).
REFERENCE_OF_BASE = {"look_sharded": "look", "mocov2_shuffle_bn": "mocov2_two_bn_groups"}
REFERENCE = {
    "look_sharded": "look",
    "mocov2_shuffle_bn": "mocov2_two_bn_groups",
    "look_accelerator": "look",
    "look_sharded_accelerator": "look",
    **{name: REFERENCE_OF_BASE.get(base, base) for name, base in PADDED_BASE.items()},
    **{name: REFERENCE_OF_BASE.get(base, base) for name, base in PADDED.items()},
}
SINGLE_PROCESS_CFGS = {"mocov2_two_bn_groups": {**CFGS["mocov2_shuffle_bn"], "bn_splits": 2}}
STEPS, GLOBAL_BATCH = 4, 16


def _slice(batch: Batch, rank: int, world: int) -> Batch:
    b = batch.size // world
    part = slice(rank * b, (rank + 1) * b)
    return Batch([v[part] for v in batch.views], batch.labels[part], batch.indices[part])


def _run(name: str, rank: int, world: int) -> dict[str, object]:
    if name.endswith("_accelerator"):
        # The padded variants run the memory's device-side path too (padding rows kept).
        modules = (look_method, memory_module, sharded_module) if name in PADDED else (look_method,)
        originals = [module.host_reads_are_free for module in modules]
        for module in modules:
            module.host_reads_are_free = lambda device: False  # type: ignore[attr-defined]
        try:
            return _run(name.removesuffix("_accelerator"), rank, world)
        finally:
            for module, original in zip(modules, originals, strict=True):
                module.host_reads_are_free = original  # type: ignore[attr-defined]
    torch.manual_seed(0)
    ctx = CTX
    if name in PADDED_BASE:
        ctx = dataclasses.replace(CTX, local_batch_size=GLOBAL_BATCH // world)
    method = build_method({**CFGS, **SINGLE_PROCESS_CFGS}[name], TinyBackbone(), 12, ctx)
    model = DistributedDataParallel(method, broadcast_buffers=False) if world > 1 else method
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    memory = getattr(method, "memory", None)
    losses, grads, written_in_forward = [], [], []
    for step in range(STEPS):
        batch = make_batch(
            GLOBAL_BATCH, method.num_views, num_classes=3, seed=step, offset=16 * step
        )
        before = None if memory is None else memory.features.clone()
        out = model(_slice(batch, rank, world))
        if memory is not None:
            written_in_forward.append(not torch.equal(before, memory.features))
        opt.zero_grad()
        out.loss.backward()
        loss = out.loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss)
        grads.append([p.grad.clone() for p in method.parameters() if p.requires_grad])
        opt.step()
        method.after_optimizer_step((step + 1) / STEPS)
    return {
        "written_in_forward": written_in_forward,
        "losses": losses,
        "grads": grads,
        # Collective for a sharded bank: every rank gets the whole bank.
        "state": method.checkpoint_state(),
        "memory_rows": -1 if memory is None else int(memory.features.shape[0]),
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    torch.set_num_threads(1)
    results = {name: _run(name, rank, world) for name in CFGS}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.ddp
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for name in CFGS:
        single = _run(REFERENCE.get(name, name), 0, 1)
        for result in ranks:
            got = result[name]
            if name in ("look_sharded", "look_sharded_padded_accelerator"):
                assert got["memory_rows"] == CTX.num_samples // world  # really sharded
            if name in PADDED and name.startswith("look"):  # after the optimizer step
                assert got["written_in_forward"] == [False] * STEPS, name
            elif name in ("look", "look_accelerator"):
                assert got["written_in_forward"] == [True] * STEPS, name
            for a, b in zip(got["losses"], single["losses"], strict=True):
                assert torch.allclose(a, b, atol=1e-5), (name, a, b)
            for step_a, step_b in zip(got["grads"], single["grads"], strict=True):
                for a, b in zip(step_a, step_b, strict=True):
                    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
            assert set(got["state"]) == set(single["state"]), name
            for key, value in single["state"].items():
                shuffled = name.startswith("mocov2_shuffle_bn")
                if shuffled and ("running_" in key or "batches_tracked" in key):
                    # BN running statistics are per rank under DDP (no SyncBN), per group here.
                    continue
                other = got["state"][key]
                if value.is_floating_point():
                    assert torch.allclose(other.float(), value.float(), atol=1e-5), (name, key)
                else:
                    assert torch.equal(other, value), (name, key)


def _shuffle_reads_no_counts_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ctx = dataclasses.replace(CTX, local_batch_size=8)
    method = build_method(CFGS["mocov2_shuffle_bn"], TinyBackbone(), 12, ctx)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the shuffle read the row counts of a trainer-sized batch")

    mocov2_module.gather_rows_and_counts = refuse  # type: ignore[assignment]
    method(make_batch(8, method.num_views, num_classes=3, seed=rank))
    (Path(out_dir) / f"rank{rank}.txt").write_text("ok")
    dist.destroy_process_group()


@pytest.mark.ddp
def test_shuffle_bn_reads_no_row_counts_for_a_batch_of_the_known_size(tmp_path: Path) -> None:
    """The trainer passes the per-rank batch size: the shuffle then gathers the images with no
    host read of the row counts (a wait for the device at every step on a GPU)."""
    mp.spawn(_shuffle_reads_no_counts_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["ok", "ok"]


def _unequal_batches_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    method = build_method(CFGS["mocov2_shuffle_bn"], TinyBackbone(), 12, CTX)
    batch = make_batch(8 if rank == 0 else 6, method.num_views, num_classes=3, seed=rank)
    try:
        method(batch)
        message = "no error"
    except ValueError as error:
        message = str(error)
    (Path(out_dir) / f"rank{rank}.txt").write_text(message)
    dist.destroy_process_group()


@pytest.mark.ddp
def test_shuffle_bn_refuses_unequal_batches_on_every_rank(tmp_path: Path) -> None:
    """Shuffling keys across ranks needs equal per-rank batches: every rank says so, none hangs."""
    mp.spawn(_unequal_batches_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "same batch size on every rank, got 6 to 8" in message, message
