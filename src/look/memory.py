"""Labelled feature memories: a full bank indexed by dataset index, and a FIFO queue.

Both are :class:`torch.nn.Module` s whose whole state lives in persistent buffers, so they are
saved and restored through the owning method's ``state_dict``:

- ``features (N, d)``: L2-normalised rows, stored as float32, bfloat16 or float16;
- ``labels (N,) int64``: label of the sample in each row (-1 while unwritten);
- ``ids (N,) int64``: dataset index of the sample in each row (-1 while unwritten); losses use it
  for leave-one-out (a query never sees a row holding its own sample);
- ``valid (N,) bool``: the row has been written; unwritten rows must never act as neighbours.

``update`` takes the *local* batch. Under ``torch.distributed`` (and ``gather_distributed=True``) it
first gathers ``(ids, features, labels)`` from all ranks in rank order, so every rank writes the same
global batch and all ranks hold identical memories, equal to a single process fed the global batch.
Values are validated *after* the gather: a bad row on one rank makes every rank raise the same
``ValueError`` (no rank is left waiting in a collective). On the CPU the check runs before the
write and nothing is written. On an accelerator, reading the check's result would stall every step
(see :mod:`look.host_sync`): there a NaN/Inf or zero row is never written (its row keeps its old
contents) and the ``ValueError`` for it, or for bad ids or labels, is raised by the next
``update`` (or before a ``state_dict`` is taken), on every rank at the same call.

The gather exchanges the ranks' row counts first, a host read every update, unless the memory
knows the most rows a rank passes (``rows_per_rank``, the per-rank batch size): then every rank
pads its rows to that size and the write never waits for the device.

``search_valid()`` is what a search should take as its mask: ``valid``, or None once every row is
known to be written (a search without a mask does less work per row). A full memory stays full
(writes only mark rows written); the host learns that it is full from a check it queues on the
device and reads once the result has arrived, never waiting for it. Anything other than this
memory's own writes that changes ``valid`` in place (a load, ``reset``, a user) moves its version
counter, and the memory then forgets that it was full (changes through ``valid.data`` are not
seen: do not make them).

Rows are constants: writes happen under ``no_grad`` and in place. A loss must therefore take the
rows it differentiates through by indexing (a copy), not keep ``features`` itself in its graph, or
call ``update`` only after ``backward``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from look.engine.distributed import (
    gather_rows_no_grad,
    gather_rows_padded,
    get_world_size,
    is_distributed,
)
from look.host_sync import DeferredChecks, host_reads_are_free
from look.search import check_positive_int
from look.search_triton import FUSED_DTYPES, QuantizedRows

__all__ = ["FeatureMemory", "MemoryBank", "MemoryQueue", "build_memory"]

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# A row whose norm is at most this cannot be normalised into a meaningful direction.
_MIN_ROW_NORM = 1e-12

# How many offending ids an error message lists before it stops.
_MAX_IDS_IN_MESSAGE = 8

# Once as many rows as the memory holds have been passed to it, every this many updates it checks
# whether every row is written (one reduction over the valid mask, read without waiting), until
# it is.
_FULL_CHECK_EVERY = 8


def _tensor_state(tensor: torch.Tensor) -> tuple[int, int] | None:
    """Where ``tensor`` lives and its version counter (bumped by every in-place change), or None
    for a tensor without one (an inference tensor)."""
    try:
        return tensor.data_ptr(), tensor._version
    except RuntimeError:
        return None


def _resolve_storage_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Map a dtype or its name (``"bf16"``, ``"float16"``, ...) to a supported storage dtype."""
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _STORAGE_DTYPES:
            raise ValueError(
                f"unknown memory dtype {dtype!r}; use one of {sorted(_STORAGE_DTYPES)}"
            )
        return _STORAGE_DTYPES[key]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"memory dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}"
        )
    return dtype


