"""MoCo v2 (Chen et al. 2020): the self-supervised baseline — momentum key encoder + queue of keys.

Labels are never used. Shuffling BN (He et al. 2020, sec. 3.3): batch-norm statistics computed over
a group that holds both a query and its own key let the model find its positive through the
statistics instead of the image ("cheating"). As in MoCo, the query encoder normalises each
rank's batch in order, the key encoder a random permutation of the global batch, so a key is
normalised with other samples than its query. ``bn_splits`` cuts each rank's batch into that many
BN groups for both encoders, which gives one process the groups of that many devices; with one
process and ``bn_splits = 1`` the shuffle changes nothing (one group holds everything).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from look.engine.distributed import (
    gather_no_grad,
    gather_rows_and_counts,
    get_rank,
    get_world_size,
    global_masked_mean_and_anchors,
    is_distributed,
)
from look.losses import info_nce_loss_terms
from look.memory import MemoryQueue
from look.methods.base import Batch, Method, MethodContext, StepOutput, check_options
from look.methods.common import HeadOptions, embed, frozen_copy, momentum_update


@dataclass
class MoCoV2Options(HeadOptions):
    temperature: float = 0.2
    queue_size: int = 8192
    encoder_momentum: float = 0.99
    shuffle_bn: bool = True
    bn_splits: int = 1  # BN groups per rank (4 on one device ~ MoCo's multi-GPU groups)

    def validate(self) -> None:
        self.validate_head()
        check_options(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check_options(self.queue_size >= 1, f"queue_size must be >= 1, got {self.queue_size}")
        check_options(
            0.0 <= self.encoder_momentum < 1.0,
            f"encoder_momentum must be in [0, 1), got {self.encoder_momentum}",
        )
        check_options(self.bn_splits >= 1, f"bn_splits must be >= 1, got {self.bn_splits}")


class MoCoV2(Method):
    name = "mocov2"
    num_views = 2
    uses_labels = False
    Options = MoCoV2Options

    def __init__(
        self, options: MoCoV2Options, backbone: nn.Module, feature_dim: int, ctx: MethodContext
    ) -> None:
        super().__init__(options, backbone, feature_dim, ctx)
        self.head = options.build_head(feature_dim)
        self.key_backbone = frozen_copy(backbone)
        self.key_head = frozen_copy(self.head)
        # Knowing the per-rank batch, the queue's gather reads no row counts on the host.
        self.queue = MemoryQueue(
            options.queue_size, options.head_out_dim, rows_per_rank=ctx.local_batch_size
        )
        local = ctx.local_batch_size
        # (Only a trainer's context knows the per-rank batch: not a model built to evaluate.)
        one_group = options.shuffle_bn and options.bn_splits == 1 and get_world_size() == 1
        if local is not None and one_group:
            warnings.warn(
                "mocov2: shuffle_bn on one process with bn_splits=1 shuffles nothing: each "
                "query and its own key are normalised over the same batch, the leak MoCo's "
                "shuffled batch norm guards against; set method.bn_splits to a divisor of "
                f"the batch of {local} (e.g. 4: a device's share of MoCo's 4-GPU groups), "
                "or train on several ranks",
                RuntimeWarning,
                stacklevel=2,
            )
        if local is not None and options.bn_splits > 1 and local % options.bn_splits:
            sizes = [len(group) for group in torch.arange(local).chunk(options.bn_splits)]
            warnings.warn(
                f"mocov2: a batch of {local} per rank does not split evenly into "
                f"bn_splits={options.bn_splits} batch-norm groups: they hold {sizes} samples; "
                "pick a bn_splits that divides the per-rank batch",
                RuntimeWarning,
                stacklevel=2,
            )

    def forward(self, batch: Batch) -> StepOutput:
        splits = self.options.bn_splits
        if batch.size < 2 * splits:  # batch-norm needs two samples per group
            raise ValueError(
                f"mocov2: a batch of {batch.size} samples per rank cannot be cut into "
                f"bn_splits={splits} batch-norm groups of at least 2; lower method.bn_splits"
            )
        query = _embed_in_groups(self.backbone, self.head, batch.views[0], splits)
        with torch.no_grad():
            key = self._shuffled_keys(batch.views[1])
        # The whole queue with its valid mask: selecting the written rows by a boolean index
        # would make the host wait for the GPU every step.
        per_sample, valid = info_nce_loss_terms(
            query, key, self.queue.features.float(), temperature=self.options.temperature,
            negatives_valid=self.queue.search_valid(),
        )  # fmt: skip
        loss, anchors = global_masked_mean_and_anchors(per_sample, valid)
        # The queue's fill as this step read it, before its own write: the write is immediate
        # or deferred by the trainer's settings (nan_policy, accumulation), which must not
        # shift the logged column. (A sum over the bools: .float().mean() would first write a
        # float copy of the mask.)
        metrics = self.step_metrics(
            loss, lambda: {"queue_filled_frac": self.queue.valid.sum() / self.queue.valid.numel()}
        )
        # Labels go into the queue only because the memory stores them; they are never read.
        # With defer_memory_writes the step's other micro-batches see the queue unchanged.
        self.queue_memory_write(
            self.queue,
            batch.indices,
            key,
            torch.zeros_like(batch.labels),
            later=self.defer_memory_writes,
        )
        return StepOutput(loss, metrics, anchors=anchors)

    def sync_batchnorm_conflict(self) -> str | None:
        if self.options.shuffle_bn:
            return (
                "mocov2's shuffle_bn normalises each key with other samples than its query; "
                "batch norm synchronised over all ranks sees the whole batch again and undoes "
                "it. Set method.shuffle_bn=false to accept that, or train.sync_batchnorm=false"
            )
        if self.options.bn_splits > 1:
            return (
                f"mocov2's bn_splits={self.options.bn_splits} batch-norm groups would each be "
                "synchronised over the ranks; set method.bn_splits=1"
            )
        return None

    def _shuffled_keys(self, images: torch.Tensor) -> torch.Tensor:
        """Keys of ``images`` (this rank's batch, in order), encoded in BN groups of a random
        permutation of the global batch (every rank's batch must have the same size, as the
        trainer's sampler makes them: a batch of ``MethodContext.local_batch_size`` images is
        taken to be one of those, with no check that would wait for the device)."""
        local, splits = images.shape[0], self.options.bn_splits
        world, rank = get_world_size(), get_rank()
        if not self.options.shuffle_bn or (world == 1 and splits == 1):  # nothing to shuffle
            return _embed_in_groups(self.key_backbone, self.key_head, images, splits)
        if local == self.ctx.local_batch_size:
            # The trainer's batches: every rank's holds local_batch_size images (its sampler
            # drops the last, partial global batch), so no counts need reading on the host.
            every_image = gather_no_grad(images)
        else:
            (every_image,), counts = gather_rows_and_counts([images])  # one host read of counts
            if len(set(counts)) > 1:
                raise ValueError(
                    f"mocov2 shuffle_bn needs the same batch size on every rank, got "
                    f"{min(counts)} to {max(counts)}; use equal per-rank batches (drop_last) or "
                    "method.shuffle_bn: false"
                )
        # Drawn on every rank from its CPU generator (checkpointed, so a resumed run draws the
        # same), then rank 0's is used everywhere.
        order = torch.randperm(every_image.shape[0]).to(images.device)
        if is_distributed():
            dist.broadcast(order, src=0)
        mine = order[rank * local : (rank + 1) * local]
        encoded = _embed_in_groups(self.key_backbone, self.key_head, every_image[mine], splits)
        every_key = gather_no_grad(encoded)  # every_key[i] is the key of image order[i]
        keys = torch.empty_like(every_key)
        keys[order] = every_key
        return keys[rank * local : (rank + 1) * local]

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        super().after_optimizer_step(progress)  # the queued keys, with defer_memory_writes
        momentum_update(self.backbone, self.key_backbone, self.options.encoder_momentum)
        momentum_update(self.head, self.key_head, self.options.encoder_momentum)


def _embed_in_groups(
    backbone: nn.Module, head: nn.Module, images: torch.Tensor, groups: int
) -> torch.Tensor:
    """``embed`` with batch-norm statistics computed over ``groups`` contiguous groups."""
    if groups == 1:
        return embed(backbone, head, images)
    return torch.cat([embed(backbone, head, group) for group in images.chunk(groups)])
