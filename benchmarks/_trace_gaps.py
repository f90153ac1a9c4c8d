"""Where a profiled step spends GPU time and where the GPU waits, from ``torch.profiler`` Chrome
traces: busy time per phase and per host operation, the idle stretches between kernels, and the
difference between two traces (a LOOK step against a CE step).

A step is slower than the sum of its kernels when the GPU runs out of queued work: after a host
read (the GPU drains, then waits for the host's next launches) or while the host launches many
small kernels one by one. Each kernel was launched by some host operation (linked by the trace's
``correlation`` id); that operation (the innermost ``aten::`` op on the launching thread) and the
benchmark's phase label around it (``torch.profiler.record_function("step/...")`` on the main
thread) name what the GPU worked on, or waited for.

    python benchmarks/_trace_gaps.py trace_look.json.gz                       # one trace
    python benchmarks/_trace_gaps.py trace_look.json.gz --versus trace_ce.json.gz --steps 2
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

# Device activity in a Chrome trace of torch.profiler (kernels, copies, memsets).
_DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
_HOST_CATEGORIES = {"cpu_op", "user_annotation"}
# Launches: the runtime API (PyTorch's kernels) and the driver API (cuBLAS's, Triton's).
_LAUNCH_CATEGORIES = {"cuda_runtime", "cuda_driver"}


def load_trace(path: Path) -> list[dict[str, Any]]:
    """The events of a Chrome trace written by ``profiler.export_chrome_trace`` (gzipped or not)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:  # type: ignore[operator]
        return json.load(handle)["traceEvents"]


def _span(event: dict[str, Any]) -> tuple[float, float]:
    start = float(event["ts"])
    return start, start + float(event.get("dur", 0.0))


def _launch_context(
    events: list[dict[str, Any]], phase_prefix: str
) -> dict[Any, tuple[str | None, str | None]]:
    """``correlation id -> (phase, host op)`` of every kernel launch: the phase label open at the
    launch (on any thread: the backward pass launches from autograd's own thread) and the
    innermost ``aten::`` op open on the launching thread (one sweep per thread)."""
    phases = sorted(
        (*_span(e), str(e["name"]))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in _HOST_CATEGORIES
        and str(e.get("name", "")).startswith(phase_prefix)
    )  # fmt: skip
    phase_starts = [start for start, _, _ in phases]

    def phase_at(time: float) -> str | None:  # phase labels do not overlap
        position = bisect.bisect_right(phase_starts, time) - 1
        if position >= 0 and time <= phases[position][1]:
            return phases[position][2]
        return None

    per_thread: dict[Any, list[tuple[float, int, float, Any]]] = defaultdict(list)
    for e in events:
        if e.get("ph") != "X":
            continue
        if e.get("cat") == "cpu_op" and str(e.get("name", "")).startswith("aten::"):
            start, end = _span(e)
            per_thread[e.get("tid")].append((start, 0, end, str(e["name"])))
        elif e.get("cat") in _LAUNCH_CATEGORIES and "correlation" in e.get("args", {}):
            per_thread[e.get("tid")].append((float(e["ts"]), 1, 0.0, e["args"]["correlation"]))
    context: dict[Any, tuple[str | None, str | None]] = {}
    for items in per_thread.values():
        items.sort(key=lambda item: (item[0], item[1]))
        open_ops: list[tuple[float, str]] = []  # (end, name), innermost last
        for time, kind, end, payload in items:
            while open_ops and open_ops[-1][0] < time:
                open_ops.pop()
            if kind == 0:
                open_ops.append((end, payload))
            else:
                context[payload] = (phase_at(time), open_ops[-1][1] if open_ops else None)
    return context


def _device_events(events: list[dict[str, Any]]) -> list[tuple[float, float, dict[str, Any]]]:
    device = sorted(
        (*_span(e), e) for e in events if e.get("cat") in _DEVICE_CATEGORIES and e.get("ph") == "X"
    )
    if not device:
        raise ValueError("the trace holds no GPU kernel, copy or memset (a CPU-only profile?)")
    return device