class FeatureMemory(nn.Module):
    """Base class of the labelled memories: buffers, validation, distributed gather, checkpoints.

    Subclasses implement :meth:`_write`, which receives the validated, gathered, L2-normalised
    global batch (float32) and writes it under ``no_grad``.

    Args:
        num_rows: number of rows ``N`` (dataset size for a bank, capacity for a queue).
        dim: feature dimension ``d``.
        dtype: storage dtype of ``features`` (float32, bfloat16 or float16, or their names).
        gather_distributed: gather the batch from all ranks before writing when
            ``torch.distributed`` is initialised. Turn off only if every rank already passes the
            global batch.
        rows_per_rank: the most rows one rank passes to an update (its batch size), or None.
            Given, the gather pads every rank's rows to it instead of reading the row counts on
            the host; a rank passing more raises ``ValueError``.
        int8_prefilter: keep an int8 copy of a bf16/fp16 memory (:meth:`search_prefilter`) for
            the fused GPU search to read instead of ``features``: the same neighbours, about
            half the bytes read per search, ~0.56x the rows' bytes more memory.
    """

    features: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    valid: torch.Tensor

    def __init__(
        self,
        num_rows: int,
        dim: int,
        *,
        dtype: torch.dtype | str = torch.float32,
        gather_distributed: bool = True,
        rows_per_rank: int | None = None,
        int8_prefilter: bool = False,
    ) -> None:
        super().__init__()
        try:  # (any integer, a numpy one included; not a bool or a float)
            num_rows = check_positive_int(num_rows, "memory size")
        except ValueError:
            raise ValueError(f"memory size must be a positive int, got {num_rows!r}") from None
        try:
            dim = check_positive_int(dim, "memory dim")
        except ValueError:
            raise ValueError(f"memory dim must be a positive int, got {dim!r}") from None
        if rows_per_rank is not None and (
            isinstance(rows_per_rank, bool)
            or not isinstance(rows_per_rank, int)
            or rows_per_rank < 1
        ):
            raise ValueError(f"rows_per_rank must be a positive int or None, got {rows_per_rank!r}")
        self.rows_per_rank = rows_per_rank
        storage_dtype = _resolve_storage_dtype(dtype)
        self.gather_distributed = bool(gather_distributed)
        self.register_buffer("features", torch.zeros(num_rows, dim, dtype=storage_dtype))
        self.register_buffer("labels", torch.full((num_rows,), -1, dtype=torch.int64))
        self.register_buffer("ids", torch.full((num_rows,), -1, dtype=torch.int64))
        self.register_buffer("valid", torch.zeros(num_rows, dtype=torch.bool))
        self._deferred_checks = DeferredChecks()
        # What the host knows about `valid` (search_valid): whether every row is written, as of
        # the mask's state after this memory's last write (_valid_state); a check of it queued
        # on the device and not read yet; rows passed to update since the start, and updates
        # since the last check.
        self._known_full = False
        self._valid_state = _tensor_state(self.valid)
        self._full_check: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self._rows_passed = 0
        self._updates_since_check = 0
        # The int8 copy (not a buffer: it is derived, never saved, and module.to(dtype) must not
        # round its fp32 scales) and the features' state it matches.
        self.int8_prefilter = bool(int8_prefilter)
        self._quantized: QuantizedRows | None = None
        self._quantized_state: tuple[int, int] | None = None

    @property
    def storage_dtype(self) -> torch.dtype:
        """Dtype the rows are stored in (follows ``module.to(dtype)``)."""
        return self.features.dtype

    @property
    def size(self) -> int:
        """Number of rows ``N``."""
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        """Feature dimension ``d``."""
        return self.features.shape[1]

    def num_valid(self) -> int:
        """Number of rows written so far (synchronises with the device)."""
        return int(self.valid.sum().item())

    def memory_bytes(self) -> int:
        """Bytes held by all buffers (features, labels, ids, valid, ...) and the int8 copy, for
        logging."""
        tensors = list(self.buffers())
        if self._quantized is not None:
            copy = self._quantized
            tensors += [copy.values, copy.scales, copy.errors]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    def search_prefilter(self) -> QuantizedRows | None:
        """The int8 copy of ``features`` for the fused search (``int8_prefilter`` and a bf16/
        fp16 memory; else None). This memory's writes keep it in step; after any other change
        of ``features`` (a load, a reset, a move, a direct write) it is rebuilt here."""
        if not self.int8_prefilter or self.features.dtype not in FUSED_DTYPES:
            return None
        state = _tensor_state(self.features)
        copy = self._quantized
        if copy is None or state is None or state != self._quantized_state:
            copy = QuantizedRows.from_memory(self.features)
            self._quantized, self._quantized_state = copy, state
        return copy

    def _write_features(self, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """``features[positions] = rows`` (rows in the storage dtype), and the same rows into
        the int8 copy if it was in step (else it is dropped and rebuilt when next asked for)."""
        state = _tensor_state(self.features)
        in_step = self._quantized is not None and state is not None and (
            state == self._quantized_state
        )  # fmt: skip
        self.features[positions] = rows
        if in_step:
            self._quantized.write_(positions, rows)  # type: ignore[union-attr]
            self._quantized_state = _tensor_state(self.features)
        else:
            self._quantized = None

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every row: zero features, labels and ids -1, nothing valid."""
        self.features.zero_()
        self.labels.fill_(-1)
        self.ids.fill_(-1)
        self.valid.fill_(False)
        self._forget_fullness_if_changed()

    @torch.no_grad()
    def update(
        self,
        ids: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        enabled: torch.Tensor | None = None,
    ) -> None:
        """Write the local batch into the memory (after gathering it from all ranks).

        Args:
            ids: ``(B,)`` integer dataset indices of the samples.
            features: ``(B, d)`` floating embeddings, any float dtype; detached and L2-normalised
                here before they are stored.
            labels: ``(B,)`` non-negative integer labels.
            enabled: a 0-d bool tensor, the same on every rank: False writes nothing and
                refuses or reports no row, as if the call had not been made (shapes and dtypes
                are still checked). Decided on the device, so that a caller can queue the write
                before it knows whether the step stands (the trainer: before it reads whether
                the loss was finite).

        Raises:
            ValueError: on a wrong shape or dtype, ids out of range, negative labels, or rows that
                are NaN/Inf or have zero norm. Nothing is written in that case. On an accelerator
                the value checks are reported by the next call instead (see the module doc).
        """
        if enabled is not None and host_reads_are_free(self.features.device):
            if not bool(enabled):
                return
            enabled = None
        *rows, present = self._prepare(ids, features, labels, enabled=enabled)
        with self._own_write(rows[0].shape[0]):
            self._write(*rows, present=present, enabled=enabled)

    def search_valid(self) -> torch.Tensor | None:
        """The mask a search should take: ``valid``, or None once every row is known to be
        written (see the module doc). Never waits for the device: the check that finds the
        memory full is read once it has arrived."""
        self._forget_fullness_if_changed()
        if self._full_check is not None:
            host, event = self._full_check
            if event is None or event.query():
                self._known_full = bool(host.numpy())
                self._full_check = None
        return None if self._known_full else self.valid

    def _forget_fullness_if_changed(self) -> None:
        """Something other than this memory's writes changed ``valid`` since the last one (a
        load, a reset, a user, a move to another device): forget whether it is full."""
        state = _tensor_state(self.valid)
        if state is None or state != self._valid_state:
            self._known_full = False
            self._full_check = None
            self._valid_state = state

    def check_full(self) -> None:
        """Check whether every row is written, for a caller that changed ``valid`` itself (e.g.
        filled the buffers directly): queued on the device, read by a later
        :meth:`search_valid` once it has arrived. Loads do this themselves."""
        self._known_full = False
        self._valid_state = _tensor_state(self.valid)
        self._queue_full_check()

    @contextlib.contextmanager
    def _own_write(self, rows: int) -> Iterator[None]:
        """Around a write of ``rows`` rows: first forget fullness if something else changed
        ``valid`` since the last write (its evidence would be lost with this write's state),
        then record the state after it: a full memory is still full, and a memory that has been
        passed as many rows as it holds checks now and then whether it is."""
        self._forget_fullness_if_changed()
        yield
        self._valid_state = _tensor_state(self.valid)
        self._rows_passed += rows
        self._updates_since_check += 1
        if (
            not self._known_full
            and self._full_check is None
            and self._rows_passed >= self.size
            and self._updates_since_check >= _FULL_CHECK_EVERY
        ):
            self._queue_full_check()

    def _queue_full_check(self) -> None:
        self._updates_since_check = 0
        self._full_check = None
        if self._valid_state is None:  # no version counter to guard what the check finds
            return
        full = self.valid.all()
        if full.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(full, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(full.device))
            self._full_check = (host, event)
        elif host_reads_are_free(full.device):
            self._full_check = (full, None)
        # (other accelerators: no check, so the mask stays; reading it would wait)

    @property
    def writes_without_host_reads(self) -> bool:
        """Whether an update on an accelerator never waits for the device: always in one
        process; under DDP only with ``rows_per_rank`` (no row counts to read)."""
        return not (self.gather_distributed and is_distributed()) or self.rows_per_rank is not None

    def settle_checks(self) -> None:
        """Raise now for any value check still pending from an update on an accelerator."""
        self._deferred_checks.settle(keep=0)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self.settle_checks()  # a checkpoint is never written over an unreported bad write
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _prepare(
        self,
        ids: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        enabled: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Check shapes, gather over ranks, check values, normalise. Returns the global batch
        as ``(ids int64, features float32 unit rows, labels int64, row_ok, present)`` on the
        memory's device; ``row_ok`` is None when the values were checked on the host, else a
        ``(G,)`` bool of the rows that may be written (the rest must leave their row unchanged).
        ``present`` is None, or (padded gather on an accelerator) a ``(G,)`` bool of the real
        rows, which come first in rank order; padding rows are never in ``row_ok``. With
        ``enabled`` (a device-side 0-d bool, accelerators only) False, no row is in ``row_ok``
        and the value checks count nothing."""
        self._deferred_checks.settle(keep=0)  # the previous update's checks, if deferred
        self._check_structure(ids, features, labels)
        device = self.features.device
        # Gathered in float32 so that ranks passing different float dtypes still agree, and so
        # the written values match a single process given the global batch (upcasting is exact).
        local = (
            ids.detach().to(device=device, dtype=torch.int64),
            features.detach().to(device=device, dtype=torch.float32),
            labels.detach().to(device=device, dtype=torch.int64),
        )
        present: torch.Tensor | None = None
        if not self.gather_distributed:
            global_ids, global_features, global_labels = local
        elif self.rows_per_rank is None or not is_distributed():
            global_ids, global_features, global_labels = gather_rows_no_grad(local)
        else:
            gathered, present = gather_rows_padded(local, self.rows_per_rank)
            if host_reads_are_free(device):  # drop the padding: then exactly the global batch
                keep = present.nonzero().squeeze(1)
                gathered, present = [tensor[keep] for tensor in gathered], None
            else:
                # Real rows first, in rank order (a stable sort: no host read), so that a queue
                # enqueues them into consecutive slots.
                order = torch.argsort((~present).to(torch.uint8), stable=True)
                gathered, present = [tensor[order] for tensor in gathered], present[order]
            global_ids, global_features, global_labels = gathered
        norms = global_features.norm(dim=1)
        row_ok = self._check_values(
            global_ids, global_features, norms, global_labels, present, enabled=enabled
        )
        return global_ids, global_features / norms.unsqueeze(1), global_labels, row_ok, present

    def _check_structure(
        self, ids: torch.Tensor, features: torch.Tensor, labels: torch.Tensor
    ) -> None:
        for name, tensor in (("ids", ids), ("features", features), ("labels", labels)):
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"features must have shape (B, {self.dim}) for this memory, got "
                f"{tuple(features.shape)}; check the projection head's output dim"
            )
        if not features.is_floating_point():
            raise ValueError(f"features must be a floating tensor, got dtype {features.dtype}")
        batch = features.shape[0]
        for name, tensor in (("ids", ids), ("labels", labels)):
            if tensor.shape != (batch,):
                raise ValueError(
                    f"{name} must have shape ({batch},) to match features, got {tuple(tensor.shape)}"
                )
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor, got dtype {tensor.dtype}")

    def _check_values(
        self,
        ids: torch.Tensor,
        features: torch.Tensor,
        norms: torch.Tensor,
        labels: torch.Tensor,
        present: torch.Tensor | None = None,
        *,
        enabled: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Raise for bad rows, ids or labels (on the host), or return the rows that may be
        written and report the counts one update later (on an accelerator). Padding rows
        (not ``present``) are neither checked nor written; nor is any row while ``enabled``
        (a device-side 0-d bool, accelerators only) is False."""
        # A NaN/Inf entry makes the norm non-finite; so does a finite row whose norm overflows.
        bad_feature_rows = ~(torch.isfinite(norms) & (norms > _MIN_ROW_NORM))
        bad_ids = ~self._ids_in_range(ids)
        bad_labels = labels < 0
        if present is not None:
            bad_feature_rows, bad_ids, bad_labels = (
                bad & present for bad in (bad_feature_rows, bad_ids, bad_labels)
            )
        counts = torch.stack([bad_feature_rows.sum(), bad_ids.sum(), bad_labels.sum()])
        if not host_reads_are_free(counts.device):
            row_ok = ~(bad_feature_rows | bad_ids | bad_labels)
            if present is not None:
                row_ok = row_ok & present
            if enabled is not None:  # a disabled write refuses every row and reports none
                counts = counts * enabled
                row_ok = row_ok & enabled
            self._deferred_checks.push(counts, self._report_deferred)
            return row_ok
        # One host synchronisation for all three checks.
        n_bad_features, n_bad_ids, n_bad_labels = counts.tolist()
        if n_bad_features:
            example_ids = ids[bad_feature_rows][:_MAX_IDS_IN_MESSAGE].tolist()
            raise ValueError(
                f"{n_bad_features} of {features.shape[0]} feature rows are NaN/Inf or have zero "
                f"norm (dataset ids {example_ids}); nothing was written to the memory. "
                "Check the encoder for divergence (lower the learning rate, check mixed precision)"
            )
        if n_bad_ids:
            example_ids = ids[bad_ids][:_MAX_IDS_IN_MESSAGE].tolist()
            raise ValueError(
                f"{n_bad_ids} ids are outside {self._id_range_text()}, e.g. {example_ids}; ids must "
                "be indices into the training dataset the memory was built for"
            )
        if n_bad_labels:
            example_labels = labels[bad_labels][:_MAX_IDS_IN_MESSAGE].tolist()
            raise ValueError(
                f"{n_bad_labels} labels are negative, e.g. {example_labels}; labels must be class "
                "indices >= 0"
            )
        return None

    def _report_deferred(self, counts: list[int]) -> None:
        n_bad_features, n_bad_ids, n_bad_labels = counts
        problems = []
        if n_bad_features:
            problems.append(
                f"{n_bad_features} feature rows were NaN/Inf or had zero norm (check the encoder "
                "for divergence: lower the learning rate, check mixed precision)"
            )
        if n_bad_ids:
            problems.append(
                f"{n_bad_ids} ids were outside {self._id_range_text()} (ids must be indices into "
                "the training dataset the memory was built for)"
            )
        if n_bad_labels:
            problems.append(
                f"{n_bad_labels} labels were negative (labels must be class indices >= 0)"
            )
        if problems:
            raise ValueError(
                "the previous memory update was refused: " + "; ".join(problems) + ". Those rows "
                "were not written."
            )

    def _ids_in_range(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >= 0

    def _id_range_text(self) -> str:
        return "[0, inf)"

    def _write(
        self,
        ids: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        row_ok: torch.Tensor | None,
        *,
        present: torch.Tensor | None = None,
        enabled: torch.Tensor | None = None,
    ) -> None:
        """Write the prepared rows (``row_ok`` already holds ``enabled``: a queue also needs it
        to leave its pointer where it was)."""
        raise NotImplementedError

    def _load_from_state_dict(
        self,
        state_dict: dict[str, torch.Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # PyTorch's own message ("size mismatch for features") does not say what changed.
        for name, buffer in self.named_buffers(recurse=False):
            key = prefix + name
            if key not in state_dict or name in self._non_persistent_buffers_set:
                continue
            incoming = state_dict[key]
            if tuple(incoming.shape) != tuple(buffer.shape):
                raise ValueError(
                    f"cannot load {type(self).__name__} buffer '{key}': the checkpoint has shape "
                    f"{tuple(incoming.shape)}, this memory has {tuple(buffer.shape)} "
                    f"(size={self.size}, dim={self.dim}). The dataset size, queue capacity or "
                    "embedding dim changed since the checkpoint was written; build the memory "
                    "with the checkpoint's size and dim, or drop its entries to start afresh"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A resumed run's bank is usually full: check now rather than after another epoch.
        self.check_full()

    def extra_repr(self) -> str:
        dtype_name = str(self.storage_dtype).removeprefix("torch.")
        return (
            f"size={self.size}, dim={self.dim}, dtype={dtype_name}, "
            f"gather_distributed={self.gather_distributed}, "
            f"mib={self.memory_bytes() / 2**20:.1f}"
        )


class MemoryBank(FeatureMemory):
    """One row per training sample, indexed by its dataset index.

    Update rule for a written row ``i``: ``m_i <- normalize(momentum * m_i + (1 - momentum) * z_i)``;
    the first write of a row stores ``z_i`` itself, so unwritten (zero) rows never leak into the
    average. ``momentum=0`` overwrites (used when a momentum encoder writes the memory).

    Duplicate ids within one global batch (for example two views of one image, or the same sample
    on two ranks): the *last* occurrence in the gathered batch (rank order, then batch order) is
    the one applied, once; earlier ones are ignored. This is deterministic and the same on every
    rank.

    Args:
        size: number of samples in the training dataset.
        dim: feature dimension.
        momentum: ``μ`` in ``[0, 1)``.
        dtype: storage dtype of the rows.
        gather_distributed, rows_per_rank, int8_prefilter: see :class:`FeatureMemory`.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        momentum: float = 0.5,
        dtype: torch.dtype | str = torch.float32,
        gather_distributed: bool = True,
        rows_per_rank: int | None = None,
        int8_prefilter: bool = False,
    ) -> None:
        super().__init__(
            size,
            dim,
            dtype=dtype,
            gather_distributed=gather_distributed,
            rows_per_rank=rows_per_rank,
            int8_prefilter=int8_prefilter,
        )
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(
                f"memory momentum must be in [0, 1), got {momentum}; 0 overwrites rows, "
                "1 would never change them"
            )
        self.momentum = float(momentum)

    def _ids_in_range(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= 0) & (ids < self.size)

    def _id_range_text(self) -> str:
        return f"[0, {self.size}) (the bank's dataset size)"

    @torch.no_grad()
    def fill_(self, ids: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write rows without momentum (warm-up), marking them valid.

        Same arguments, gathering and validation as :meth:`update`; duplicates: last one wins.
        """
        *rows, _ = self._prepare(ids, features, labels)  # padding rows are not in row_ok
        with self._own_write(rows[0].shape[0]):
            self._store(*self._resolve_rows(*rows))

    def _write(
        self,
        ids: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        row_ok: torch.Tensor | None,
        *,
        present: torch.Tensor | None = None,
        enabled: torch.Tensor | None = None,  # already in row_ok
    ) -> None:
        # Padding rows (not present) are not in row_ok: like refused rows, they write nothing.
        ids, features, labels, write_any = self._resolve_rows(ids, features, labels, row_ok)
        if self.momentum > 0.0:
            previous = self.features[ids].to(torch.float32)
            mixed = self.momentum * previous + (1.0 - self.momentum) * features
            mixed_norms = mixed.norm(dim=1, keepdim=True)
            # A first write, or a mix that cancels out (z = -m at μ = 0.5), stores z itself.
            use_mixed = self.valid[ids].unsqueeze(1) & (mixed_norms > _MIN_ROW_NORM)
            features = torch.where(
                use_mixed, mixed / mixed_norms.clamp_min(_MIN_ROW_NORM), features
            )
        self._store(ids, features, labels, write_any)

    def _store(
        self,
        ids: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        write_any: torch.Tensor | None = None,
    ) -> None:
        features = features.to(self.storage_dtype)
        valid = torch.ones_like(ids, dtype=torch.bool)
        if write_any is not None:  # False: no row may be written; each writes its old contents
            features = torch.where(write_any, features, self.features[ids])
            labels = torch.where(write_any, labels, self.labels[ids])
            valid = torch.where(write_any, valid, self.valid[ids])
        self._write_features(ids, features)
        self.labels[ids] = labels
        self.valid[ids] = valid
        self.ids[ids] = torch.where(valid, ids, -1)

    @classmethod
    def _resolve_rows(
        cls,
        ids: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        row_ok: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The rows to write, as equal-length tensors, decided on the device (no host wait).

        Rows not in ``row_ok`` (deferred checks failed) become copies of the last good row, so
        they write nothing new; if no row is good, all target row 0 and ``write_any`` (a 0-d
        bool, else None) tells :meth:`_store` to write its old contents back. Then
        :meth:`_last_occurrences` makes repeated ids agree.
        """
        write_any = None
        if row_ok is not None:
            positions = torch.arange(ids.numel(), device=ids.device)
            last_good = torch.where(row_ok, positions, -1).max()
            write_any = last_good >= 0
            donor = last_good.clamp(min=0).reshape(1)  # a tensor index: no host read
            ids = torch.where(row_ok, ids, ids[donor])
            ids = torch.where(write_any, ids, 0)
            features = torch.where(row_ok.unsqueeze(1), features, features[donor])
            labels = torch.where(row_ok, labels, labels[donor])
        return (*cls._last_occurrences(ids, features, labels), write_any)

    @staticmethod
    def _last_occurrences(
        ids: torch.Tensor, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every occurrence of an id takes the values of its last occurrence.

        Index writes with repeated indices and different values are undefined on CUDA; with equal
        values they are not, and "last wins" matches writing the batch in order. Found by a
        stable sort (no ``unique``, whose output size would make the host wait for the device).
        """
        count = ids.numel()
        if count <= 1:
            return ids, features, labels
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order]
        positions = torch.arange(count, device=ids.device)
        # In sorted order a run of equal ids ends where the next id differs; the run's last entry
        # is the id's last occurrence in the batch (the sort is stable).
        run_end = torch.ones(count, dtype=torch.bool, device=ids.device)
        run_end[:-1] = sorted_ids[1:] != sorted_ids[:-1]
        end_position = torch.where(run_end, positions, count)
        end_position = end_position.flip(0).cummin(0).values.flip(0)  # next run end at or after
        source = torch.empty_like(order)
        source[order] = order[end_position]
        return ids, features[source], labels[source]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}"


class MemoryQueue(FeatureMemory):
    """FIFO ring buffer of the most recent ``capacity`` embeddings.

    ``ptr`` (persistent) is the next slot to write. A global batch of ``G`` rows is enqueued in
    order; when ``G > capacity`` only the newest ``capacity`` rows survive, exactly as if they had
    been written one after another. ``ids`` holds each entry's dataset index, so a loss can leave
    the query out by id; the same id may appear in several entries (all are left out).

    Args:
        capacity: number of entries ``Q``.
        dim: feature dimension.
        dtype: storage dtype of the rows.
        gather_distributed, rows_per_rank: see :class:`FeatureMemory`.
    """

    ptr: torch.Tensor

    def __init__(
        self,
        capacity: int,
        dim: int,
        *,
        dtype: torch.dtype | str = torch.float32,
        gather_distributed: bool = True,
        rows_per_rank: int | None = None,
    ) -> None:
        super().__init__(
            capacity,
            dim,
            dtype=dtype,
            gather_distributed=gather_distributed,
            rows_per_rank=rows_per_rank,
        )
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        written = None if rows_per_rank is None else rows_per_rank * get_world_size()
        if written is not None and gather_distributed and written > capacity:
            # Allowed (it is what writing the rows one by one would leave), but rarely meant.
            warnings.warn(
                f"a queue of {capacity} entries is shorter than the {written} rows written into "
                f"it at once (the batch of every rank): only the newest {capacity} of each "
                "write stay in it; a queue_size of at least the global batch keeps them all",
                RuntimeWarning,
                stacklevel=2,
            )

    @property
    def capacity(self) -> int:
        """Number of entries ``Q`` (same as :attr:`size`)."""
        return self.size

    @property
    def writes_without_host_reads(self) -> bool:
        """As for every memory, and under DDP only while the padded global batch fits the queue
        (else the padding is dropped on the host, see :meth:`_write`)."""
        if not super().writes_without_host_reads:
            return False
        if not (self.gather_distributed and is_distributed()):
            return True
        return get_world_size() * self.rows_per_rank <= self.capacity  # type: ignore[operator]

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the queue and rewind ``ptr`` to 0."""
        super().reset()
        self.ptr.zero_()

    def _write(
        self,
        ids: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        row_ok: torch.Tensor | None,
        *,
        present: torch.Tensor | None = None,
        enabled: torch.Tensor | None = None,
    ) -> None:
        if present is not None and ids.numel() > self.capacity:
            # A queue shorter than the padded global batch: which rows survive depends on how
            # many are real, so drop the padding here (one host read; rare configurations).
            keep = present.nonzero().squeeze(1)
            ids, features, labels = ids[keep], features[keep], labels[keep]
            row_ok = None if row_ok is None else row_ok[keep]
            present = None
        # With padding (real rows first, at most `capacity` rows in all) every row gets its own
        # slot; padding rows, never in row_ok (see _prepare), leave theirs as they were, and the
        # pointer moves past the real ones.
        batch = ids.numel()
        kept = min(batch, self.capacity)
        first_kept = batch - kept
        # Slots computed on the device so that enqueueing never waits for the host.
        slots = (self.ptr + first_kept + torch.arange(kept, device=ids.device)) % self.capacity
        features = features[first_kept:].to(self.storage_dtype)
        labels, ids = labels[first_kept:], ids[first_kept:]
        valid = torch.ones_like(ids, dtype=torch.bool)
        if row_ok is not None:  # a refused row leaves its slot as it was (slots are distinct)
            ok = row_ok[first_kept:]
            features = torch.where(ok.unsqueeze(1), features, self.features[slots])
            labels = torch.where(ok, labels, self.labels[slots])
            ids = torch.where(ok, ids, self.ids[slots])
            valid = ok | self.valid[slots]
        self._write_features(slots, features)
        self.labels[slots] = labels
        self.ids[slots] = ids
        self.valid[slots] = valid
        advance = batch if present is None else present.sum()
        if enabled is not None:  # a disabled write leaves the pointer too
            advance = advance * enabled.to(self.ptr.dtype)
        self.ptr.copy_((self.ptr + advance) % self.capacity)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, torch.Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        pointer = int(self.ptr.item())
        if not 0 <= pointer < self.capacity:
            raise ValueError(
                f"loaded queue pointer {pointer} is outside [0, {self.capacity}); the checkpoint "
                f"entry '{prefix}ptr' is corrupt"
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ptr={int(self.ptr.item())}"


def build_memory(
    kind: str,
    *,
    num_samples: int | None = None,
    dim: int,
    momentum: float = 0.5,
    queue_size: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    gather_distributed: bool = True,
    rows_per_rank: int | None = None,
    int8_prefilter: bool = False,
) -> FeatureMemory:
    """Build the memory a method's config asks for.

    Args:
        kind: ``"bank"`` (one row per training sample, needs ``num_samples``) or ``"queue"``
            (FIFO of ``queue_size`` entries).
        num_samples: training dataset size (bank).
        dim: feature dimension.
        momentum: bank update momentum (ignored by the queue).
        queue_size: queue capacity (ignored by the bank).
        dtype: storage dtype of the rows, a ``torch.dtype`` or a name such as ``"bf16"``.
        gather_distributed: see :class:`FeatureMemory`.
        rows_per_rank: see :class:`FeatureMemory`.
        int8_prefilter: a bank's int8 copy for the fused search (see :class:`FeatureMemory`).
            A queue is searched by id with the scan, which reads no copy: refused there.
    """
    if kind == "bank":
        if num_samples is None:
            raise ValueError("a memory bank needs num_samples (the training dataset size)")
        return MemoryBank(
            num_samples,
            dim,
            momentum=momentum,
            dtype=dtype,
            gather_distributed=gather_distributed,
            rows_per_rank=rows_per_rank,
            int8_prefilter=int8_prefilter,
        )
    if kind == "queue":
        if queue_size is None:
            raise ValueError("a memory queue needs queue_size (its capacity)")
        if int8_prefilter:
            raise ValueError(
                "int8_prefilter serves the fused search of a bank; a queue is searched by id "
                "with the chunked scan, which reads no int8 copy"
            )
        return MemoryQueue(
            queue_size,
            dim,
            dtype=dtype,
            gather_distributed=gather_distributed,
            rows_per_rank=rows_per_rank,
        )
    raise ValueError(f"unknown memory kind {kind!r}; use 'bank' or 'queue'")
