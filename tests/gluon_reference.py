"""What the Gluon passes (look.search_gluon) are meant to write, computed in PyTorch from the
same :class:`~look.search_gluon.GluonPass` a launch takes.

Two uses: on CPU it stands in for the kernels (Triton's interpreter cannot run Gluon), so the
search's host side around them (the bins' column count, their k-th largest as the bound, the
collect pass's widened bound, the selections) is checked against the scan
(``tests/search_triton_cases.py``); on a Hopper GPU each real pass is compared with it
(``tests/test_search_gluon_cuda.py``), which says which pass is wrong if a search is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from look.search_gluon import GluonPass
from look.search_triton import _cdiv

# The collect pass lowers a finite bound by this fraction of itself (WIDEN_BOUND, as the
# Triton pass), and turns any other into the lowest finite float.
_WIDEN = 9.5367431640625e-07
_LOWEST = -3.4028234663852886e38


def pass_similarities(gluon_pass: GluonPass) -> Tensor:
    """The products the pass computes: queries × memory rows in fp32 (B × N)."""
    queries, descriptor = gluon_pass.arguments[0], gluon_pass.arguments[1]
    memory = descriptor.base  # type: ignore[attr-defined]
    return queries.float() @ memory.float().T  # type: ignore[union-attr]


def _written_rows(gluon_pass: GluonPass, num_rows: int, device: torch.device) -> Tensor:
    """Rows a pass may count: inside the memory, and marked valid when there is a mask."""
    if not gluon_pass.has_valid:
        return torch.ones(num_rows, dtype=torch.bool, device=device)
    return gluon_pass.arguments[2].bool()  # type: ignore[union-attr]


def reference_bins(gluon_pass: GluonPass, similarities: Tensor) -> Tensor:
    """The bound pass's output columns (B × programs·block_n): column p·block_n + j holds, per
    query, the largest similarity among the rows at position j of program p's tiles (tiles p,
    p + P, … of the sampled ones, each every ``tile_step``-th tile of the memory), -inf where
    it has none inside the memory and valid."""
    arguments = gluon_pass.arguments
    num_rows, num_tiles, tile_step = arguments[9], arguments[13], arguments[14]
    block_n = arguments[1].block_shape[0]  # type: ignore[attr-defined]
    programs = gluon_pass.grid[1]
    device = similarities.device
    tiles_per_program = _cdiv(num_tiles, programs)
    # tile[p, t] = p + t·P (past the sampled tiles: none)
    tile = torch.arange(programs, device=device)[:, None] + programs * torch.arange(
        tiles_per_program, device=device
    )
    rows = tile[:, :, None] * tile_step * block_n + torch.arange(block_n, device=device)
    counted = (tile < num_tiles)[:, :, None] & (rows < num_rows)
    safe_rows = torch.where(counted, rows, 0)
    counted &= _written_rows(gluon_pass, num_rows, device)[safe_rows]
    values = similarities[:, safe_rows]  # B × programs × tiles × block_n
    values = torch.where(counted, values, float("-inf"))
    return values.amax(dim=2).reshape(similarities.shape[0], programs * block_n)


def collect_bound(gluon_pass: GluonPass) -> Tensor:
    """The bound the collect pass compares with, per query (widened as the kernel widens it)."""
    bound = gluon_pass.arguments[3].float()  # type: ignore[union-attr]
    if not gluon_pass.constexprs["WIDEN_BOUND"]:
        return bound
    finite = bound.abs() < float("inf")
    finite_bound = torch.where(finite, bound, 0.0)
    return torch.where(finite, finite_bound - finite_bound.abs() * _WIDEN, _LOWEST)


def reference_gluon_pass(gluon_pass: GluonPass) -> None:
    """Write the pass's outputs as the kernel is meant to (in place, as a launch does).

    Bound pass: the bins (:func:`reference_bins`) into the first programs·block_n columns of
    ``tile_max``. Collect pass: every similarity ``>=`` the widened bound of a row inside the
    memory and valid is appended to its query's buffer, in row order (the kernel's order is
    whatever its atomics give), and ``counts`` grows by all of them, also past ``capacity``
    (where nothing more is stored), as the kernel's atomics count.
    """
    similarities = pass_similarities(gluon_pass)
    arguments = gluon_pass.arguments
    if not gluon_pass.constexprs["COLLECT"]:
        tile_max: Tensor = arguments[4]  # type: ignore[assignment]
        bins = reference_bins(gluon_pass, similarities)
        tile_max[:, : bins.shape[1]] = bins
        return
    out_values: Tensor = arguments[5]  # type: ignore[assignment]
    out_indices: Tensor = arguments[6]  # type: ignore[assignment]
    counts: Tensor = arguments[7]  # type: ignore[assignment]
    num_rows, capacity = arguments[9], arguments[15]
    keep = similarities >= collect_bound(gluon_pass)[:, None]
    keep &= _written_rows(gluon_pass, num_rows, similarities.device)[None, :]
    for query in range(similarities.shape[0]):
        rows = keep[query].nonzero().flatten()
        start = int(counts[query])
        stored = rows[: max(0, capacity - start)]
        out_values[query, start : start + stored.numel()] = similarities[query, stored]
        out_indices[query, start : start + stored.numel()] = stored
        counts[query] += rows.numel()
