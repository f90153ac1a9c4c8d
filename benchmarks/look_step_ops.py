"""Operations a LOOK training step issues beyond CE's, counted at PyTorch's dispatcher on CPU.

    python benchmarks/look_step_ops.py --output look_step_ops.json

On a GPU each operation that is not a view or an allocation is (at least) one kernel, a few
microseconds of GPU time whatever it computes, and a launch; these add up to what LOOK costs
beyond its search (docs/results.md). Counted under the accelerator policy (``look.host_sync.host_reads_are_free``
answers False, as on a GPU), with a small MLP as backbone and a 4,096-row fp32 bank searched by
the chunked scan (the fused search needs a GPU). The fused loss terms run through Triton's CPU
interpreter (this script sets ``TRITON_INTERPRET=1``); each of their launches counts as one
operation. Prints and writes: forward and backward operations of a CE, an SL-MLP and a LOOK step
(with the fused loss terms, and with the loss terms in PyTorch) as the trainer takes the steps it
does not log (no diagnostic metrics), of a logged CE and LOOK step, and the operations of the LOOK
loss terms, of one memory write (fp32; bf16 with and without the int8 copy of
``method.search_prefilter=int8``) and of one fused search (the GPU's, here in the interpreter)
alone.
"""

from __future__ import annotations

import os

# Before Triton is imported (it reads this when the kernels are defined).
os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import collections
import importlib
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import look.losses.look_terms_triton as fused_terms
import look.search_triton as fused_search
from look.losses import look_loss_terms
from look.memory import MemoryBank
from look.methods import Batch, MethodContext, build_method
from look.search import knn_search_deferred

# Operations that launch no kernel on a GPU: views, allocations.
_NO_KERNEL = {
    "detach", "view", "unsqueeze", "squeeze", "t", "expand", "slice", "select", "permute",
    "_unsafe_view", "alias", "transpose", "as_strided", "reshape", "unbind", "split", "chunk",
    "_reshape_alias", "lift_fresh", "promote_types", "result_type", "empty", "empty_like",
    "empty_strided", "new_empty",
    # a Python number wrapped for an op (torch.where(mask, x, 0.0)): a CPU scalar, no kernel
    "scalar_tensor",
}  # fmt: skip
ROWS, CLASSES, BATCH = 4096, 10, 32


class OperationCounter(TorchDispatchMode):
    """PyTorch operations that launch kernels, and launches of the fused loss-term kernels."""

    active: ClassVar[list[OperationCounter]] = []

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.paused = False  # inside a kernel launch: the interpreter's own tensor work

    def __enter__(self) -> OperationCounter:
        OperationCounter.active.append(self)
        return super().__enter__()  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        OperationCounter.active.pop()
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name not in _NO_KERNEL and not self.paused:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class _CountedKernel:
    """A Triton kernel whose launches count in the active :class:`OperationCounter`."""

    def __init__(self, name: str, kernel: Any) -> None:
        self.name, self.kernel = name, kernel

    def __getitem__(self, grid: Any) -> Any:
        launch = self.kernel[grid]

        def counted(*args: Any, **kwargs: Any) -> Any:
            if not OperationCounter.active:
                return launch(*args, **kwargs)
            counter = OperationCounter.active[-1]
            counter.counts[f"triton:{self.name}"] += 1
            counter.paused = True
            try:
                return launch(*args, **kwargs)
            finally:
                counter.paused = False

        return counted


def _count_fused_kernel_launches() -> None:
    for module, name in (
        (fused_terms, "_terms_forward_kernel"),
        (fused_terms, "_terms_backward_kernel"),
        (fused_search, "_knn_tiles_kernel"),
        (fused_search, "_kth_largest_kernel"),
        (fused_search, "_select_candidates_kernel"),
    ):
        setattr(module, name, _CountedKernel(name, getattr(module, name)))


def _fused_search_operations() -> int:
    """Operations of one fused search as a LOOK step calls it (deferred: no host read), the two
    kernel passes included; fp16 rows, as the interpreter has no bf16."""
    generator = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(8_000, 16, generator=generator), dim=1).half()
    valid = torch.rand(8_000, generator=generator) > 0.1
    query = F.normalize(torch.randn(BATCH, 16, generator=generator), dim=1)
    ids = torch.randint(0, 8_000, (BATCH,), generator=generator)
    with OperationCounter() as search:
        pending = knn_search_deferred(
            query, memory, 20, query_ids=ids, memory_valid=valid, backend="triton"
        )
        if pending.overflowed is not None:
            pending.overflowed.any()  # what the trainer reads, with its own flags
    return sum(search.counts.values())


