"""What the step benchmarks (``gpu_step.py``, ``ddp_step.py``) share: the trainer's step and
how a step is timed."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import record_function

from look.engine.distributed import all_reduce_sum, is_distributed
from look.engine.trainer import step_flags, write_memory_if_step_stands
from look.methods import Batch, Method, StepOutput


def random_search_inputs(
    rows: int, queries: int, device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPU benchmarks' search inputs: a bank of ``rows`` random 128-d unit rows in
    ``dtype``, ``queries`` random unit queries (fp32) and their ids, seeded by ``rows`` so that
    every script builds the same ones for a size."""
    torch.manual_seed(rows)
    bank = F.normalize(torch.randn(rows, 128, device=device), dim=1).to(dtype)
    query = F.normalize(torch.randn(queries, 128, device=device), dim=1)
    return bank, query, torch.randint(0, rows, (queries,), device=device)


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


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, steps: int = 10) -> float:
    """The device's matrix-product rate in TFLOP/s: the median time of one ``size``³ product of
    random ``dtype`` matrices (after three warm-ups). With the search's FLOP count it gives the
    floor its products set (at 14.2M rows on an H200 they take longer than the bank read)."""
    generator = torch.Generator(device=device).manual_seed(0)
    left = torch.randn(size, size, device=device, generator=generator).to(dtype)
    right = torch.randn(size, size, device=device, generator=generator).to(dtype)
    ms = median_ms(lambda: left @ right, steps, 3, device)
    return 2.0 * size**3 / (ms / 1000.0) / 1e12


def search_flops(queries: int, rows: int, dim: int, bound_tile_stride: int | None) -> float:
    """Multiply-adds × 2 of one search: every query against every row, plus, for the fused
    search, its bound pass over every ``bound_tile_stride``-th tile (None: the scan's one
    product)."""
    products = 2.0 * queries * rows * dim
    return products * (1.0 + (1.0 / bound_tile_stride if bound_tile_stride else 0.0))


def interleaved_median_ms(
    first: Callable[[], object],
    second: Callable[[], object],
    rounds: int,
    steps: int,
    warmup: int,
    device: torch.device,
) -> tuple[float, float]:
    """Median wall times (ms) of ``first`` and ``second``, timed in ``rounds`` alternating
    blocks of ``steps`` repetitions each (after ``warmup`` of each): a drift in the machine's
    speed over the measurement (clocks, a busy host) then falls on both alike, and their ratio
    is not skewed by when each was measured."""
    first_times: list[float] = []
    second_times: list[float] = []
    for _ in range(rounds):
        first_times.append(median_ms(first, steps, warmup, device))
        second_times.append(median_ms(second, steps, warmup, device))
        warmup = 1  # after the first round: one repetition to settle after the other's
    return statistics.median(first_times), statistics.median(second_times)


def trainer_step(
    method: Method,
    model: torch.nn.Module,
    device: torch.device,
    next_batch: Callable[[], Batch],
    *,
    loss_check: bool = True,
    write_after_optimizer_step: bool = False,
) -> Callable[[], None]:
    """A closure taking one step as ``look.engine.trainer`` does: forward under bf16 autocast on
    CUDA, backward (through DDP's gradient all-reduce when ``model`` is wrapped), then the
    per-step check (loss finite? search exact? agreed over ranks: one all-reduce and one host
    read, after the backward and the method's memory write are queued; an inexact step is
    recomputed exactly), an SGD step and the method's ``after_optimizer_step``. Like the
    trainer's steps that are not logged, the method computes no diagnostic metrics.

    ``model`` is ``method`` or its DDP wrapper; ``next_batch`` gives each step's batch. Each
    phase runs under a ``step/<phase>`` profiler label (``_trace_gaps.py`` reads them).
    ``write_after_optimizer_step`` leaves the method's memory write to after the optimizer step,
    as the trainer did until session 8, instead of queueing it (on the condition that the step
    stands) before the host read: what that overlap saves.
    """
    optimizer = torch.optim.SGD(
        [p for p in method.parameters() if p.requires_grad], lr=0.01, momentum=0.9
    )
    amp = device.type == "cuda"
    method.defer_exactness_check = loss_check  # the check below reads the flag, as the trainer
    # As the trainer's steps between two logged ones (9 in 10 by default): no diagnostics.
    method.wants_metrics = False

    def forward_backward(batch: Batch) -> StepOutput:
        with (
            record_function("step/forward"),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp),
        ):
            out = model(batch)
        with record_function("step/backward"):
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
        return out

    def step() -> None:
        batch = next_batch()
        out = forward_backward(batch)
        if loss_check:
            local = step_flags(out)
            # The trainer's fourth flag (a stop signal seen on this rank): a fill and a concat.
            flag_tensor = all_reduce_sum(torch.cat([local, local.new_zeros(1)]))
            if not write_after_optimizer_step:
                with record_function("step/memory_write"):
                    write_memory_if_step_stands(method, flag_tensor)
            with record_function("step/check"):
                flags = flag_tensor.tolist()
            if flags[1] != 0:  # the timing then includes a second forward and backward
                warnings.warn("a benchmark step was inexact and redone", RuntimeWarning, 2)
                with method.exact_redo():
                    out = forward_backward(batch)
            if flags[0] != 0:
                raise FloatingPointError(f"non-finite loss {float(out.loss)} in the benchmark")
        with record_function("step/optimizer"):
            optimizer.step()
        # Momentum encoders, and LOOK's memory write on one GPU, happen here in the trainer.
        with record_function("step/after_optimizer_step"):
            method.after_optimizer_step(0.5)

    return step
