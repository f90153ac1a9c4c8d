"""How many candidates the fused search's bound lets through, and how many tiles take the collect
pass's append path, for the random bank and queries of ``gpu_step.py``'s search figures: computed
on CPU in PyTorch, without a GPU, from the kernel's plan.

    python benchmarks/search_candidates.py --output search_candidates.json \
        [--rows 1281167 14197122] [--strides 1 2 4 8] [--block-q 32 64 128 256] [--int8]

For each bank size it draws random unit rows (rounded to bf16, as the bank is stored) and 256
random unit queries (cast to bf16, as the kernel reads them), and computes every similarity in
fp32 chunk by chunk. For each largest bound stride s it then follows
``look.search_triton._search_plan`` (the stride actually used, the bound-pass programs, the tile
maxima each keeps): the bound is the (k + 1)-th largest kept tile maximum (leave-one-out, as in
``gpu_step.py``), lowered by 2**-20 of itself as the collect pass does. It reports the candidates
per query (every similarity at or above the bound) and, for each number of queries per block,
the fraction of (query block, tile) pairs in which some query of the block has a candidate: the
tiles that run the append path. Simplification: the bound pass's last sampled tile counts only
its own rows (the kernel may shift a partial one back over skipped rows). Compare
``mean_candidates`` with the H100's ``fused_phases_ms.mean_candidates`` (session 8: 403 at 1.28M
rows and 808 at 14.2M, s = 4) to check the model.

``--int8`` also models the collect pass reading the bank's int8 copy (``QuantizedRows``): the
same plan, a candidate wherever the approximation (as the kernel scales it) plus its row's own
slack reaches the bound, and a tile appended wherever some query's approximation plus the
widest slack (the largest row error's) does: the kernel's gate. ``int8`` entries take the
bound of the bf16 bound pass (the default), ``int8_bound_pass`` ones that of a bound pass
reading the int8 copy too (tile maxima of the approximations less the widest slack). Compare with ``gpu_step.py --prefilter-step``'s ``int8_mean_candidates``.

``--bins 36 39`` also models the bound of those configs' bound passes of bins (Gluon's,
``look.search_gluon``, and the Triton pass with ``bound_bins``): per program (Gluon: 132 for
256 queries on an H100; Triton: the plan's, 264 per 64-query block), the largest similarity in
each of ``block_n`` bins of rows (bin j: position j of the program's sampled tiles) instead of
its largest tile maxima; ``bins_36`` (etc.) entries give the candidates at that bound and the
tiles appended per block (the Gluon collect pass decides per warpgroup of 64 queries).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from look.search_triton import KERNEL_CONFIGS, QuantizedRows, _quantize_queries, _search_plan

BLOCK_N = KERNEL_CONFIGS[0].block_n
CHUNK_ROWS = 1 << 19  # rows per similarity chunk: 256 × 512k fp32 = 512 MB


def random_bank(rows: int, dim: int, seed: int) -> torch.Tensor:
    """``rows`` random unit rows in bf16 (drawn in chunks to bound the fp32 temporaries)."""
    generator = torch.Generator().manual_seed(seed)
    bank = torch.empty(rows, dim, dtype=torch.bfloat16)
    for start in range(0, rows, CHUNK_ROWS):
        stop = min(rows, start + CHUNK_ROWS)
        bank[start:stop] = F.normalize(torch.randn(stop - start, dim, generator=generator), dim=1)
    return bank


def similarity_chunks(query: torch.Tensor, bank: torch.Tensor):  # type: ignore[no-untyped-def]
    """(first row, similarities) of each chunk of ``CHUNK_ROWS`` rows (a multiple of BLOCK_N)."""
    for start in range(0, bank.shape[0], CHUNK_ROWS):
        yield start, query @ bank[start : start + CHUNK_ROWS].float().T


def int8_bound_chunks(query: torch.Tensor, copy: QuantizedRows):  # type: ignore[no-untyped-def]
    """(first row, approximations, each row's slack, the widest slack) of each chunk, as the
    search reading the int8 ``copy`` forms them: ``(254·hi + lo)`` scaled in fp32, each row's
    error bound ``‖q‖·e_r + slack_q`` and the one with the largest row error (``(B, 1)``)."""
    high, low, terms = _quantize_queries(query.bfloat16(), copy)
    combined = high.double() * 254 + low.double()  # (exact in fp64, as the kernel's int32)
    factor, query_norm, slack, widest = terms
    for start in range(0, copy.values.shape[0], CHUNK_ROWS):
        stop = start + CHUNK_ROWS
        products = (combined @ copy.values[start:stop].double().T).float()
        approx = products * copy.scales[start:stop] * factor[:, None]
        row_slack = query_norm[:, None] * copy.errors[start:stop] + slack[:, None]
        yield start, approx, row_slack, widest[:, None]


def _chunk_tile_maxima(similarities: torch.Tensor) -> torch.Tensor:
    width = similarities.shape[1]
    padded = F.pad(similarities, (0, -width % BLOCK_N), value=float("-inf"))
    return padded.view(similarities.shape[0], -1, BLOCK_N).amax(dim=2)


def tile_maxima(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``(queries, tiles)``: the largest similarity of each tile of BLOCK_N rows."""
    tiles = -(-bank.shape[0] // BLOCK_N)
    maxima = torch.empty(query.shape[0], tiles)
    for start, similarities in similarity_chunks(query, bank):
        chunk = _chunk_tile_maxima(similarities)
        maxima[:, start // BLOCK_N : start // BLOCK_N + chunk.shape[1]] = chunk
    return maxima


def int8_tile_maxima(
    query: torch.Tensor, copy: QuantizedRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(queries, tiles)`` maxima of the approximations less the widest slack (the int8 bound
    pass's lower bounds) and plus it (the collect pass's gate: a tile whose maximum reaches the
    bound takes the append path)."""
    tiles = -(-copy.values.shape[0] // BLOCK_N)
    lower_maxima = torch.empty(query.shape[0], tiles)
    gate_maxima = torch.empty(query.shape[0], tiles)
    for start, approx, _, widest in int8_bound_chunks(query, copy):
        chunk = _chunk_tile_maxima(approx)
        columns = slice(start // BLOCK_N, start // BLOCK_N + chunk.shape[1])
        lower_maxima[:, columns] = chunk - widest
        gate_maxima[:, columns] = chunk + widest
    return lower_maxima, gate_maxima


def bound_for_stride(maxima: torch.Tensor, rows: int, k: int, max_stride: int) -> torch.Tensor:
    """The collect pass's bound per query for the plan with largest stride ``max_stride``."""
    search_k = k + 1  # leave-one-out
    config = dataclasses.replace(KERNEL_CONFIGS[0], tile_stride=max_stride)
    plan = _search_plan(maxima.shape[0], rows, search_k, config, multiprocessors=132)
    sampled = maxima[:, :: plan.tile_stride]
    assert sampled.shape[1] == plan.sampled_tiles
    # Program p of the bound pass reads sampled tiles p, p + P, … and keeps its bound_keep largest.
    programs = plan.bound_programs
    per_program = -(-plan.sampled_tiles // programs)
    grid = F.pad(sampled, (0, programs * per_program - sampled.shape[1]), value=float("-inf"))
    grid = grid.view(maxima.shape[0], per_program, programs)  # [:, i, p] = tile p + i·P
    kept = grid.topk(min(plan.bound_keep, per_program), dim=1).values.flatten(1)
    bound = kept.topk(search_k, dim=1).values[:, -1]
    return bound - bound.abs() * 2.0**-20


def bin_bound(
    query: torch.Tensor, bank: torch.Tensor, k: int, max_stride: int, config_index: int
) -> torch.Tensor:
    """The collect pass's bound per query after a bound pass of bins
    (``KERNEL_CONFIGS[config_index]``: a Gluon config, ``look.search_gluon``, or a Triton one
    with ``bound_bins``): per program, the largest similarity of each of ``block_n`` bins (bin
    j: the rows at position j of the program's sampled tiles), on an H100's 132 SMs; the
    (k + 1)-th largest bin, widened as the kernel widens it."""
    from look.search_gluon import gluon_grid

    config = dataclasses.replace(KERNEL_CONFIGS[config_index], tile_stride=max_stride)
    assert config.block_n == BLOCK_N, "the model's tiles are BLOCK_N rows"
    assert config.kernel == "gluon" or config.bound_bins, "a config whose bound pass keeps bins"
    batch, rows, search_k = query.shape[0], bank.shape[0], k + 1
    plan = _search_plan(batch, rows, search_k, config, multiprocessors=132)
    if config.kernel == "gluon":  # one program per SM over all query blocks
        programs = gluon_grid(batch, plan.sampled_tiles, config.gluon_groups, 132)[2]
    else:
        programs = plan.bound_programs
    bins = torch.full((batch, programs * BLOCK_N), float("-inf"))
    for start, similarities in similarity_chunks(query, bank):
        width = similarities.shape[1]
        tiles = F.pad(similarities, (0, -width % BLOCK_N), value=float("-inf"))
        tiles = tiles.view(batch, -1, BLOCK_N)
        tile_index = start // BLOCK_N + torch.arange(tiles.shape[1])
        sampled = tile_index % plan.tile_stride == 0
        program = (tile_index[sampled] // plan.tile_stride) % programs
        columns = (program[:, None] * BLOCK_N + torch.arange(BLOCK_N)).flatten()
        bins.scatter_reduce_(1, columns.expand(batch, -1), tiles[:, sampled].flatten(1), "amax")
    bound = bins.topk(search_k, dim=1).values[:, -1]
    return bound - bound.abs() * 2.0**-20


def candidate_figures(
    query: torch.Tensor, chunks: object, maxima: torch.Tensor, bounds: dict[int, torch.Tensor],
    block_qs: list[int],
) -> dict[int, dict[str, object]]:  # fmt: skip
    """Candidates per query (one more pass over the similarities, or the int8 search's upper
    bounds: ``chunks`` yields ``(first row, values)``) and appended tile fractions (``maxima``:
    the tile maxima of those values)."""
    counts = {stride: torch.zeros(query.shape[0], dtype=torch.int64) for stride in bounds}
    for _, similarities in chunks:  # type: ignore[attr-defined]
        for stride, bound in bounds.items():
            counts[stride] += (similarities >= bound[:, None]).sum(dim=1)
    figures: dict[int, dict[str, object]] = {}
    for stride, bound in bounds.items():
        has_candidate = maxima >= bound[:, None]  # (queries, tiles)
        appended = {}
        for block_q in block_qs:
            blocks = has_candidate.view(-1, block_q, has_candidate.shape[1]).any(dim=1)
            appended[str(block_q)] = float(blocks.float().mean())
        figures[stride] = {
            "mean_candidates": float(counts[stride].float().mean()),
            "max_candidates": int(counts[stride].max()),
            "appended_tile_frac": appended,
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_281_167, 14_197_122])
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--block-q", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--int8", action="store_true", help="also model the int8 copy's search")
    parser.add_argument(
        "--bins", type=int, nargs="+", default=[], metavar="CONFIG",
        help="also model the bound of the bound pass of bins of KERNEL_CONFIGS[CONFIG] (a Gluon "
        "config, or a Triton one with bound_bins)",
    )  # fmt: skip
    args = parser.parse_args()
    if any(args.queries % block_q for block_q in args.block_q):
        parser.error("--queries must be a multiple of every --block-q")
    torch.manual_seed(0)
    query = F.normalize(torch.randn(args.queries, args.dim), dim=1).bfloat16().float()
    results: dict[str, object] = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "queries": args.queries,
        "k": args.k,
        "block_n": BLOCK_N,
        "rows": {},
    }
    for rows in args.rows:
        start = time.perf_counter()
        bank = random_bank(rows, args.dim, seed=rows)
        maxima = tile_maxima(query, bank)
        bounds = {s: bound_for_stride(maxima, rows, args.k, s) for s in args.strides}
        figures = candidate_figures(
            query, similarity_chunks(query, bank), maxima, bounds, args.block_q
        )
        int8_figures: dict[tuple[str, int], dict[str, object]] = {}
        if args.bins:  # the same candidates test, the bins' bound
            bin_bounds = {
                (f"bins_{config}", stride): bin_bound(query, bank, args.k, stride, config)
                for config in args.bins for stride in args.strides
            }  # fmt: skip
            int8_figures.update(candidate_figures(  # type: ignore[arg-type]
                query, similarity_chunks(query, bank), maxima, bin_bounds, args.block_q  # type: ignore[arg-type]
            ))  # fmt: skip
        if args.int8:
            # Two bounds for the int8 collect pass: from the bound pass reading the bf16 rows
            # (the default) and from one reading the int8 copy too (config.int8_bound_pass).
            copy = QuantizedRows.from_memory(bank)
            int8_copy = {  # the rows' error bounds: the largest one widens the gate
                "error_bound": float(copy.error_bound),
                "mean_row_error": float(copy.errors.mean()),
            }
            print(f"{rows:>10} rows, int8 copy: row error bound {int8_copy['error_bound']:.4f} "
                  f"at most, {int8_copy['mean_row_error']:.4f} on average")  # fmt: skip
            lower_maxima, gate_maxima = int8_tile_maxima(query, copy)
            int8_bounds: dict[tuple[str, int], torch.Tensor] = {}
            for stride in args.strides:
                int8_bounds["int8", stride] = bounds[stride]
                int8_bounds["int8_bound_pass", stride] = bound_for_stride(
                    lower_maxima, rows, args.k, stride
                )
            upper_chunks = (
                (start, approx + row_slack)
                for start, approx, row_slack, _ in int8_bound_chunks(query, copy)
            )
            int8_figures.update(candidate_figures(  # type: ignore[arg-type]
                query, upper_chunks, gate_maxima, int8_bounds, args.block_q  # type: ignore[arg-type]
            ))  # fmt: skip
            del copy, lower_maxima, gate_maxima
        entry = {}
        for stride, values in figures.items():
            config = dataclasses.replace(KERNEL_CONFIGS[0], tile_stride=stride)
            used = _search_plan(args.queries, rows, args.k + 1, config, multiprocessors=132)
            entry[str(stride)] = {"stride_used": used.tile_stride, **values}
            appended = ", ".join(
                f"{block_q} queries {fraction:.1%}"
                for block_q, fraction in values["appended_tile_frac"].items()  # type: ignore[union-attr]
            )
            print(
                f"{rows:>10} rows, s <= {stride} (used {used.tile_stride}): "
                f"{values['mean_candidates']:.0f} candidates per query "
                f"(max {values['max_candidates']}); tiles appended per block of {appended}"
            )
            for variant in ("int8", "int8_bound_pass", *(f"bins_{c}" for c in args.bins)):
                if (variant, stride) not in int8_figures:
                    continue
                entry[str(stride)][variant] = int8 = int8_figures[variant, stride]
                appended = ", ".join(f"{block_q} queries {fraction:.1%}" for block_q, fraction
                                     in int8["appended_tile_frac"].items())  # type: ignore[union-attr]  # fmt: skip
                print(f"{rows:>10} rows, s <= {stride}, {variant}: "
                      f"{int8['mean_candidates']:.0f} candidates per query "
                      f"(max {int8['max_candidates']}); tiles appended per block of {appended}")  # fmt: skip
        results["rows"][str(rows)] = {  # type: ignore[index]
            **({"int8_copy": int8_copy} if args.int8 else {}),
            "strides": entry,
            "seconds": time.perf_counter() - start,
        }
        del bank, maxima
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
