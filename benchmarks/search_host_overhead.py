"""Host time of one fused search: what the CPU spends queuing it, not what the GPU computes.

Why: a search timed alone from an idle GPU (CUDA events, ``search_tune.py``) counts the time
the GPU waits for the host to queue each kernel. At 1.28M rows the H100 ran the two passes
in ~0.6 ms of a ~1.0 ms search (session 12), so the host work before the collect pass is
launched shows in the search-alone figure.

- ``--device cuda``: real searches; each call timed on the host from an idle GPU, without
  waiting for its kernels (they run after the call returns): Python, PyTorch's launches and
  Triton's launchers.
- ``--device cpu`` (no GPU): Triton's interpreter path with every search kernel replaced by
  a no-op, so only the library's own Python and PyTorch's CPU ops are timed (Triton's
  launchers are not), as a figure to compare changes of the host code with.

    python benchmarks/search_host_overhead.py --device cpu --output X.json
    python benchmarks/search_host_overhead.py --device cuda --graph-replay --output X.json

``--graph-replay`` times searches replayed from their CUDA graph recording
(``look.search_triton.set_graph_replay``): one host call for all the kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--config", type=int, default=None, help="a KERNEL_CONFIGS position")
    parser.add_argument("--graph-replay", action="store_true",
                        help="searches recorded once as a CUDA graph and replayed (on CPU: a "
                        "replay that does nothing, so the host path around it is timed)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        # Read by Triton when the kernels are defined: before look.search_triton is imported.
        os.environ["TRITON_INTERPRET"] = "1"

    import torch
    import torch.nn.functional as F

    import look.search_triton as search_triton
    from look.search import knn_search_deferred

    device = torch.device(args.device)
    if args.device == "cpu":
        # fp16 (the interpreter has no bf16), and a bank that is never read: the kernels are
        # no-ops, so a small one stands for any size with the same plan.
        dtype = torch.float16

        class _NoLaunch:
            def __getitem__(self, grid: object) -> object:
                return lambda *arguments, **options: None

        for name in ("_knn_tiles_kernel", "_kth_largest_kernel", "_select_candidates_kernel"):
            setattr(search_triton, name, _NoLaunch())
        if args.graph_replay:  # a recording whose replay does nothing: the host path around it

            def record(run: object, device: object) -> object:
                return (lambda: None), run()  # type: ignore[operator]

            search_triton._GRAPH_DEVICE_TYPES = ("cuda", "cpu")
            search_triton._record_cuda_graph = record  # type: ignore[assignment]
        memory = torch.empty(args.rows, args.dim, dtype=dtype)
    else:
        dtype = torch.bfloat16
        memory = F.normalize(torch.randn(args.rows, args.dim, device=device), dim=1).to(dtype)
    if args.graph_replay:
        search_triton.set_graph_replay(True)
    config = None if args.config is None else search_triton.KERNEL_CONFIGS[args.config]
    generator = torch.Generator(device=device).manual_seed(0)
    query = F.normalize(
        torch.randn(args.queries, args.dim, device=device, generator=generator), dim=1
    )
    ids = torch.randint(0, args.rows, (args.queries,), device=device, generator=generator)

    def fused() -> object:
        return search_triton.fused_knn_search(query, memory, args.k, query_ids=ids, config=config)

    def library() -> object:  # the LOOK loss's path (its overflow check is read later)
        return knn_search_deferred(query, memory, args.k, query_ids=ids, backend="triton")

    figures: dict[str, object] = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "args": {key: str(value) for key, value in vars(args).items()},
        "kernels": "no-ops (interpreter path)" if args.device == "cpu" else "real",
        "graph_replay": args.graph_replay,
    }
    for name, call in (("fused_knn_search_us", fused), ("knn_search_deferred_us", library)):
        for _ in range(10):  # compile, warm the allocator
            call()
        times = []
        for _ in range(args.calls):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            call()
            times.append(1e6 * (time.perf_counter() - began))
        figures[name] = statistics.median(times)
        # The fastest call: the code's own cost, least disturbed by the rest of the machine.
        figures[name.replace("_us", "_min_us")] = min(times)
        print(f"{name}: {figures[name]:.1f} µs (median of {args.calls}; fastest "
              f"{min(times):.1f} µs)", flush=True)  # fmt: skip
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
