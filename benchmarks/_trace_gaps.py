"""Where the GPU waits in a profiled step: idle stretches between kernels in a
``torch.profiler`` Chrome trace, each attributed to the host work that ended it.

A step is slower than the sum of its kernels when the GPU runs out of queued work: after a host
read (the GPU drains, then waits for the host's next launches) or while the host launches many
small kernels one by one. The kernel that ends an idle stretch was launched by some host
operation (linked by the trace's ``correlation`` id); that operation, and the benchmark's phase
label around it (``torch.profiler.record_function``), name what the GPU waited for.

    python benchmarks/_trace_gaps.py trace_look.json.gz       # prints the summary
"""

from __future__ import annotations

import bisect
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

# Device activity in a Chrome trace of torch.profiler (kernels, copies, memsets).
_DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def load_trace(path: Path) -> list[dict[str, Any]]:
    """The events of a Chrome trace written by ``profiler.export_chrome_trace`` (gzipped or not)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:  # type: ignore[operator]
        return json.load(handle)["traceEvents"]


def _enclosing(spans: list[tuple[float, float, str]], starts: list[float], at: float) -> list[str]:
    """Names of the spans containing time ``at``, outermost first (spans sorted by start)."""
    names = []
    for position in range(bisect.bisect_right(starts, at) - 1, -1, -1):
        start, end, name = spans[position]
        if start <= at <= end:
            names.append((start, name))
    return [name for _, name in sorted(names)]


def idle_gaps(
    events: list[dict[str, Any]], *, min_gap_us: float = 10.0, phase_prefix: str = "step/"
) -> dict[str, Any]:
    """Busy and idle device time between the first and the last device event, and the idle
    stretches longer than ``min_gap_us``, largest first, each with the host operation that
    launched the kernel ending it (its innermost ``aten::`` op and the phase label whose name
    starts with ``phase_prefix``). Idle time is also summed by phase."""
    device = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e)
        for e in events
        if e.get("cat") in _DEVICE_CATEGORIES and e.get("ph") == "X"
    )
    if not device:
        raise ValueError("the trace holds no GPU kernel, copy or memset (a CPU-only profile?)")
    launches = {
        e["args"]["correlation"]: float(e["ts"])
        for e in events
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    host_spans = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), str(e["name"]))
        for e in events
        if e.get("cat") in ("cpu_op", "user_annotation") and e.get("ph") == "X"
    )
    host_starts = [span[0] for span in host_spans]

    busy, gaps = 0.0, []
    frontier = device[0][0]
    for start, end, event in device:
        if start > frontier and start - frontier >= min_gap_us:
            launched_at = launches.get(event.get("args", {}).get("correlation"))
            stack = [] if launched_at is None else _enclosing(host_spans, host_starts, launched_at)
            phases = [name for name in stack if name.startswith(phase_prefix)]
            ops = [name for name in stack if name.startswith("aten::")]
            gaps.append({
                "idle_us": start - frontier,
                "phase": phases[-1] if phases else None,
                "host_op": ops[-1] if ops else (stack[-1] if stack else None),
                "next_kernel": str(event["name"])[:80],
            })  # fmt: skip
        busy += max(0.0, end - max(start, frontier))
        frontier = max(frontier, end)
    span = frontier - device[0][0]
    by_phase: dict[str, float] = defaultdict(float)
    for gap in gaps:
        by_phase[str(gap["phase"])] += gap["idle_us"]
    gaps.sort(key=lambda gap: -gap["idle_us"])
    return {
        "span_ms": span / 1000.0,
        "busy_ms": busy / 1000.0,
        "idle_ms": (span - busy) / 1000.0,
        "idle_ms_by_phase": {
            k: v / 1000.0 for k, v in sorted(by_phase.items(), key=lambda i: -i[1])
        },
        "largest_gaps": gaps[:15],
    }


def format_summary(name: str, summary: dict[str, Any]) -> str:
    lines = [
        f"{name}: {summary['span_ms']:.2f} ms from first to last kernel, "
        f"GPU busy {summary['busy_ms']:.2f} ms, idle {summary['idle_ms']:.2f} ms",
        "  idle by phase: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in summary["idle_ms_by_phase"].items()),
    ]
    for gap in summary["largest_gaps"][:8]:
        lines.append(
            f"  {gap['idle_us']:8.1f} us idle before {gap['next_kernel'][:40]!r} "
            f"(launched by {gap['host_op']} in {gap['phase']})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(format_summary(argument, idle_gaps(load_trace(Path(argument)))))
