"""The fused search alone, config by config, timed on the GPU without host waits between phases.

    python benchmarks/search_tune.py --output search_tune.json [--rows 1281167 14197122] \
        [--configs 0 1 27 28] [--prefilter none int8]

For each bank size it builds gpu_step.py's search inputs (random unit rows in bf16, 256 random
128-d queries, k = 200, leave-one-out) and, for each config (positions in
``look.search_triton.KERNEL_CONFIGS``, default all): checks the neighbours against the PyTorch
scan, then times ``--repeats`` searches with CUDA events around each (the four kernels queued
back to back, as in a training step) and reports the median, as ``tune_kernel_config`` does
since session 12 (it timed each phase after a host wait before, which added the launch gaps to
every phase). Unlike the tuner it takes configs by position, keeps the default as it is and
records the bank read and every config's figures. ``--prefilter int8`` times each config also
reading the bank's int8 copy (``QuantizedRows``: half the bytes, candidates re-scored from the
bf16 rows) and records its mean candidates per query next to the exact search's (configs whose
passes are Gluon's are timed on the bf16 bank only: with the copy the Triton passes run).
``--graph-replay`` also times each search recorded once as a CUDA graph and replayed
(``replayed_ms``: one host call instead of the search's launches). ``--variant
36:tile_stride=8,num_stages=4`` (repeatable) also times a config with some fields replaced,
reported under its position with a ``variant`` label, so that a GPU session can try settings
that are no config of the list. ``--fastest-exact ROWS``
prints the position of the fastest exact config at that bank size in a finished ``--output``
file and exits (for benchmarks/gpu_session.sh). Needs CUDA and Triton.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields, replace
from functools import partial
from pathlib import Path

import torch
from _step_benchmark import random_search_inputs

import look.search_triton as search_triton
from look.search import knn_search
from look.search_triton import (
    KERNEL_CONFIGS,
    QuantizedRows,
    SearchKernelConfig,
    fused_knn_search,
    median_call_ms,
)


def exact_search(
    values: torch.Tensor, overflowed: torch.Tensor, exact_values: torch.Tensor
) -> bool:
    """Whether a fused search returned the scan's values without overflowing a buffer."""
    return bool(
        not overflowed.any()
        and torch.allclose(values, exact_values, rtol=0, atol=1e-5, equal_nan=True)
    )


def replayed_figures(
    search: partial[object], exact_values: torch.Tensor, repeats: int, device: torch.device
) -> dict[str, object]:
    """The same search recorded as a CUDA graph and replayed (``set_graph_replay``): its median
    time, whether its values are the scan's, and whether recording failed (then the time is
    the eager search's)."""
    search_triton.set_graph_replay(True)
    try:
        search()  # eager, then recorded
        values, _, overflowed = search()  # replayed
        exact = exact_search(values, overflowed, exact_values)
        ms = median_call_ms(search, repeats, device)
    finally:
        search_triton.set_graph_replay(False)
    return {"replayed_ms": ms, "replayed_exact": exact,
            "graph_failed": search_triton._GRAPH_FALLBACK.failed}  # fmt: skip


def parse_variant(text: str) -> tuple[int, str, SearchKernelConfig]:
    """``POSITION:FIELD=VALUE[,FIELD=VALUE…]`` (e.g. ``36:tile_stride=8,num_stages=4``): the
    config at that position of ``KERNEL_CONFIGS`` with those fields replaced (ints, booleans as
    true/false, strings), and the ``FIELD=VALUE…`` label it is reported under."""
    position_text, _, changes = text.partition(":")
    if not position_text.isdigit() or not changes:
        raise argparse.ArgumentTypeError(
            f"a variant is POSITION:FIELD=VALUE[,FIELD=VALUE...], got {text!r}"
        )
    position = int(position_text)
    if position >= len(KERNEL_CONFIGS):
        raise argparse.ArgumentTypeError(
            f"no config at position {position} (KERNEL_CONFIGS has {len(KERNEL_CONFIGS)})"
        )
    base = KERNEL_CONFIGS[position]
    names = [field.name for field in fields(SearchKernelConfig)]
    replaced: dict[str, object] = {}
    for change in changes.split(","):
        name, _, value = change.partition("=")
        if name not in names or not value:
            raise argparse.ArgumentTypeError(
                f"{change!r} in {text!r}: a SearchKernelConfig field and a value, one of "
                f"{sorted(names)}"
            )
        current = getattr(base, name)  # (the field's type: every field has a value of it)
        if isinstance(current, bool):
            if value not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"{name} takes true or false, got {value!r}")
            replaced[name] = value == "true"
        elif isinstance(current, int):
            try:
                replaced[name] = int(value)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{name} takes an integer, got {value!r}"
                ) from None
        else:
            replaced[name] = value
    return position, changes, replace(base, **replaced)


def config_label(position: int, variant: str | None) -> str:
    """How a timed config is named in the log: its position, and a variant's replaced fields."""
    return f"{position:>2}" + (f" [{variant}]" if variant else "")


