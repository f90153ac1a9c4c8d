"""SupCon (Khosla et al. 2020, L_out form): two views per image, all same-label views are positives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from look.engine.distributed import (
    gather_no_grad,
    gather_with_grad,
    get_rank,
    global_masked_mean_and_anchors,
)
from look.losses import supcon_loss_terms
from look.methods.base import Batch, Method, MethodContext, StepOutput, check_options
from look.methods.common import HeadOptions, embed


@dataclass
class SupConOptions(HeadOptions):
    temperature: float = 0.1
    # Contrast against every rank's views (the usual large-batch SupCon); off = per-rank only.
    gather_distributed: bool = True

    def validate(self) -> None:
        check_options(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        self.validate_head()


class SupCon(Method):
    name = "supcon"
    num_views = 2
    Options = SupConOptions
    loss_couples_batch_items = True  # each micro-batch is contrasted on its own

    def __init__(
        self, options: SupConOptions, backbone: nn.Module, feature_dim: int, ctx: MethodContext
    ) -> None:
        super().__init__(options, backbone, feature_dim, ctx)
        self.head = options.build_head(feature_dim)

    def forward(self, batch: Batch) -> StepOutput:
        # Both views in one forward pass so batch-norm sees them together, as in the reference.
        z = embed(self.backbone, self.head, torch.cat(batch.views, dim=0))
        labels = batch.labels.repeat(len(batch.views))
        if self.options.gather_distributed:
            contrast, contrast_labels = gather_with_grad(z), gather_no_grad(labels)
            offset = get_rank() * z.shape[0]
        else:
            contrast, contrast_labels, offset = z, labels, 0
        positions = torch.arange(z.shape[0], device=z.device) + offset
        per_anchor, valid = supcon_loss_terms(
            z,
            labels,
            temperature=self.options.temperature,
            contrast=contrast,
            contrast_labels=contrast_labels,
            anchor_positions=positions,
        )
        loss, anchors = global_masked_mean_and_anchors(per_anchor, valid)
        return StepOutput(
            loss,
            self.step_metrics(loss, lambda: {"no_positive_frac": 1.0 - valid.float().mean()}),
            anchors=anchors,
        )
