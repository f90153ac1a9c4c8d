"""What the step benchmarks (``gpu_step.py``, ``ddp_step.py``) share: the trainer's step and
how a step is timed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from look.engine.distributed import all_reduce_sum, is_distributed
from look.methods import Batch, Method


def median_ms(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds, each repetition timed from an idle device
    (and, under ``torch.distributed``, started on all ranks at once)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if is_distributed():
            dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


def trainer_step(
    method: Method,
    model: torch.nn.Module,
    device: torch.device,
    next_batch: Callable[[], Batch],
    *,
    loss_check: bool = True,
) -> Callable[[], None]:
    """A closure taking one step as ``look.engine.trainer`` does: forward under bf16 autocast on
    CUDA, the per-step finite-loss check (agreed over ranks: one all-reduce and one host read),
    backward (through DDP's gradient all-reduce when ``model`` is wrapped), an SGD step and the
    method's ``after_optimizer_step``.

    ``model`` is ``method`` or its DDP wrapper; ``next_batch`` gives each step's batch.
    """
    optimizer = torch.optim.SGD(
        [p for p in method.parameters() if p.requires_grad], lr=0.01, momentum=0.9
    )
    amp = device.type == "cuda"

    def step() -> None:
        batch = next_batch()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(batch)
        if loss_check:
            non_finite = all_reduce_sum(torch.isfinite(out.loss.detach()).logical_not().float())
            if non_finite.item() != 0:
                raise FloatingPointError(f"non-finite loss {float(out.loss)} in the benchmark")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        # Momentum encoders, and LOOK's memory write on one GPU, happen here in the trainer.
        method.after_optimizer_step(0.5)

    return step