def tune_size(
    rows: int,
    args: argparse.Namespace,
    positions: list[int],
    variants: list[tuple[int, str, SearchKernelConfig]] | None = None,
) -> dict[str, object]:
    """Every config's median search time over ``rows`` rows, fastest first, with the bank read;
    ``variants`` (:func:`parse_variant`) are timed after them, reported with their position and
    a ``variant`` label."""
    device = torch.device("cuda")
    bank, query, ids = random_search_inputs(rows, args.queries, device)
    exact = knn_search(query, bank, args.k, query_ids=ids, backend="torch")
    copies = {"none": None, "int8": QuantizedRows.from_memory(bank)}
    results: list[dict[str, object]] = []
    runs = [(position, None, KERNEL_CONFIGS[position]) for position in positions]
    runs += variants or []
    for position, variant, config in runs:
        for prefilter in args.prefilter:
            if prefilter != "none" and config.kernel == "gluon":
                continue  # with the int8 copy the Triton passes run: another config's figure
            search = partial(fused_knn_search, query, bank, args.k, query_ids=ids, config=config,
                             prefilter=copies[prefilter])  # fmt: skip
            about = {"position": position, **asdict(config), "prefilter": prefilter}
            if variant is not None:
                about["variant"] = variant
            try:
                values, _, overflowed = search()
            except Exception as error:  # an unbuildable config is reported, not fatal
                results.append({**about, "error": repr(error)})
                continue
            exact_match = exact_search(values, overflowed, exact.values)
            ms = median_call_ms(search, args.repeats, device)
            phases: dict[str, float] = {}  # (a separate call: this one waits between phases)
            search(timings=phases)
            # A Gluon pass that failed warned and left its work (and every later Gluon
            # config's) to Triton: its time is then the Triton passes'.
            gluon_failed = config.kernel == "gluon" and search_triton._GLUON_FALLBACK.failed
            entry = {**about, "ms": ms, "exact": exact_match, "gluon_failed": gluon_failed,
                     "mean_candidates": phases["mean_candidates"]}  # fmt: skip
            if args.graph_replay:
                entry.update(replayed_figures(search, exact.values, args.repeats, device))
            results.append(entry)
            replayed = f", replayed {entry['replayed_ms']:.3f} ms" if "replayed_ms" in entry else ""
            print(f"{rows:>10} rows, config {config_label(position, variant)} {config} "
                  f"prefilter={prefilter}: "
                  f"{ms:.3f} ms{replayed}, {phases['mean_candidates']:.0f} candidates"
                  + ("" if exact_match else " (NOT EXACT)"))  # fmt: skip
    timed = sorted((r for r in results if "ms" in r), key=lambda r: r["ms"])  # type: ignore[arg-type, return-value]
    read_ms = median_call_ms(bank.sum, args.repeats, device)
    # Read as bf16 pairs: the bank read's own reduction (an int8 sum accumulates in int64 and
    # ran 8x slower than the bank read on an H200, for half the bytes).
    int8_values = copies["int8"].values  # type: ignore[union-attr]
    int8_read_ms = median_call_ms(int8_values.view(torch.bfloat16).sum, args.repeats, device)
    fastest = config_label(timed[0]["position"], timed[0].get("variant")) if timed else None  # type: ignore[arg-type]
    print(f"{rows:>10} rows: bank read {read_ms:.3f} ms (int8 copy {int8_read_ms:.3f} ms); "
          f"fastest config {fastest}")  # fmt: skip
    return {
        "bank_read_ms": read_ms, "int8_copy_read_ms": int8_read_ms, "configs": timed,
        "errors": [r for r in results if "error" in r],
    }  # fmt: skip


def fastest_exact(figures: dict, rows: int) -> int | str:  # type: ignore[type-arg]
    """The position of the fastest config that was exact on the bf16 bank at ``rows`` rows
    (and, if Gluon's, ran its own kernel); "" if none. Variants are left out: a position names
    the config as it is."""
    timed = figures["rows"].get(str(rows), {}).get("configs", [])
    exact = [
        entry for entry in timed
        if entry["exact"] and entry["prefilter"] == "none" and not entry.get("gluon_failed")
        and "variant" not in entry
    ]  # fmt: skip
    return min(exact, key=lambda entry: entry["ms"])["position"] if exact else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_281_167, 14_197_122])
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--configs", type=int, nargs="+", help="positions (default: all)")
    parser.add_argument("--prefilter", nargs="+", choices=["none", "int8"], default=["none"],
                        help="time each config reading the bf16 bank (none), its int8 copy, or both")  # fmt: skip
    parser.add_argument("--graph-replay", action="store_true",
                        help="also time each config's search recorded as a CUDA graph and "
                        "replayed (look.search_triton.set_graph_replay)")  # fmt: skip
    parser.add_argument("--variant", type=parse_variant, action="append", default=[],
                        metavar="POSITION:FIELD=VALUE[,...]",
                        help="also time the config at POSITION with these fields replaced, e.g. "
                        "36:tile_stride=8 (repeatable)")  # fmt: skip
    parser.add_argument("--fastest-exact", type=int, metavar="ROWS",
                        help="print the fastest exact config of --output at ROWS rows, and exit")  # fmt: skip
    args = parser.parse_args()
    if args.fastest_exact is not None:
        print(fastest_exact(json.loads(Path(args.output).read_text()), args.fastest_exact))
        return
    # (no --configs: every config, unless variants alone are asked for)
    positions = args.configs or ([] if args.variant else list(range(len(KERNEL_CONFIGS))))
    figures: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "args": {**vars(args), "variant": [f"{p}:{label}" for p, label, _ in args.variant]},
        "rows": {},
    }
    for rows in args.rows:
        figures["rows"][str(rows)] = tune_size(rows, args, positions, args.variant)  # type: ignore[index]
        Path(args.output).write_text(json.dumps(figures, indent=2))  # (a later size may fail)


if __name__ == "__main__":
    main()
