"""Sharded memory bank for DDP: each rank holds only its block of rows, the LOOK loss searches all.

With ``W`` ranks, rank ``r`` owns the contiguous block of dataset indices
:func:`shard_bounds` ``(num_samples, W, r)`` (block sizes differ by at most one), so a bank of
``N × d`` costs each rank ``N/W × d`` instead of ``N × d``. Results are the same as with the
replicated :class:`look.memory.MemoryBank` and one process fed the global batch:

- :meth:`ShardedMemoryBank.update` gathers the local batches of all ranks (exactly as the
  replicated bank does) and writes only the rows this rank owns, with the same rule.
- :func:`sharded_look_loss_terms` gathers the queries (no grad); every shard searches for every
  query and computes, for its top-k candidates, the similarities the loss uses; each query's
  per-shard candidates go to the query's rank, which merges them into the global top-k and
  computes the loss. The loss's gradient with respect to a query is ``Σ_j w_j · row_j`` over its
  chosen neighbours (``w_j = d loss / d s_j``): the weights go back to the rows' owners, which
  return their part of the sum, so no feature row leaves its shard and the backward pass needs
  no communication.

Communication per step and rank, with ``B`` queries per rank, ``G = W·B`` in the global batch and
``k`` neighbours: the query gather (``G × d``), the per-shard candidates of the local queries
(``W × B × k`` search values, similarities, ids and labels), their weights back (the same size)
and the partial gradients (``W × B × d``). Every size is known before the step (with
``rows_per_rank``), so nothing waits for the device. The owners gather their candidates' rows
in chunks of queries (at most 2**24 values at a time), never as one ``G × k × d`` tensor.

Checkpoints: a rank's ``state_dict`` holds its shard only (and the shard's bounds, checked on
load). To save one file for all ranks, call :meth:`ShardedMemoryBank.gather_full_state` on every
rank (it is a collective) and save it from rank 0; :meth:`ShardedMemoryBank.load_full_state_`
takes each rank's rows back out of it, for any world size. The full state has the buffers of a
replicated :class:`~look.memory.MemoryBank`, so it also loads into one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from look.engine.distributed import (
    gather_rows_and_counts,
    gather_rows_no_grad,
    gather_rows_padded,
    get_rank,
    get_world_size,
    is_distributed,
)
from look.host_sync import host_reads_are_free
from look.losses.look_loss import (
    LookLossTerms,
    _check_no_positive,
    check_query_indices_in_bank,
    check_temperature,
    gathered_row_products,
    mark_non_finite_queries,
    masked_logsumexp,
)
from look.memory import MemoryBank
from look.search import (
    SearchBackend,
    autocast_disabled,
    check_positive_int,
    check_search_backend,
    compute_dtype_for,
    knn_search_deferred,
    validate_search_inputs,
)

__all__ = ["ShardedMemoryBank", "shard_bounds", "sharded_look_loss_terms"]

# Sentinel larger than any dataset index, for "smallest id wins" reductions.
_NO_ID = torch.iinfo(torch.int64).max


def shard_bounds(num_samples: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a bank of ``num_samples`` rows that ``rank`` of ``world_size`` owns.

    Contiguous blocks in rank order; the first ``num_samples % world_size`` ranks hold one row more,
    so block sizes differ by at most one.
    """
    for name, value, minimum in (
        ("num_samples", num_samples, 0),
        ("world_size", world_size, 1),
        ("rank", rank, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if rank >= world_size:
        raise ValueError(
            f"rank must be in [0, {world_size}) for world_size={world_size}, got {rank}"
        )
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedMemoryBank(MemoryBank):
    """A :class:`~look.memory.MemoryBank` of which this rank holds only its own block of rows.

    The rank and world size are read from ``torch.distributed`` when the bank is built, so build it
    after ``init_process_group``. Not distributed, it holds every row and behaves exactly like
    ``MemoryBank(num_samples, dim, momentum=momentum, dtype=dtype)``.

    Buffers are those of ``MemoryBank`` restricted to the shard (row ``i`` holds dataset index
    ``shard_start + i``; ``ids`` stores the dataset index, -1 while unwritten), plus ``shard_range``
    = ``[shard_start, shard_stop, num_samples]``, so that a checkpoint of another rank's shard is
    refused on load instead of silently loaded into the wrong rows. ``size`` is the number of rows
    held here; ``num_samples`` the size of the whole bank.

    Args:
        num_samples: number of samples in the training dataset (rows of the whole bank); at least
            the world size.
        dim: feature dimension.
        momentum: ``μ`` in ``[0, 1)`` of the row update (see ``MemoryBank``).
        dtype: storage dtype of the rows (float32, bfloat16, float16 or their names).
        rows_per_rank: the per-rank batch size, if known: the write's gather and the loss's query
            gather then pad to it instead of reading row counts on the host (see ``MemoryBank``).
        int8_prefilter: keep an int8 copy of the shard for the fused search (see ``MemoryBank``).
    """

    shard_range: Tensor

    def __init__(
        self,
        num_samples: int,
        dim: int,
        *,
        momentum: float = 0.5,
        dtype: torch.dtype | str = torch.float32,
        rows_per_rank: int | None = None,
        int8_prefilter: bool = False,
    ) -> None:
        world_size, rank = get_world_size(), get_rank()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if num_samples < world_size:
            raise ValueError(
                f"cannot shard a bank of {num_samples} rows over {world_size} ranks (a rank would "
                "hold no row); use the replicated look.memory.MemoryBank for so small a dataset"
            )
        start, stop = shard_bounds(num_samples, world_size, rank)
        # Gathering is what makes every rank see the global batch, so it is never optional here.
        super().__init__(
            stop - start,
            dim,
            momentum=momentum,
            dtype=dtype,
            gather_distributed=True,
            rows_per_rank=rows_per_rank,
            int8_prefilter=int8_prefilter,
        )
        self.num_samples = num_samples
        self.world_size = world_size
        self.rank = rank
        self.shard_start = start
        self.shard_stop = stop
        self.register_buffer(
            "shard_range", torch.tensor([start, stop, num_samples], dtype=torch.int64)
        )
        self._shard_range_checked = False

    def _check_shard_range_once(self) -> None:
        """At the first write, check that this rank's shard is still its own: a
        ``DistributedDataParallel`` that broadcasts buffers (its default) copies rank 0's shard
        over every other rank's, which would then train on wrong neighbours without an error.
        On an accelerator the check is read one write later (no wait), like the write checks."""
        if self._shard_range_checked:
            return
        self._shard_range_checked = True
        expected = (self.shard_start, self.shard_stop, self.num_samples)
        mismatch = (
            self.shard_range != torch.tensor(expected, device=self.shard_range.device)
        ).sum()
        if host_reads_are_free(self.shard_range.device):
            if int(mismatch):
                self._report_overwritten_shard([1])
            return
        self._deferred_checks.push(mismatch.view(1), self._report_overwritten_shard)

    def _report_overwritten_shard(self, counts: list[int]) -> None:
        if counts[0]:
            found = self.shard_range.tolist()
            raise RuntimeError(
                f"rank {self.rank}'s sharded bank holds rows [{found[0]}, {found[1]}), not its own "
                f"[{self.shard_start}, {self.shard_stop}): another rank's shard was copied over "
                "it. Wrap the model in DistributedDataParallel(..., broadcast_buffers=False) "
                "(look.engine.distributed.wrap_ddp does), since every rank's shard differs"
            )

    def _ids_in_range(self, ids: Tensor) -> Tensor:
        return (ids >= 0) & (ids < self.num_samples)

    def _id_range_text(self) -> str:
        return f"[0, {self.num_samples}) (the bank's dataset size)"

    def _owned_rows(
        self, ids: Tensor, features: Tensor, labels: Tensor, row_ok: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The entries of a global batch that fall in this shard, ids turned into local rows
        (batch order kept, so "last occurrence wins" still means the same entry)."""
        owned = (ids >= self.shard_start) & (ids < self.shard_stop)
        return (
            ids[owned] - self.shard_start,
            features[owned],
            labels[owned],
            None if row_ok is None else row_ok[owned],
        )

    def _write(
        self,
        ids: Tensor,
        features: Tensor,
        labels: Tensor,
        row_ok: Tensor | None,
        *,
        present: Tensor | None = None,  # padding rows are already out of row_ok
        enabled: Tensor | None = None,  # so is every row of a disabled write
    ) -> None:
        self._check_shard_range_once()
        # MemoryBank._write indexes its buffers by the ids it is given (row == dataset index in a
        # full bank): hand it local rows; _store below puts the dataset index back into `ids`.
        if row_ok is not None:
            # On an accelerator (values checked on the device): rows of other shards are written
            # like refused rows (they write nothing), so that nothing here waits for the device.
            owned = (ids >= self.shard_start) & (ids < self.shard_stop)
            rows = torch.where(owned, ids - self.shard_start, 0)
            super()._write(rows, features, labels, row_ok & owned)
            return
        rows, owned_features, owned_labels, owned_ok = self._owned_rows(
            ids, features, labels, row_ok
        )
        if rows.numel() > 0:
            super()._write(rows, owned_features, owned_labels, owned_ok)

    def _store(
        self, rows: Tensor, features: Tensor, labels: Tensor, write_any: Tensor | None = None
    ) -> None:
        super()._store(rows, features, labels, write_any)
        self.ids[rows] = torch.where(self.valid[rows], rows + self.shard_start, -1)

    @torch.no_grad()
    def fill_(self, ids: Tensor, features: Tensor, labels: Tensor) -> None:
        """Write rows without momentum (warm-up), marking them valid; as ``MemoryBank.fill_``."""
        self._check_shard_range_once()
        *rows, _ = self._prepare(ids, features, labels)
        owned = self._owned_rows(*rows)
        with self._own_write(rows[0].shape[0]):
            if owned[0].numel() > 0:
                self._store(*self._resolve_rows(*owned))

    @torch.no_grad()
    def gather_full_state(self) -> dict[str, Tensor]:
        """The whole bank, concatenated over ranks: ``features (N, d)``, ``labels``, ``ids``,
        ``valid`` — the buffers of a replicated ``MemoryBank``.

        A collective: every rank must call it (the result is the same on every rank).
        """
        features, labels, ids, valid = gather_rows_no_grad(
            # gloo cannot gather bool tensors; uint8 carries the same values.
            [self.features, self.labels, self.ids, self.valid.to(torch.uint8)]
        )
        return {"features": features, "labels": labels, "ids": ids, "valid": valid.bool()}

    @torch.no_grad()
    def load_full_state_(self, state: Mapping[str, Tensor]) -> None:
        """Take this rank's rows out of a whole-bank state (from :meth:`gather_full_state` or a
        replicated ``MemoryBank``'s ``state_dict``, with or without a ``memory.`` style prefix
        stripped by the caller). Works for any world size; no communication."""
        expected = {
            "features": (self.num_samples, self.dim),
            "labels": (self.num_samples,),
            "ids": (self.num_samples,),
            "valid": (self.num_samples,),
        }
        for name, shape in expected.items():
            if name not in state:
                raise ValueError(
                    f"the whole-bank state has no '{name}' entry; it needs {sorted(expected)}"
                )
            if tuple(state[name].shape) != shape:
                raise ValueError(
                    f"whole-bank '{name}' has shape {tuple(state[name].shape)}, this bank needs "
                    f"{shape} (num_samples={self.num_samples}, dim={self.dim})"
                )
        block = slice(self.shard_start, self.shard_stop)
        self.features.copy_(state["features"][block])
        self.labels.copy_(state["labels"][block])
        self.ids.copy_(state["ids"][block])
        self.valid.copy_(state["valid"][block])
        self.check_full()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "shard_range"
        if key in state_dict and not torch.equal(state_dict[key].cpu(), self.shard_range.cpu()):
            start, stop, total = state_dict[key].tolist()
            raise ValueError(
                f"cannot load '{prefix}': the checkpoint holds rows [{start}, {stop}) of a "
                f"{total}-row bank, this rank ({self.rank} of {self.world_size}) owns rows "
                f"[{self.shard_start}, {self.shard_stop}) of {self.num_samples}. Save the bank "
                "with gather_full_state() and restore it with load_full_state_(), which work "
                "across ranks and world sizes"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_samples={self.num_samples}, "
            f"shard=[{self.shard_start}, {self.shard_stop}), rank={self.rank}/{self.world_size}"
        )


def _exchange(tensor: Tensor, send_counts: list[int], receive_counts: list[int]) -> Tensor:
    """``all_to_all``: rows ``[Σ send_counts[:r], +send_counts[r])`` go to rank ``r``; the result
    holds the rows received from rank 0, 1, ... in order. The identity when not distributed."""
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    received = tensor.new_empty((sum(receive_counts), *tensor.shape[1:]))
    dist.all_to_all_single(received, tensor, receive_counts, send_counts)
    return received


def _merge_top_k(values: Tensor, ids: Tensor, k: int) -> Tensor:
    """Positions ``(B, k)`` in per-shard candidate lists ``(B, C)`` (padding: ``-inf`` / id
    ``-1``) of their global top-``k``, by descending value.

    Equal values are ordered by lower id, so the result does not depend on the order the lists
    came in.
    """
    by_id = ids.argsort(dim=1, stable=True)
    by_value = values.gather(1, by_id).sort(dim=1, descending=True, stable=True).indices[:, :k]
    return by_id.gather(1, by_value)


def _merge_nearest(values: Tensor, ids: Tensor) -> Tensor:
    """Shard ``(B,)`` holding the best per-shard nearest positive of ``(B, W)`` candidates, the
    lower id on ties; -1 if no shard has one."""
    best = values.max(dim=1, keepdim=True).values
    tied = (values == best) & (ids >= 0)
    nearest_ids, shard = torch.where(tied, ids, torch.full_like(ids, _NO_ID)).min(dim=1)
    return shard.masked_fill(nearest_ids == _NO_ID, -1)


class _Neighbours(NamedTuple):
    """The neighbours of this rank's queries, as positions in the candidate grid."""

    positions: Tensor  # (B, k) into the flattened (B, W · per-shard width) candidates
    ids: Tensor  # (B, k) dataset indices, -1 for padding
    is_neighbour: Tensor
    is_positive: Tensor
    valid: Tensor
    positive_in_topk: Tensor
    agreement: Tensor


def _select_neighbours(
    positions: Tensor,
    candidate_ids: Tensor,
    candidate_labels: Tensor,
    query_labels: Tensor,
    nearest_positions: Tensor | None,
    *,
    no_positive: str,
    agreement_dtype: torch.dtype,
) -> _Neighbours:
    """Masks of the top-k and the ``no_positive`` rule, as in ``look_loss._top_k_terms``; with
    ``"nearest"`` the last slot's position is swapped for the nearest positive's."""
    neighbour_ids = candidate_ids.gather(1, positions)
    is_neighbour = neighbour_ids >= 0
    is_positive = is_neighbour & (
        candidate_labels.gather(1, positions) == query_labels.unsqueeze(1)
    )
    positive_in_topk = is_positive.any(dim=1)
    agreement = is_positive.sum(dim=1).to(agreement_dtype) / is_neighbour.sum(dim=1).clamp(
        min=1
    ).to(agreement_dtype)
    if no_positive == "nearest":
        # No positive in the top-k means more than k candidates, so the last slot is a real
        # neighbour: it is swapped for the nearest same-label row of the whole bank.
        swap = ~positive_in_topk & (nearest_positions >= 0)  # type: ignore[operator]
        last = positions.shape[1] - 1
        positions = positions.clone()
        positions[:, last] = torch.where(swap, nearest_positions, positions[:, last])  # type: ignore[arg-type]
        neighbour_ids = candidate_ids.gather(1, positions)
        is_neighbour = neighbour_ids >= 0
        is_positive = is_positive.clone()
        is_positive[:, last] |= swap
    return _Neighbours(
        positions,
        neighbour_ids,
        is_neighbour,
        is_positive,
        is_positive.any(dim=1),
        positive_in_topk,
        agreement,
    )


# Elements of the (queries × candidates × d) row gathers below, per chunk (64 MB of fp32).
_ROW_GATHER_LIMIT = 1 << 24


def _gathered_rows(features: Tensor, rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``features[rows]`` as ``(..., d)`` in ``dtype``, zeros where ``rows`` is -1."""
    found = rows >= 0
    return features[rows.clamp(min=0)].to(dtype).masked_fill(~found.unsqueeze(-1), 0.0)


def _queries_per_chunk(candidates: int, dim: int) -> int:
    return max(1, _ROW_GATHER_LIMIT // max(1, candidates * dim))


def _candidate_similarities(queries: Tensor, features: Tensor, rows: Tensor) -> Tensor:
    """``queries[g] · features[rows[g, j]]`` ``(G, C)`` in the queries' dtype, 0 where ``rows`` is
    -1: the replicated loss's own product (``gathered_row_products``), so the values are the
    same to the bit."""
    out = queries.new_zeros(rows.shape)
    step = _queries_per_chunk(rows.shape[1], features.shape[1])
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        out[start : start + step] = gathered_row_products(
            queries[start : start + step], features, chunk.clamp(min=0), chunk >= 0
        )
    return out


def _weighted_row_sums(weights: Tensor, features: Tensor, rows: Tensor) -> Tensor:
    """``Σ_j weights[g, j] · features[rows[g, j]]`` ``(G, d)`` in the weights' dtype."""
    out = weights.new_zeros((rows.shape[0], features.shape[1]))
    step = _queries_per_chunk(rows.shape[1], features.shape[1])
    for start in range(0, rows.shape[0], step):
        chunk = slice(start, start + step)
        neighbours = _gathered_rows(features, rows[chunk], weights.dtype)
        out[chunk] = torch.bmm(weights[chunk].unsqueeze(1), neighbours).squeeze(1)
    return out


class _QueryGradient(torch.autograd.Function):
    """The loss terms, with a gradient with respect to the queries computed in the forward pass.

    Each query's term depends on its own query only, through the similarities to its chosen
    neighbours, so ``d loss_i / d query_i`` is one vector per query (``direction``): the
    backward pass is ``grad_i · direction_i`` and needs no bank row and no communication.
    """

    @staticmethod
    def forward(ctx: Any, queries: Tensor, loss: Tensor, direction: Tensor) -> Tensor:
        ctx.save_for_backward(direction)
        return loss.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None, None]:
        (direction,) = ctx.saved_tensors
        return grad_loss.unsqueeze(1) * direction, None, None


def sharded_look_loss_terms(
    query: Tensor,
    query_labels: Tensor,
    memory: ShardedMemoryBank,
    *,
    k: int,
    temperature: float,
    query_indices: Tensor | None,
    no_positive: str = "drop",
    chunk_size: int = 65536,
    search_backend: SearchBackend = "auto",
    defer_exactness_check: bool = False,
    check_finite_query: bool = True,
) -> LookLossTerms:
    """Per-query LOOK loss terms over a :class:`ShardedMemoryBank` (a collective under DDP).

    Same meaning, masking, no-positive rules and fp32 numerics as
    :func:`look.losses.look_loss_terms` on the replicated bank (``memory_ids=bank.ids``,
    ``memory_valid=bank.valid``): each rank's terms for its queries equal that function's terms for
    the same queries computed by one process holding the whole bank. Neighbours tied in similarity
    are ranked by lower dataset index. Gradients reach ``query`` (this rank's queries) only; they
    are computed in the forward pass (with the owners of the neighbour rows) when grad is enabled
    and ``query`` requires grad, which every rank must agree on, as in a training step. The
    loss's backward pass is then local.

    Args:
        query: ``(B, d)`` L2-normalised embeddings of this rank (B may differ between ranks; every
            rank must pass the same dtype).
        query_labels: ``(B,)`` integer labels.
        memory: the sharded bank (built with the current process group).
        k: neighbours per query (``>= 1``). ``k=None`` (NCA) is not supported here.
        temperature: τ > 0.
        query_indices: ``(B,)`` dataset indices of the queries, for leave-one-out; ``None``
            excludes nothing (all ranks must then pass ``None``).
        no_positive: ``"drop"`` or ``"nearest"`` (see ``look_loss_terms``).
        chunk_size: bank rows per chunk of each shard's search.
        search_backend: each shard's search (see ``look_loss_terms``); the fused GPU search
            applies to a bf16/fp16 shard on CUDA.
        defer_exactness_check: as in ``look_loss_terms``: ``inexact`` then says whether this
            shard's fused search overflowed (the caller agrees on it over ranks).
        check_finite_query: as in ``look_loss_terms`` (checked on the gathered queries, so every
            rank raises together).

    Returns:
        :class:`look.losses.LookLossTerms` for this rank's queries; ``neighbour_indices`` are
        dataset indices (rows of the whole bank).
    """
    if k is None:
        raise ValueError(
            "k=None (NCA: every bank row is a neighbour) is not supported with a "
            "ShardedMemoryBank; use the replicated look.memory.MemoryBank with look_loss_terms, "
            "or pick a finite k"
        )
    k = check_positive_int(k)
    temperature = check_temperature(temperature)
    no_positive = _check_no_positive(no_positive)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    check_search_backend(search_backend)
    if not isinstance(memory, ShardedMemoryBank):
        raise ValueError(
            f"memory must be a ShardedMemoryBank, got {type(memory).__name__}; for a replicated "
            "bank call look.losses.look_loss_terms"
        )
    if (memory.world_size, memory.rank) != (get_world_size(), get_rank()):
        raise ValueError(
            f"the ShardedMemoryBank was built for rank {memory.rank} of {memory.world_size}, but "
            f"this is rank {get_rank()} of {get_world_size()}; build it after init_process_group"
        )
    for name, tensor in (("query_labels", query_labels), ("query_indices", query_indices)):
        if tensor is not None and not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    validate_search_inputs(
        query,
        memory.features,
        query_ids=query_indices,
        memory_ids=None if query_indices is None else memory.ids,
        memory_valid=memory.valid,
        query_labels=query_labels,
        memory_labels=memory.labels,
    )
    if query_indices is not None:  # (as LookLoss checks a replicated bank's)
        check_query_indices_in_bank(query_indices, memory.num_samples, where=" over every rank")

    device = memory.features.device
    dtype = compute_dtype_for(query, memory.features)
    world_size = memory.world_size
    batch = query.shape[0]
    k_eff = min(k, memory.num_samples)
    want_nearest = no_positive == "nearest"

    with autocast_disabled(device):
        queries = query.to(dtype)
        local_labels = query_labels.to(device=device, dtype=torch.int64)
        # -1 matches no written row, so "no leave-one-out" needs no special case (nor agreement
        # between ranks on whether ids were given).
        local_ids = (
            torch.full_like(local_labels, -1)
            if query_indices is None
            else query_indices.to(device=device, dtype=torch.int64)
        )
        columns = torch.stack([local_ids, local_labels], dim=1)
        if memory.rows_per_rank is not None and is_distributed():
            # Every rank pads its queries to the batch size: no row counts to read on the host,
            # and the all-to-all sizes below are known (padding queries' lists are dropped).
            (all_queries, all_columns), _ = gather_rows_padded(
                [queries.detach(), columns], memory.rows_per_rank
            )
            queries_per_rank = [memory.rows_per_rank] * world_size
        else:
            # The row counts the gather exchanges are the all-to-all sizes below.
            (all_queries, all_columns), queries_per_rank = gather_rows_and_counts(
                [queries.detach(), columns]
            )
        # Checked on the gathered batch so that every rank raises together (none is left
        # waiting); on an accelerator a NaN loss term replaces the check (see look.host_sync).
        if (
            check_finite_query
            and host_reads_are_free(device)
            and not bool(torch.isfinite(all_queries).all())
        ):
            raise ValueError(
                "query contains NaN or Inf values (on some rank); check the encoder output (e.g. "
                "a diverged step or an fp16 overflow) before computing the LOOK loss"
            )
        all_ids, all_labels = all_columns.unbind(dim=1)

        # 1. Every shard searches for every query (local rows -> dataset indices).
        # A written local row r holds dataset index r + shard_start, so leave-one-out can be by
        # local row (ids outside the shard match no row): the search then needs no memory_ids,
        # which lets the fused GPU search run on the shard.
        pending = knn_search_deferred(
            all_queries,
            memory.features,
            k_eff,
            query_ids=all_ids - memory.shard_start,
            memory_valid=memory.search_valid(),  # None once every row of the shard is written
            chunk_size=chunk_size,
            query_labels=all_labels if want_nearest else None,
            memory_labels=memory.labels if want_nearest else None,
            backend=search_backend,
            prefilter=memory.search_prefilter(),  # None unless built with int8_prefilter
        )
        # Deferred: the caller reads whether this shard's fused search overflowed (an overflow
        # on any shard makes every rank redo the step); else it is waited for here.
        inexact = None
        if defer_exactness_check:
            search = pending.result
            if pending.overflowed is not None:
                inexact = pending.overflowed.any()
        else:
            search = pending.finish()
        # This shard's candidates for every query: its top-k, then (with "nearest") its nearest
        # same-label row; -1 where there is none.
        local_rows, search_values = search.indices, search.values
        if want_nearest:
            local_rows = torch.cat([local_rows, search.nearest_positive_index.unsqueeze(1)], 1)  # type: ignore[union-attr]
            search_values = torch.cat(
                [search_values, search.nearest_positive_value.unsqueeze(1)],  # type: ignore[union-attr]
                dim=1,
            )
        width = k_eff + want_nearest  # candidates per query and shard
        found = local_rows >= 0
        candidate_ids = torch.where(found, local_rows + memory.shard_start, -1)
        candidate_labels = torch.where(found, memory.labels[local_rows.clamp(min=0)], -1)
        # The owner computes the similarities the loss uses (the replicated loss's product, in
        # the compute dtype) so that no feature row ever leaves its shard.
        similarities = _candidate_similarities(all_queries, memory.features, local_rows)

        # 2. Each query's per-shard candidates go to the query's rank: (B, W, width) in shard
        # order (with padded queries each shard sends this rank's padded count; padding is cut).
        mine = queries_per_rank[get_rank()]
        from_shards = [mine] * world_size
        float_dtype = torch.promote_types(search_values.dtype, dtype)
        floats = torch.cat([search_values.to(float_dtype), similarities.to(float_dtype)], dim=1)
        ints = torch.cat([candidate_ids, candidate_labels], dim=1)
        # One exchange for both: each row's floats and ints side by side as bytes.
        packed = torch.cat([floats.view(torch.uint8), ints.view(torch.uint8)], dim=1)
        packed = _exchange(packed, queries_per_rank, from_shards)
        float_bytes = floats.shape[1] * floats.element_size()
        floats = packed[:, :float_bytes].contiguous().view(float_dtype)
        ints = packed[:, float_bytes:].contiguous().view(torch.int64)
        floats = floats.view(world_size, mine, 2 * width)[:, :batch].transpose(0, 1)
        ints = ints.view(world_size, mine, 2 * width)[:, :batch].transpose(0, 1)
        grid_search, grid_similarities = floats[..., :width], floats[..., width:].to(dtype)
        grid_ids, grid_labels = ints[..., :width], ints[..., width:]

        top = _merge_top_k(
            grid_search[..., :k_eff].reshape(batch, world_size * k_eff),
            grid_ids[..., :k_eff].reshape(batch, world_size * k_eff),
            k_eff,
        )
        positions = (top // k_eff) * width + top % k_eff  # into the (B, W · width) grid
        nearest_positions = None
        if want_nearest:
            nearest_shard = _merge_nearest(grid_search[..., k_eff], grid_ids[..., k_eff])
            nearest_positions = torch.where(nearest_shard >= 0, nearest_shard * width + k_eff, -1)
        neighbours = _select_neighbours(
            positions,
            grid_ids.reshape(batch, world_size * width),
            grid_labels.reshape(batch, world_size * width),
            local_labels,
            nearest_positions,
            no_positive=no_positive,
            agreement_dtype=dtype,
        )

        # 3. The loss on the chosen similarities. Its gradient with respect to the queries is
        # Σ_j (d loss / d s_j) · row_j: the weights d loss / d s_j go back to the rows' owners,
        # which return their part of the sum (fixed sizes: nothing waits for the device).
        selected = grid_similarities.reshape(batch, world_size * width).gather(
            1, neighbours.positions
        )
        selected = selected.masked_fill(~neighbours.is_neighbour, 0.0)
        needs_grad = torch.is_grad_enabled() and query.requires_grad
        with torch.enable_grad():
            selected = selected.requires_grad_(needs_grad)
            logits = selected / temperature
            log_denominator = masked_logsumexp(logits, neighbours.is_neighbour)
            log_numerator = masked_logsumexp(logits, neighbours.is_positive)
            loss = torch.where(
                neighbours.valid, log_denominator - log_numerator, torch.zeros_like(log_denominator)
            )
            weights = torch.autograd.grad(loss.sum(), selected)[0] if needs_grad else None
        loss = loss.detach()
        if weights is not None:
            grid_weights = grid_similarities.new_zeros((batch, world_size * width))
            grid_weights.scatter_add_(1, neighbours.positions, weights)
            to_shards = grid_weights.new_zeros((world_size, mine, width))
            to_shards[:, :batch] = grid_weights.view(batch, world_size, width).transpose(0, 1)
            shard_weights = _exchange(to_shards.view(-1, width), from_shards, queries_per_rank)
            partial = _weighted_row_sums(shard_weights, memory.features, local_rows)
            partial = _exchange(partial, queries_per_rank, from_shards)
            direction = partial.view(world_size, mine, memory.dim)[:, :batch].sum(dim=0)
            loss = _QueryGradient.apply(queries, loss, direction)
        valid = neighbours.valid
        if not (host_reads_are_free(device) and check_finite_query):  # as look_loss_terms
            loss, valid = mark_non_finite_queries(loss, valid, queries)
    return LookLossTerms(
        loss=loss,
        valid=valid,
        positive_in_topk=neighbours.positive_in_topk,
        neighbour_indices=neighbours.ids,
        neighbour_agreement=neighbours.agreement,
        inexact=inexact,
    )
