"""CE: the standard supervised baseline, a linear classifier on the pooled backbone features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from look.engine.distributed import global_masked_mean_and_anchors
from look.methods.base import Batch, Method, MethodContext, StepOutput, check_options


@dataclass
class CEOptions:
    label_smoothing: float = 0.0

    def validate(self) -> None:
        check_options(
            0.0 <= self.label_smoothing < 1.0,
            f"label_smoothing must be in [0, 1), got {self.label_smoothing}",
        )


class CrossEntropy(Method):
    name = "ce"
    Options = CEOptions

    def __init__(
        self, options: CEOptions, backbone: nn.Module, feature_dim: int, ctx: MethodContext
    ) -> None:
        super().__init__(options, backbone, feature_dim, ctx)
        self.projector, projected_dim = self.build_projector()
        self.classifier = nn.Linear(projected_dim, ctx.num_classes)

    def build_projector(self) -> tuple[nn.Module, int]:
        """What sits between the backbone and the classifier (nothing, for plain CE)."""
        return nn.Identity(), self.feature_dim

    def forward(self, batch: Batch) -> StepOutput:
        features = self.projector(self.backbone(batch.views[0]))
        logits = self.classifier(features).float()
        per_sample = F.cross_entropy(
            logits, batch.labels, reduction="none", label_smoothing=self.options.label_smoothing
        )
        loss, anchors = global_masked_mean_and_anchors(
            per_sample, torch.ones_like(per_sample, dtype=torch.bool)
        )
        return StepOutput(
            loss,
            self.step_metrics(
                loss,
                lambda: {"train_acc": (logits.detach().argmax(1) == batch.labels).float().mean()},
            ),
            anchors=anchors,
        )
