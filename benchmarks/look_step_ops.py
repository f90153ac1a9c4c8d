"""Operations a LOOK training step issues beyond CE's, counted at PyTorch's dispatcher on CPU.

    python benchmarks/look_step_ops.py --output look_step_ops.json

On a GPU each non-view operation is (at least) one kernel launch, a few microseconds of host time;
where the GPU waits for the host, these launches are the cost. Counted under the accelerator
policy (``look.host_sync.host_reads_are_free`` answers False, as on a GPU), with a small MLP as
backbone and a 4,096-row fp32 bank searched by the chunked scan (the fused search needs a GPU).
Prints and writes: forward and backward operations of a CE, an SL-MLP and a LOOK step, and the
operations of the LOOK loss terms and of one memory write alone.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from look.losses import look_loss_terms
from look.memory import MemoryBank
from look.methods import Batch, MethodContext, build_method

# Operations that only re-describe memory: no kernel.
_VIEWS = {
    "detach", "view", "unsqueeze", "squeeze", "t", "expand", "slice", "select", "permute",
    "_unsafe_view", "alias", "transpose", "as_strided", "reshape", "unbind", "split", "chunk",
    "_reshape_alias", "lift_fresh", "promote_types", "result_type",
}  # fmt: skip
ROWS, CLASSES, BATCH = 4096, 10, 32


class OperationCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name not in _VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


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


def _step_operations(method_cfg: dict[str, Any]) -> dict[str, int]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 64))
    method = build_method(method_cfg, backbone, 64, MethodContext(CLASSES, ROWS))
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
    torch.manual_seed(0)
    bank = MemoryBank(ROWS, 16)
    features = F.normalize(torch.randn(ROWS, 16), dim=1)
    bank.update(torch.arange(ROWS), features, torch.randint(0, CLASSES, (ROWS,)))
    query = F.normalize(torch.randn(BATCH, 16), dim=1).requires_grad_(True)
    labels, ids = torch.randint(0, CLASSES, (BATCH,)), torch.randperm(ROWS)[:BATCH]
    with OperationCounter() as loss:
        look_loss_terms(
            query, labels, bank.features, bank.labels, k=20, temperature=0.1,
            query_indices=ids, memory_valid=bank.valid, chunk_size=1 << 20,
            search_backend="torch",
        )  # fmt: skip
    with OperationCounter() as write:
        bank.update(ids, query.detach(), labels)
    return {
        "look_loss_terms_with_scan": sum(loss.counts.values()),
        "memory_write": sum(write.counts.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    _accelerator_policy()
    report: dict[str, Any] = {"torch": torch.__version__, "batch": BATCH, "rows": ROWS}
    for name, cfg in (
        ("ce", {"name": "ce"}),
        ("sl_mlp", {"name": "sl_mlp"}),
        ("look", {"name": "look", "k": 20, "chunk_size": 1 << 20}),
    ):
        report[name] = _step_operations(cfg)
        print(f"{name}: {report[name]}")
    report["look_parts"] = _loss_and_write_operations()
    print(f"look parts: {report['look_parts']}")
    Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
