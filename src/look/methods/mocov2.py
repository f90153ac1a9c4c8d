"""MoCo v2 (Chen et al. 2020): the self-supervised baseline — momentum key encoder + queue of keys.

Labels are never used. Shuffle-BN is not implemented: under DDP each rank's BN sees its own keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from look.engine.distributed import global_masked_mean
from look.losses import info_nce_loss_terms
from look.memory import MemoryQueue
from look.methods.base import Batch, Method, MethodContext, StepOutput, check_options
from look.methods.common import HeadOptions, embed, frozen_copy, momentum_update


@dataclass
class MoCoV2Options(HeadOptions):
    temperature: float = 0.2
    queue_size: int = 8192
    encoder_momentum: float = 0.99

    def validate(self) -> None:
        self.validate_head()
        check_options(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check_options(self.queue_size >= 1, f"queue_size must be >= 1, got {self.queue_size}")
        check_options(
            0.0 <= self.encoder_momentum < 1.0,
            f"encoder_momentum must be in [0, 1), got {self.encoder_momentum}",
        )


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
        self.queue = MemoryQueue(options.queue_size, options.head_out_dim)

    def forward(self, batch: Batch) -> StepOutput:
        query = embed(self.backbone, self.head, batch.views[0])
        with torch.no_grad():
            key = embed(self.key_backbone, self.key_head, batch.views[1])
        # The whole queue with its valid mask: selecting the written rows by a boolean index
        # would make the host wait for the GPU every step.
        per_sample, valid = info_nce_loss_terms(
            query, key, self.queue.features.float(), temperature=self.options.temperature,
            negatives_valid=self.queue.valid,
        )  # fmt: skip
        loss = global_masked_mean(per_sample, valid)
        # Labels go into the queue only because the memory stores them; they are never read.
        self.queue.update(batch.indices, key, torch.zeros_like(batch.labels))
        return StepOutput(
            loss, {"loss": loss.detach(), "queue_filled_frac": self.queue.valid.float().mean()}
        )

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        momentum_update(self.backbone, self.key_backbone, self.options.encoder_momentum)
        momentum_update(self.head, self.key_head, self.options.encoder_momentum)
