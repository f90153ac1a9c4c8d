"""LOOK: each image must share its label with most of its k nearest neighbours in a memory.

Unlike CE/SupCon/NCA, a class is free to keep several modes: only the k nearest same-memory rows
matter, not the whole class (METHOD.md).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from look.config import ConfigError
from look.engine.distributed import global_masked_mean_and_anchors
from look.host_sync import host_reads_are_free
from look.losses import look_loss_terms
from look.memory import build_memory
from look.methods.base import Batch, Method, MethodContext, StepOutput, check_options
from look.methods.common import HeadOptions, embed, frozen_copy, momentum_update
from look.search import SEARCH_BACKENDS
from look.sharded import ShardedMemoryBank, sharded_look_loss_terms

_MEMORY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LOOKOptions(HeadOptions):
    k: int | None = 200  # None: every memory row (NCA)
    # k as a fraction of the mean class size (training images / classes); replaces k when set.
    # The paper's k is tuned for ImageNet's ~1,300 images per class: a fraction carries over to
    # datasets with much larger classes (Fashion-MNIST's coarse classes hold ~15,000 images).
    k_fraction: float | None = None
    temperature: float = 0.1
    no_positive: str = "drop"  # drop | nearest
    # bank (one row per image) | queue (FIFO of queue_size rows) | sharded_bank (a bank of which
    # each DDP rank holds only its block of rows; same results as bank, needs a finite k)
    memory: str = "bank"
    memory_update: str = "momentum"  # momentum: rows from the online encoder | ema_encoder
    memory_momentum: float = 0.5
    queue_size: int = 8192
    encoder_momentum: float = 0.99
    memory_dtype: str = "float32"
    memory_init: str = "mask"  # mask: unwritten rows are skipped | warmup: one pass fills the bank
    chunk_size: int = 65536
    # Neighbour search: auto (the fused GPU search for a bf16/fp16 bank on CUDA; the loss's own
    # B × N product for a small fp32 bank and a large k; else the chunked scan) | torch (always
    # the chunked scan) | triton (require the fused search)
    search_backend: str = "auto"
    # none | int8: the bank keeps an int8 copy that the fused GPU search reads instead (same
    # neighbours, re-scored from the bf16/fp16 rows; about half the bytes per search, 0.56x the
    # bank's bytes more memory). Needs memory_dtype bfloat16/float16 and a bank.
    search_prefilter: str = "none"
    ce_weight: float = 0.0  # optional auxiliary CE on the pooled features (off in pure LOOK)

    # The values an option may take (also listed by `look methods`).
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "no_positive": ("drop", "nearest"),
        "memory": ("bank", "queue", "sharded_bank"),
        "memory_update": ("momentum", "ema_encoder"),
        "memory_dtype": tuple(_MEMORY_DTYPES),
        "memory_init": ("mask", "warmup"),
        "search_backend": SEARCH_BACKENDS,
        "search_prefilter": ("none", "int8"),
    }

    def validate(self) -> None:
        self.validate_head()
        check_options(self.k is None or self.k >= 1, f"k must be >= 1 or null (NCA), got {self.k}")
        check_options(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check_options(
            self.k_fraction is None or 0.0 < self.k_fraction <= 1.0,
            f"k_fraction must be in (0, 1] (a fraction of the mean class size), got {self.k_fraction}",
        )
        # k_fraction replaces k: a k set next to it would be silently ignored, so refuse it (the
        # default k may stay, which is also what a saved run's resolved config holds, and null).
        check_options(
            self.k_fraction is None or self.k in (None, LOOKOptions.k),
            f"give k or k_fraction, not both (k={self.k}, k_fraction={self.k_fraction}); to "
            "override a recipe's one with the other, set it to null, e.g. --set method.k=50 "
            "--set method.k_fraction=null",
        )
        for key, allowed in self.CHOICES.items():
            value = getattr(self, key)
            check_options(value in allowed, f"{key}={value!r} is not one of {list(allowed)}")
        check_options(
            0.0 <= self.memory_momentum < 1.0,
            f"memory_momentum must be in [0, 1), got {self.memory_momentum}",
        )
        check_options(
            0.0 <= self.encoder_momentum < 1.0,
            f"encoder_momentum must be in [0, 1), got {self.encoder_momentum}",
        )
        check_options(
            not (self.memory == "sharded_bank" and self.k is None),
            "memory=sharded_bank needs a finite k (k: null, every row a neighbour, would search "
            "the whole bank on every rank); set k, or use memory=bank for NCA",
        )
        # The int8 copy is of a bf16/fp16 bank: say which of the two is missing.
        missing = []
        if self.memory_dtype not in ("bfloat16", "float16"):
            missing.append(f"set memory_dtype to bfloat16 or float16 (got {self.memory_dtype})")
        if self.memory == "queue":
            missing.append(f"use memory bank or sharded_bank (got {self.memory})")
        check_options(
            self.search_prefilter == "none" or not missing,
            "search_prefilter=int8 is a copy of a bf16/fp16 bank for the fused search: "
            + "; ".join(missing),
        )
        check_options(self.queue_size >= 2, f"queue_size must be >= 2, got {self.queue_size}")
        check_options(self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}")
        check_options(self.ce_weight >= 0, f"ce_weight must be >= 0, got {self.ce_weight}")
        check_options(
            not (self.memory == "queue" and self.memory_init == "warmup"),
            "memory_init=warmup needs memory=bank (a queue fills itself within a few steps)",
        )

    def unused_settings(self) -> list[str]:
        """Options changed from their default that this combination ignores (e.g. a queue size
        with a bank): silently accepted, they would suggest an ablation that never ran."""
        defaults = LOOKOptions()
        ignored = {
            "memory_momentum": (
                self.memory_update == "ema_encoder" or self.memory == "queue",
                "memory_update=ema_encoder writes the EMA encoder's embedding as it is"
                if self.memory_update == "ema_encoder"
                else "a queue stores each embedding as it is (no row is written twice)",
            ),
            "encoder_momentum": (
                self.memory_update != "ema_encoder",
                "only memory_update=ema_encoder has an EMA encoder",
            ),
            "queue_size": (self.memory != "queue", f"memory={self.memory} is no queue"),
            "no_positive": (
                self.k is None,
                "with k: null (NCA) every same-class row is a neighbour already",
            ),
        }
        return [
            f"{name}={getattr(self, name)!r} ({why})"
            for name, (applies, why) in ignored.items()
            if applies and getattr(self, name) != getattr(defaults, name)
        ]


# Above this many rows a CUDA bank that the fused search cannot serve is worth a warning: the
# chunked scan costs 4-10x the fused search at 1.28M-14M rows (docs/results.md).
_SLOW_SCAN_ROWS = 262_144


def slow_search_advice(memory: torch.Tensor, k: int | None, options: LOOKOptions) -> str | None:
    """A warning for a large CUDA bank that will be searched by the chunked scan, else None."""
    if not memory.is_cuda or memory.shape[0] < _SLOW_SCAN_ROWS or k is None:
        return None
    if options.search_backend == "torch" or memory.dtype in (torch.bfloat16, torch.float16):
        return None
    return (
        f"the LOOK memory ({memory.shape[0]} rows) is stored as {options.memory_dtype} on the GPU, "
        "so each step searches it with the chunked PyTorch scan; method.memory_dtype=bfloat16 "
        "lets the fused Triton search run (several times faster at this size, docs/results.md)"
    )


class LOOK(Method):
    name = "look"
    Options = LOOKOptions

    def __init__(
        self, options: LOOKOptions, backbone: nn.Module, feature_dim: int, ctx: MethodContext
    ) -> None:
        mean_class_size = ctx.num_samples / max(1, ctx.num_classes)
        if options.k_fraction is not None:
            options = replace(options, k=max(1, round(options.k_fraction * mean_class_size)))
        super().__init__(options, backbone, feature_dim, ctx)
        self.head = options.build_head(feature_dim)
        memory_rows = ctx.num_samples if options.memory != "queue" else options.queue_size
        if options.k is not None and options.k >= memory_rows:
            # Leave-one-out leaves at most N-1 candidates: k >= N is not a valid LOOK setting.
            # NCA (k: null) is no way out with a sharded bank, which needs a finite k.
            nca = "" if options.memory == "sharded_bank" else ", or k: null for NCA (all rows)"
            derived = (
                f" (k_fraction={options.k_fraction} × a mean class of {mean_class_size:g} images)"
                if options.k_fraction is not None
                else ""
            )
            raise ConfigError(
                f"k={options.k}{derived} is impossible with a {options.memory} of {memory_rows} rows: "
                f"leave-one-out leaves at most {memory_rows - 1} neighbours. Use "
                f"k <= {memory_rows - 1}{nca}."
            )
        if options.k == 1:
            # Measured (docs/results.md): the probe ends where the random initialisation starts.
            warnings.warn(
                "LOOK with k=1 learns nothing: with one neighbour p_i is 1 (it shares the label, "
                "zero loss) or 0 (dropped; with no_positive=nearest swapped for a same-label row, "
                "so 1 again), so the loss and its gradient are always 0. Use k >= 2"
                + (f" (k_fraction={options.k_fraction} gave k=1)" if options.k_fraction else ""),
                RuntimeWarning,
                stacklevel=2,
            )
        unused = options.unused_settings()
        if unused:
            warnings.warn(
                "LOOK options set to a value that has no effect here: " + "; ".join(unused),
                UserWarning,
                stacklevel=2,
            )
        memory_momentum = options.memory_momentum if options.memory_update == "momentum" else 0.0
        if options.memory == "sharded_bank":
            # Reads rank and world size from torch.distributed: the trainer builds the method
            # after init_process_group.
            self.memory = ShardedMemoryBank(
                ctx.num_samples,
                options.head_out_dim,
                momentum=memory_momentum,
                dtype=_MEMORY_DTYPES[options.memory_dtype],
                rows_per_rank=ctx.local_batch_size,
                int8_prefilter=options.search_prefilter == "int8",
            )
        else:
            self.memory = build_memory(
                options.memory,
                num_samples=ctx.num_samples,
                dim=options.head_out_dim,
                momentum=memory_momentum,
                queue_size=options.queue_size,
                dtype=_MEMORY_DTYPES[options.memory_dtype],
                # Under DDP the gather then pads to the batch size instead of reading the row
                # counts on the host, so the write can follow the optimizer step there too.
                rows_per_rank=ctx.local_batch_size,
                int8_prefilter=options.search_prefilter == "int8",
            )
        if options.memory_update == "ema_encoder":
            self.ema_backbone = frozen_copy(backbone)
            self.ema_head = frozen_copy(self.head)
        self.classifier = nn.Linear(feature_dim, ctx.num_classes) if options.ce_weight > 0 else None
        self._search_path_checked = False
        # On an accelerator a step's memory write is queued, not done, in forward: the trainer
        # does it once the backward pass is queued, on the device-side condition that the step
        # stands (Method.write_pending_memory), so its ~80 small kernels are launched while the
        # GPU runs the backward pass. Other callers have it done by after_optimizer_step, the
        # next forward or a checkpoint, whichever comes first. Same values: the loss never reads
        # its own batch's rows. (Several writes with gradient accumulation, one per micro-batch.)
        self._redoing = False  # inside exact_redo()

    @property
    def needs_warmup_pass(self) -> bool:
        return self.options.memory_init == "warmup"

    def memory_embedding(self, images: torch.Tensor, z_online: torch.Tensor) -> torch.Tensor:
        if self.options.memory_update == "ema_encoder":
            with torch.no_grad():
                return embed(self.ema_backbone, self.ema_head, images)
        return z_online.detach()

    @torch.no_grad()
    def warmup_step(self, batch: Batch) -> None:
        images = batch.views[0]
        z = embed(self.backbone, self.head, images)
        self.memory.fill_(batch.indices, self.memory_embedding(images, z), batch.labels)

    def forward(self, batch: Batch) -> StepOutput:
        if not self._search_path_checked:
            self._search_path_checked = True
            advice = slow_search_advice(self.memory.features, self.options.k, self.options)
            if advice is not None:
                warnings.warn(advice, RuntimeWarning, stacklevel=2)
        if not self.defer_memory_writes:  # (else earlier micro-batches of this step wait)
            self.write_pending_memory()  # a previous step's rows, if after_optimizer_step was skipped
        images = batch.views[0]
        features = self.backbone(images)
        z = F.normalize(self.head(features).float(), dim=1)
        # Written later (see __init__) unless reads of the device are free or the write itself
        # reads row counts on the host (DDP without a known batch size: later, that read would
        # wait for the whole backward pass).
        write_later = self.defer_memory_writes or (
            not host_reads_are_free(z.device) and self.memory.writes_without_host_reads
        )
        # The search's exactness check is left to the caller only while this batch's write is
        # still pending: a redo must not find the batch's rows already written.
        defer_exactness = self.defer_exactness_check and write_later and not self._redoing
        if isinstance(self.memory, ShardedMemoryBank):
            # A collective: every rank's queries search every rank's shard.
            terms = sharded_look_loss_terms(
                z,
                batch.labels,
                self.memory,
                k=self.options.k,  # type: ignore[arg-type]  # validate() refuses k=None here
                temperature=self.options.temperature,
                query_indices=batch.indices,
                no_positive=self.options.no_positive,
                chunk_size=self.options.chunk_size,
                search_backend=self.options.search_backend,  # type: ignore[arg-type]
                defer_exactness_check=defer_exactness,
                check_finite_query=not self.caller_checks_loss,
            )
        else:
            terms = look_loss_terms(
                z,
                batch.labels,
                self.memory.features,
                self.memory.labels,
                k=self.options.k,
                temperature=self.options.temperature,
                query_indices=batch.indices,
                # A bank's written rows hold their own dataset index (ids == row), which lets the
                # search exclude each query's row cheaply; a queue needs the explicit ids.
                memory_ids=None if self.options.memory == "bank" else self.memory.ids,
                # None once every row is written: the search then skips the mask.
                memory_valid=self.memory.search_valid(),
                no_positive=self.options.no_positive,
                chunk_size=self.options.chunk_size,
                search_backend=self.options.search_backend,  # type: ignore[arg-type]
                defer_exactness_check=defer_exactness,
                check_finite_query=not self.caller_checks_loss,
                search_prefilter=self.memory.search_prefilter(),
            )
        loss, anchors = global_masked_mean_and_anchors(terms.loss, terms.valid)
        ce = None
        if self.classifier is not None:
            ce = F.cross_entropy(self.classifier(features).float(), batch.labels)
        total = loss if ce is None else loss + self.options.ce_weight * ce

        def diagnostics() -> dict[str, torch.Tensor]:
            valid, agreement = terms.valid, terms.neighbour_agreement
            values = {
                "look_loss": loss.detach(),
                "dropped_frac": 1.0 - valid.float().mean(),
                "positive_in_topk_frac": terms.positive_in_topk.float().mean(),
                "neighbour_agreement": agreement.mean(),
                # Queries whose k neighbours all share their label have p_i = 1: zero loss, zero
                # gradient. A high fraction means LOOK has stopped learning from most images.
                "saturated_frac": (valid & (agreement >= 1.0)).float().mean(),
                # (a sum over the bools: .float().mean() would write an fp32 copy of the whole
                # mask, 57 MB at 14M rows)
                "memory_filled_frac": self.memory.valid.sum() / self.memory.valid.numel(),
            }
            if ce is not None:
                values["ce_loss"] = ce.detach()
            return values

        metrics = self.step_metrics(total, diagnostics)
        # Written after the loss: this batch's rows are never its own neighbours this step.
        self.queue_memory_write(
            self.memory,
            batch.indices,
            self.memory_embedding(images, z),
            batch.labels,
            later=write_later,
        )
        # With the auxiliary CE term the loss is no longer one mean over the valid queries.
        return StepOutput(
            total,
            metrics,
            inexact=terms.inexact,
            anchors=anchors if ce is None else None,
            anchor_metrics=("look_loss",),
        )

    @contextlib.contextmanager
    def exact_redo(self) -> Iterator[None]:
        """Recompute the last step with the exact search: its pending memory write is dropped
        (the redo's forward queues the same batch again) and the fused search's overflow is
        handled inside the loss (one wait for the device)."""
        self._pending_writes = []
        self._redoing = True
        try:
            yield
        finally:
            self._redoing = False

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        super().after_optimizer_step(progress)  # the pending memory write
        if self.options.memory_update == "ema_encoder":
            momentum_update(self.backbone, self.ema_backbone, self.options.encoder_momentum)
            momentum_update(self.head, self.ema_head, self.options.encoder_momentum)

    def checkpoint_state(self) -> dict[str, Any]:
        """The state dict; with a sharded bank, its shard replaced by the whole bank.

        A collective under DDP when the memory is sharded (every rank must call it). The whole
        bank has the keys of a replicated bank (``memory.features``, ``memory.labels``,
        ``memory.ids``, ``memory.valid``), so the checkpoint does not depend on the world size.
        """
        state = super().checkpoint_state()  # after the pending memory write
        if not isinstance(self.memory, ShardedMemoryBank):
            return state
        state = {key: value for key, value in state.items() if not key.startswith("memory.")}
        full_bank = self.memory.gather_full_state()
        state.update({f"memory.{name}": value for name, value in full_bank.items()})
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`checkpoint_state` output; a sharded bank takes its rows from the whole
        bank, for any world size (no communication)."""
        if not isinstance(self.memory, ShardedMemoryBank):
            super().load_checkpoint_state(state)
            return
        self._pending_writes = []  # the loaded memory supersedes unwritten batches
        others = {key: value for key, value in state.items() if not key.startswith("memory.")}
        full_bank = {
            key.removeprefix("memory."): value
            for key, value in state.items()
            if key.startswith("memory.")
        }
        result = self.load_state_dict(others, strict=False)
        missing = [key for key in result.missing_keys if not key.startswith("memory.")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"cannot load the LOOK checkpoint: missing keys {missing}, unexpected keys "
                f"{list(result.unexpected_keys)}; was it written for another method or model?"
            )
        self.memory.load_full_state_(full_bank)
