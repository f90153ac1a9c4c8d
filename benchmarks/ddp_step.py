"""Replicated vs sharded LOOK memory under DDP: step time, loss time and bank memory per rank.

    torchrun --nproc-per-node 8 benchmarks/ddp_step.py --output ddp_step.json       # 8 GPUs, NCCL
    torchrun --nproc-per-node 2 benchmarks/ddp_step.py --device cpu --backbone look_cnn_small \
        --image-size 28 --batch-size 64 --rows 60000 --k 200 --output ddp_cpu.json  # gloo

For each memory (``bank``: every rank holds all N rows and the global batch is gathered into it;
``sharded_bank``: each of the W ranks holds N/W rows, every rank's queries search every shard and
the partial top-k lists are merged), it times with synthetic images and a bank of random unit rows:

- a LOOK training step as the trainer runs it under DDP (forward with the loss and the memory
  update, the trainer's finite-loss check, backward with the gradient all-reduce, SGD step);
- the loss alone (search, merge and collectives, forward and backward) on random embeddings.

Each figure is the median over ``--steps`` repetitions (after ``--warmup`` ones), each started
together on all ranks (a barrier), and the slowest rank's median is reported, since it sets the
pace. Also reported: the bank's bytes per rank and, on CUDA, the peak memory per rank. Rank 0
prints the table and writes ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _step_benchmark import median_ms, trainer_step

from look.engine.distributed import (
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    wrap_ddp,
)
from look.losses import look_loss_terms
from look.methods import Batch, Method, MethodContext, build_method
from look.models import create_backbone
from look.sharded import ShardedMemoryBank, sharded_look_loss_terms

FILL_CHUNK_ROWS = 1 << 18


def _max_over_ranks(value: float, device: torch.device) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _fill_random_bank(method: Method, rows: int, classes: int, device: torch.device) -> None:
    """Every row of the whole bank gets a random unit vector and label, the same on every rank
    (chunk ``c`` of the bank is drawn from seed ``c``); a sharded rank keeps its own rows."""
    memory = method.memory
    first, last = (
        (memory.shard_start, memory.shard_stop)
        if isinstance(memory, ShardedMemoryBank)
        else (0, rows)
    )
    with torch.no_grad():
        for chunk_start in range(0, rows, FILL_CHUNK_ROWS):
            chunk_stop = min(chunk_start + FILL_CHUNK_ROWS, rows)
            lo, hi = max(first, chunk_start), min(last, chunk_stop)
            if lo >= hi:
                continue
            generator = torch.Generator().manual_seed(chunk_start // FILL_CHUNK_ROWS)
            features = torch.randn(chunk_stop - chunk_start, memory.dim, generator=generator)
            labels = torch.randint(0, classes, (chunk_stop - chunk_start,), generator=generator)
            local = slice(lo - first, hi - first)
            piece = slice(lo - chunk_start, hi - chunk_start)
            memory.features[local] = F.normalize(features[piece], dim=1).to(
                device=device, dtype=memory.features.dtype
            )
            memory.labels[local] = labels[piece].to(device)
            memory.ids[local] = torch.arange(lo, hi, device=device)
            memory.valid[local] = True


def _look_step(
    method: Method, model: torch.nn.Module, args: argparse.Namespace, device: torch.device
) -> Callable[[], None]:
    generator = torch.Generator().manual_seed(1000 + get_rank())

    def next_batch() -> Batch:
        size = (args.batch_size, 3, args.image_size, args.image_size)
        return Batch(
            views=[torch.randn(size, generator=generator)],
            labels=torch.randint(0, args.classes, (args.batch_size,), generator=generator),
            indices=torch.randint(0, args.rows, (args.batch_size,), generator=generator),
        ).to(device)

    return trainer_step(method, model, device, next_batch)


def _loss_only(
    method: Method, args: argparse.Namespace, device: torch.device
) -> Callable[[], None]:
    memory = method.memory
    generator = torch.Generator().manual_seed(2000 + get_rank())
    embeddings = F.normalize(torch.randn(args.batch_size, memory.dim, generator=generator), dim=1)
    embeddings = embeddings.to(device)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=generator).to(device)
    indices = torch.randint(0, args.rows, (args.batch_size,), generator=generator).to(device)

    def run() -> None:
        query = embeddings.clone().requires_grad_(True)
        if isinstance(memory, ShardedMemoryBank):
            terms = sharded_look_loss_terms(
                query, labels, memory, k=args.k, temperature=0.1, query_indices=indices
            )
        else:
            terms = look_loss_terms(
                query, labels, memory.features, memory.labels, k=args.k, temperature=0.1,
                query_indices=indices, memory_valid=memory.valid,
            )  # fmt: skip
        terms.loss.sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256, help="per rank")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--memory-dtype", default="bfloat16")
    parser.add_argument("--memories", nargs="+", default=["bank", "sharded_bank"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    device = init_distributed(args.device)
    world_size, rank = get_world_size(), get_rank()
    cuda = device.type == "cuda"
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "world_size": world_size,
        "backend": dist.get_backend() if is_distributed() else None,
        "args": vars(args),
        "memories": {},
    }
    for memory_kind in args.memories:
        torch.manual_seed(0)  # the same initial weights on every rank, as DDP expects
        backbone, feature_dim = create_backbone(args.backbone, small_stem=args.image_size < 64)
        method_cfg = {
            "name": "look", "k": args.k, "memory": memory_kind,
            "memory_dtype": args.memory_dtype,
        }  # fmt: skip
        # The per-rank batch, as the trainer passes it: the replicated write then reads nothing
        # on the host and follows the optimizer step.
        ctx = MethodContext(
            num_classes=args.classes, num_samples=args.rows, local_batch_size=args.batch_size
        )
        method = build_method(method_cfg, backbone, feature_dim, ctx).to(device).train()
        _fill_random_bank(method, args.rows, args.classes, device)
        model: torch.nn.Module = wrap_ddp(method, device) if is_distributed() else method
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step_ms = median_ms(
            _look_step(method, model, args, device), args.steps, args.warmup, device
        )
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
        loss_ms = median_ms(_loss_only(method, args, device), args.steps, args.warmup, device)
        entry = {
            "step_ms": _max_over_ranks(step_ms, device),
            "loss_ms": _max_over_ranks(loss_ms, device),
            "bank_mb_per_rank": _max_over_ranks(method.memory.memory_bytes() / 2**20, device),
            "peak_mb_per_rank": _max_over_ranks(peak_mb, device) if cuda else None,
        }
        report["memories"][memory_kind] = entry
        if rank == 0:
            print(
                f"W={world_size} {memory_kind:>12}: step {entry['step_ms']:.1f} ms, loss "
                f"{entry['loss_ms']:.2f} ms, bank {entry['bank_mb_per_rank']:.1f} MB per rank",
                flush=True,
            )
        del model, method
    if rank == 0:
        Path(args.output).write_text(json.dumps(report, indent=2))
    cleanup_distributed()


if __name__ == "__main__":
    main()
