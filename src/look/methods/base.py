"""What every pre-training method provides to the training loop, and nothing more."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from look.config import ConfigError, dataclass_from_dict
from look.engine.distributed import Anchors


@dataclass
class Batch:
    """One (per-rank) batch: ``views[v]`` is (B, 3, H, W); ``indices`` are dataset indices."""

    views: list[torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor

    @classmethod
    def from_collated(cls, collated: Any) -> Batch:
        views, labels, indices = collated
        return cls(views=list(views), labels=labels.long(), indices=indices.long())

    def to(self, device: torch.device, *, channels_last: bool = False) -> Batch:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return Batch(
            views=[
                v.to(device, non_blocking=True, memory_format=memory_format) for v in self.views
            ],
            labels=self.labels.to(device, non_blocking=True),
            indices=self.indices.to(device, non_blocking=True),
        )

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def split(self, size: int) -> list[Batch]:
        """Consecutive batches of ``size`` samples (the last may be shorter), views, labels and
        indices cut alike (views, not copies)."""
        pieces = zip(
            *(view.split(size) for view in self.views),
            self.labels.split(size),
            self.indices.split(size),
            strict=True,
        )
        return [
            Batch(views=list(views), labels=labels, indices=indices)
            for *views, labels, indices in pieces
        ]


@dataclass
class StepOutput:
    """The loss to back-propagate and detached scalar metrics to log.

    ``inexact`` (a 0-d bool on the device, or None: always exact) is set by a method whose
    :attr:`Method.defer_exactness_check` is on: true when this loss came from a search that was
    not exact (LOOK's fused GPU search overflowed its candidate buffer). The caller reads it
    with the loss check and then recomputes the step under :meth:`Method.exact_redo`.

    ``anchors`` (when the loss is one mean over the valid items of the batch, all ranks
    together, e.g. LOOK's queries that kept a neighbour of their class): how many were valid out
    of how many. With micro-batches the trainer weights each micro-batch's loss by its count, so
    that the step's gradient is that of the mean over all of the step's valid items, as without
    micro-batches. None: the micro-batches' losses weigh the same. ``anchor_metrics`` name the
    metrics that, like the loss, are means over those valid items (LOOK's ``look_loss``): the
    trainer combines them as it combines the loss.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    inexact: torch.Tensor | None = None
    anchors: Anchors | None = None
    anchor_metrics: tuple[str, ...] = ()


def step_output_problem(out: object) -> str | None:
    """What is wrong with a method's ``forward`` result for the trainer, or ``None``: checks of
    types and attributes only (nothing that waits for the device)."""
    if not isinstance(out, StepOutput):
        return f"returned a {type(out).__name__}, not a look.methods.StepOutput"
    loss = out.loss
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.is_floating_point():
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        return f"returned a loss of shape/type {shape}; it must be a 0-d floating tensor"
    if not loss.requires_grad:
        return "returned a loss that does not require grad (detached, or computed under no_grad)"
    if not isinstance(out.metrics, dict) or "loss" not in out.metrics:
        return "returned metrics without a 'loss' entry (Method.step_metrics builds them)"
    not_tensors = [k for k, v in out.metrics.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        return f"returned metrics that are not tensors: {not_tensors}"
    return None


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about its data: sizes, not samples."""

    num_classes: int
    num_samples: int
    # Images one rank passes per forward (the global batch / world size / micro-batches per
    # step), when the caller knows it: lets memories gather over ranks without reading row
    # counts on the host.
    local_batch_size: int | None = None


class Method(nn.Module):
    """Base class. Subclasses set ``name`` (the registry's), ``Options`` (a dataclass whose fields
    all have defaults), ``num_views`` and implement forward.

    The training loop calls :meth:`forward` (through DDP when distributed),
    :meth:`after_optimizer_step`, or :meth:`discard_step` for a skipped step,
    :meth:`write_pending_memory` (the writes :meth:`queue_memory_write` queued),
    :meth:`checkpoint_state` / :meth:`load_checkpoint_state` (on every rank),
    :meth:`sync_batchnorm_conflict` once, :meth:`exact_redo` when a step's output says it was
    inexact, and, on a fresh run, :meth:`warmup_step` for every batch of one pass when
    :attr:`needs_warmup_pass` is true.
    """

    name: ClassVar[str] = "base"
    num_views: ClassVar[int] = 1
    uses_labels: ClassVar[bool] = True
    # True for a method with parameters that some steps leave without a gradient: DDP then
    # looks for them every step (slower), instead of waiting for their gradients forever.
    ddp_find_unused_parameters: ClassVar[bool] = False
    # True for a loss whose items depend on the other items of their (micro-)batch (SupCon's
    # in-batch contrast): gradient accumulation then changes what is learnt, not only the
    # speed, so a resume that changes it warns and look report keeps runs of other A apart.
    loss_couples_batch_items: ClassVar[bool] = False
    Options: ClassVar[type] = object
    # Set by a caller that reads StepOutput.inexact and redoes inexact steps (the trainer):
    # a method may then skip waiting for the device to learn whether its search was exact.
    defer_exactness_check: bool = False
    # Set by a caller that sums the gradients of several forward passes before one optimizer
    # step (gradient accumulation): a method then writes its memory only when asked
    # (write_pending_memory, after_optimizer_step), so that every micro-batch of a step sees the
    # memory as it was before the step, as one large batch would. Also set by a caller that may
    # skip a step (it writes with enabled False, or discard_step drops the queued writes).
    defer_memory_writes: bool = False
    # Set by a caller that checks every step's loss for NaN/Inf itself (the trainer, whose
    # train.nan_policy stops or skips): a method then lets a non-finite embedding give a NaN
    # loss instead of raising on it, so that the policy decides, on the CPU as on a GPU.
    caller_checks_loss: bool = False
    # Set False by a caller that reads nothing of a step's metrics but the loss (the trainer,
    # on the steps it does not log): the method then leaves its diagnostics out, each a few
    # small kernels on a GPU (step_metrics).
    wants_metrics: bool = True

    def __init__(self, options: Any, backbone: nn.Module, feature_dim: int, ctx: MethodContext):
        super().__init__()
        self.options = options
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.ctx = ctx
        # Memory writes queued by queue_memory_write, done by write_pending_memory.
        self._pending_writes: list[tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @classmethod
    def parse_options(cls, values: dict[str, Any]) -> Any:
        values = {k: v for k, v in values.items() if k != "name"}
        own = {f.name for f in dataclasses.fields(cls.Options)}
        foreign = sorted(set(values) - own)
        if foreign:
            from look.methods import METHODS  # (the registry imports this module)

            owners = sorted(
                name
                for name, other in METHODS.items()
                if other is not cls
                and set(foreign) & {f.name for f in dataclasses.fields(other.Options)}
            )
            if owners:
                # `--set method.name=X` on a recipe of another method keeps that method's keys.
                raise ConfigError(
                    f"method {cls.name!r} has no option {', '.join(map(repr, foreign))} (an "
                    f"option of {', '.join(owners)}): the method section still holds another "
                    f"method's options. Replace the whole section: --set \"method={{name: "
                    f'{cls.name}}}" (its options: {", ".join(sorted(own))})'
                )
        options = dataclass_from_dict(cls.Options, values, f"method({cls.name})")
        validate = getattr(options, "validate", None)
        if validate is not None:
            try:
                validate()
            except ConfigError as error:  # say which section, as the type checks above do
                prefix = f"method({cls.name})"
                if str(error).startswith(prefix):
                    raise
                raise ConfigError(f"{prefix}.{error}") from error
        return options

    @classmethod
    def resolved_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The method section with every default filled in (what gets saved with the run)."""
        return {"name": cls.name, **dataclasses.asdict(cls.parse_options(values))}

    def forward(self, batch: Batch) -> StepOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def needs_warmup_pass(self) -> bool:
        return False

    def sync_batchnorm_conflict(self) -> str | None:
        """Why batch norm synchronised over the ranks would break this method (``None``: it
        would not), for ``train.sync_batchnorm``."""
        return None

    def step_metrics(
        self, loss: torch.Tensor, diagnostics: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """A step's metrics: the detached loss, and what ``diagnostics()`` returns (computed
        only when :attr:`wants_metrics`)."""
        metrics = {"loss": loss.detach()}
        if self.wants_metrics:
            metrics.update(diagnostics())
        return metrics

    @torch.no_grad()
    def warmup_step(self, batch: Batch) -> None:
        """One batch of the pre-training pass that fills a memory before the first step."""

    def queue_memory_write(
        self,
        memory: nn.Module,
        ids: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        *,
        later: bool,
    ) -> None:
        """Write a batch into ``memory`` (its ``update``), now or, with ``later``, in
        :meth:`write_pending_memory` (after the optimizer step or before a checkpoint). A write
        done now first does the queued ones, so the memory sees the batches in order."""
        self._pending_writes.append((memory, ids, features, labels))
        if not later:
            self.write_pending_memory()

    @property
    def has_pending_memory_writes(self) -> bool:
        """Whether forward passes queued memory writes not done yet (the same on every rank)."""
        return bool(self._pending_writes)

    def write_pending_memory(self, enabled: torch.Tensor | None = None) -> None:
        """Do the queued memory writes, in order (a collective under DDP: every rank calls it
        at the same point). ``enabled``, a 0-d bool tensor the same on every rank, decides on
        the device whether they are written at all (see ``FeatureMemory.update``): the trainer
        queues them before it reads whether the step stands, and a step it then skips or
        redoes has written nothing."""
        pending, self._pending_writes = self._pending_writes, []
        for memory, ids, features, labels in pending:
            memory.update(ids, features, labels, enabled=enabled)

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        """Queued memory writes, then momentum / EMA updates (an override calls this first);
        ``progress`` is the fraction of training done, in [0, 1]."""
        self.write_pending_memory()

    def discard_step(self) -> None:
        """The step was skipped (its loss was not finite; called instead of
        :meth:`after_optimizer_step`): its queued memory writes are dropped, and no momentum or
        EMA update runs, so the batch leaves no trace. A write already done cannot be taken
        back: the trainer sets :attr:`defer_memory_writes` under ``train.nan_policy=skip`` (and
        does the queued writes itself with ``enabled`` False for a step it skips)."""
        self._pending_writes = []

    @contextlib.contextmanager
    def exact_redo(self) -> Iterator[None]:
        """Inside, :meth:`forward` recomputes the last step exactly (waiting for the device
        where it must), forgetting what the inexact forward left pending. Default: nothing to
        change."""
        yield

    def checkpoint_state(self) -> dict[str, Any]:
        """The method's state for a checkpoint (default: :meth:`state_dict`, after the queued
        memory writes: a checkpoint never leaves one out).

        May be collective under DDP (e.g. a sharded memory gathers its rows): called on every
        rank, and the result is the same on every rank so that rank 0 alone can write it.
        """
        self.write_pending_memory()
        return self.state_dict()

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_state` returned (default: :meth:`load_state_dict`).

        May be collective under DDP: called on every rank, each with the same ``state``.
        """
        self._pending_writes = []  # the loaded memory supersedes unwritten batches
        self.load_state_dict(state)


def check_options(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