def idle_gaps(
    events: list[dict[str, Any]], *, min_gap_us: float = 10.0, phase_prefix: str = "step/"
) -> dict[str, Any]:
    """Busy and idle device time between the first and the last device event, and the idle
    stretches longer than ``min_gap_us``, largest first, each with the host operation that
    launched the kernel ending it and the phase it was launched in. Idle time is also summed by
    phase, and busy time (the kernels' own durations) by phase."""
    device = _device_events(events)
    context = _launch_context(events, phase_prefix)
    busy, gaps = 0.0, []
    busy_by_phase: dict[str, float] = defaultdict(float)
    frontier = device[0][0]
    for start, end, event in device:
        phase, host_op = context.get(event.get("args", {}).get("correlation"), (None, None))
        if start > frontier and start - frontier >= min_gap_us:
            gaps.append({
                "idle_us": start - frontier,
                "phase": phase,
                "host_op": host_op,
                "next_kernel": str(event["name"])[:80],
            })  # fmt: skip
        busy += max(0.0, end - max(start, frontier))
        busy_by_phase[str(phase)] += end - start
        frontier = max(frontier, end)
    span = frontier - device[0][0]
    idle_by_phase: dict[str, float] = defaultdict(float)
    for gap in gaps:
        idle_by_phase[str(gap["phase"])] += gap["idle_us"]
    gaps.sort(key=lambda gap: -gap["idle_us"])

    def in_ms(values: dict[str, float]) -> dict[str, float]:
        return {k: v / 1000.0 for k, v in sorted(values.items(), key=lambda item: -item[1])}

    return {
        "span_ms": span / 1000.0,
        "busy_ms": busy / 1000.0,
        "idle_ms": (span - busy) / 1000.0,
        "busy_ms_by_phase": in_ms(busy_by_phase),
        "idle_ms_by_phase": in_ms(idle_by_phase),
        "largest_gaps": gaps[:15],
    }


def device_time_by_op(
    events: list[dict[str, Any]], *, phase_prefix: str = "step/"
) -> dict[str, Any]:
    """GPU time (µs) and kernel count per launching host op (``aten::…``; a kernel launched
    outside any, e.g. a Triton kernel, is named by itself)."""
    context = _launch_context(events, phase_prefix)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for start, end, event in _device_events(events):
        _, host_op = context.get(event.get("args", {}).get("correlation"), (None, None))
        key = host_op or f"(kernel) {str(event['name'])[:60]}"
        totals[key][0] += end - start
        totals[key][1] += 1
    return {name: {"us": us, "kernels": int(count)} for name, (us, count) in totals.items()}


def difference_by_op(
    events: list[dict[str, Any]], baseline: list[dict[str, Any]], *, steps: int = 1, top: int = 20
) -> list[dict[str, Any]]:
    """Per host op, the GPU time and kernel count per step of ``events`` minus ``baseline``'s
    (both traces of ``steps`` steps), largest time difference first."""
    mine, theirs = device_time_by_op(events), device_time_by_op(baseline)
    rows = []
    for name in set(mine) | set(theirs):
        a, b = (
            mine.get(name, {"us": 0.0, "kernels": 0}),
            theirs.get(name, {"us": 0.0, "kernels": 0}),
        )
        rows.append({
            "host_op": name,
            "ms_per_step": (a["us"] - b["us"]) / 1000.0 / steps,
            "kernels_per_step": (a["kernels"] - b["kernels"]) / steps,
        })  # fmt: skip
    rows.sort(key=lambda row: -abs(row["ms_per_step"]))
    return rows[:top]


def format_summary(name: str, summary: dict[str, Any]) -> str:
    lines = [
        f"{name}: {summary['span_ms']:.2f} ms from first to last kernel, "
        f"GPU busy {summary['busy_ms']:.2f} ms, idle {summary['idle_ms']:.2f} ms",
        "  busy by phase: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in summary["busy_ms_by_phase"].items()),
        "  idle by phase: "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in summary["idle_ms_by_phase"].items()),
    ]
    for gap in summary["largest_gaps"][:8]:
        lines.append(
            f"  {gap['idle_us']:8.1f} us idle before {gap['next_kernel'][:40]!r} "
            f"(launched by {gap['host_op']} in {gap['phase']})"
        )
    return "\n".join(lines)


def format_difference(rows: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {row['ms_per_step']:+8.3f} ms {row['kernels_per_step']:+6.1f} kernels  {row['host_op']}"
        for row in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--versus", type=Path, help="a baseline trace to subtract, per host op")
    parser.add_argument("--steps", type=int, default=1, help="steps in each trace")
    args = parser.parse_args()
    events = load_trace(args.trace)
    print(format_summary(str(args.trace), idle_gaps(events)))
    if args.versus:
        print(f"GPU time per step, {args.trace} minus {args.versus}:")
        print(
            format_difference(difference_by_op(events, load_trace(args.versus), steps=args.steps))
        )


if __name__ == "__main__":
    main()
