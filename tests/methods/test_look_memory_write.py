"""On an accelerator LOOK writes a step's batch into its memory after the optimizer step (or at
the next forward or checkpoint), so the write's kernels are launched behind the backward pass.
The values and losses must equal the CPU's immediate write."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import look.memory as memory_module
import look.methods.look as look_method_module
from look.methods import build_method

from .conftest import CTX, SMALL_HEAD, TinyBackbone, make_batch

CFG = {"name": "look", "k": 5, **SMALL_HEAD}


def _train(steps: int, *, call_after_step: bool) -> tuple[list[torch.Tensor], Any]:
    torch.manual_seed(0)
    method = build_method(CFG, TinyBackbone(), 12, CTX)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for step in range(steps):
        out = method(make_batch(16, 1, num_classes=3, seed=step, offset=16 * (step % 4)))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if call_after_step:
            method.after_optimizer_step((step + 1) / steps)
        losses.append(out.loss.detach())
    return losses, method


@pytest.fixture
def accelerator_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(look_method_module, "host_reads_are_free", lambda device: False)


@pytest.mark.parametrize("call_after_step", [True, False])
def test_deferred_write_gives_the_losses_and_memory_of_the_immediate_one(
    monkeypatch: pytest.MonkeyPatch, call_after_step: bool
) -> None:
    immediate_losses, immediate = _train(6, call_after_step=call_after_step)
    monkeypatch.setattr(look_method_module, "host_reads_are_free", lambda device: False)
    deferred_losses, deferred = _train(6, call_after_step=call_after_step)
    for a, b in zip(deferred_losses, immediate_losses, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state, reference = deferred.checkpoint_state(), immediate.checkpoint_state()
    for key, value in reference.items():  # the checkpoint includes the last step's batch
        assert torch.equal(state[key], value), key


def test_deferred_write_lands_at_the_optimizer_step(accelerator_policy: None) -> None:
    torch.manual_seed(0)
    method = build_method(CFG, TinyBackbone(), 12, CTX)
    batch = make_batch(16, 1, num_classes=3, seed=0)
    method(batch)
    assert not bool(method.memory.valid.any())  # not yet written
    assert method.has_pending_memory_writes
    method.after_optimizer_step(0.5)
    assert not method.has_pending_memory_writes
    assert bool(method.memory.valid[batch.indices].all())
    assert int(method.memory.valid.sum()) == 16


def test_loading_a_checkpoint_drops_an_unwritten_batch(accelerator_policy: None) -> None:
    torch.manual_seed(0)
    method = build_method(CFG, TinyBackbone(), 12, CTX)
    state = {key: value.clone() for key, value in method.checkpoint_state().items()}
    method(make_batch(16, 1, num_classes=3, seed=0))
    method.load_checkpoint_state(state)
    method.after_optimizer_step(0.5)
    assert not bool(method.memory.valid.any())


def test_under_ddp_without_a_known_batch_size_the_write_stays_in_forward(
    accelerator_policy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the per-rank batch size a distributed write reads the ranks' row counts on the
    host; after the optimizer step that read would wait for the backward pass, so the write stays
    in forward. (With it, the write follows the optimizer step: tests/methods/test_methods_ddp.py.)
    """
    # Only the decision is tested here: the gather itself sees no process group.
    monkeypatch.setattr(memory_module, "is_distributed", lambda: True)
    torch.manual_seed(0)
    method = build_method(CFG, TinyBackbone(), 12, CTX)
    assert not method.memory.writes_without_host_reads
    batch = make_batch(16, 1, num_classes=3, seed=0)
    method(batch)
    assert int(method.memory.valid.sum()) == 16
    known = build_method(CFG, TinyBackbone(), 12, dataclasses.replace(CTX, local_batch_size=16))
    assert known.memory.writes_without_host_reads