def _accelerator_policy() -> None:
    modules = ("look.search", "look.losses.look_loss", "look.memory", "look.sharded",
               "look.methods.look")  # fmt: skip
    for name in modules:
        importlib.import_module(name).host_reads_are_free = lambda device: False  # type: ignore[attr-defined]


def _batch(seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return Batch(
        views=[torch.randn(BATCH, 3, 4, 4, generator=generator)],
        labels=torch.randint(0, CLASSES, (BATCH,), generator=generator),
        indices=torch.randperm(ROWS, generator=generator)[:BATCH],
    )


def _step_operations(method_cfg: dict[str, Any], *, logged: bool = False) -> dict[str, int]:
    """A step that is not logged (the trainer's 9 in 10: no diagnostics), or one that is."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 64))
    method = build_method(method_cfg, backbone, 64, MethodContext(CLASSES, ROWS))
    method.wants_metrics = logged
    method(_batch(0)).loss.backward()  # warm (a first write fills part of a bank)
    method.after_optimizer_step(0.5)
    with OperationCounter() as forward:
        out = method(_batch(1))
    with OperationCounter() as backward:
        out.loss.backward()
    with OperationCounter() as after_step:
        method.after_optimizer_step(0.5)
    return {
        "forward": sum(forward.counts.values()),
        "backward": sum(backward.counts.values()),
        "after_optimizer_step": sum(after_step.counts.values()),
    }


def _loss_and_write_operations() -> dict[str, int]:
    """Forward and backward operations of the loss terms (fused and in PyTorch) and of a write."""
    torch.manual_seed(0)
    bank = MemoryBank(ROWS, 16)
    features = F.normalize(torch.randn(ROWS, 16), dim=1)
    bank.update(torch.arange(ROWS), features, torch.randint(0, CLASSES, (ROWS,)))
    query = F.normalize(torch.randn(BATCH, 16), dim=1).requires_grad_(True)
    labels, ids = torch.randint(0, CLASSES, (BATCH,)), torch.randperm(ROWS)[:BATCH]
    counts: dict[str, int] = {}
    for suffix, fused in (("", True), ("_pytorch_terms", False)):
        with fused_terms.fused_terms_enabled(fused):
            with OperationCounter() as loss:
                terms = look_loss_terms(
                    query, labels, bank.features, bank.labels, k=20, temperature=0.1,
                    query_indices=ids, memory_valid=bank.valid, chunk_size=1 << 20,
                    search_backend="torch",
                )  # fmt: skip
            with OperationCounter() as backward:
                terms.loss.sum().backward()
        counts[f"look_loss_terms_with_scan{suffix}"] = sum(loss.counts.values())
        counts[f"look_loss_terms_backward{suffix}"] = sum(backward.counts.values())
    with OperationCounter() as write:
        bank.update(ids, query.detach(), labels)
    counts["memory_write"] = sum(write.counts.values())
    # The same write to a bf16 bank that keeps an int8 copy for the fused search (the copy built
    # before counting, as after a run's first search).
    int8_bank = MemoryBank(ROWS, 16, dtype="bfloat16", int8_prefilter=True)
    int8_bank.update(torch.arange(ROWS), features, torch.randint(0, CLASSES, (ROWS,)))
    int8_bank.search_prefilter()
    with OperationCounter() as write:
        int8_bank.update(ids, query.detach(), labels)
    counts["memory_write_bf16_with_int8_copy"] = sum(write.counts.values())
    plain_bank = MemoryBank(ROWS, 16, dtype="bfloat16")
    plain_bank.update(torch.arange(ROWS), features, torch.randint(0, CLASSES, (ROWS,)))
    with OperationCounter() as write:
        plain_bank.update(ids, query.detach(), labels)
    counts["memory_write_bf16"] = sum(write.counts.values())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    _accelerator_policy()
    _count_fused_kernel_launches()
    report: dict[str, Any] = {"torch": torch.__version__, "batch": BATCH, "rows": ROWS}
    look_cfg = {"name": "look", "k": 20, "chunk_size": 1 << 20}
    for name, cfg, fused, logged in (
        ("ce", {"name": "ce"}, True, False),
        ("ce_logged", {"name": "ce"}, True, True),
        ("sl_mlp", {"name": "sl_mlp"}, True, False),
        ("look", look_cfg, True, False),
        ("look_logged", look_cfg, True, True),
        ("look_pytorch_terms", look_cfg, False, False),
    ):
        with fused_terms.fused_terms_enabled(fused):
            report[name] = _step_operations(cfg, logged=logged)
        print(f"{name}: {report[name]}")
    report["look_parts"] = _loss_and_write_operations()
    if fused_search.triton_available():
        report["look_parts"]["fused_search"] = _fused_search_operations()
    print(f"look parts: {report['look_parts']}")
    Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
