"""SL-MLP: cross-entropy through an MLP projector that is discarded after pre-training.

Wang et al. 2022 ("Revisiting the transferability of supervised pretraining: an MLP projector is
all you need") found that this alone keeps more intra-class variation than plain CE.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from look.methods.ce import CEOptions, CrossEntropy
from look.methods.common import HeadOptions


@dataclass
class SLMLPOptions(CEOptions, HeadOptions):
    def validate(self) -> None:
        CEOptions.validate(self)
        self.validate_head()


class SupervisedMLP(CrossEntropy):
    name = "sl_mlp"
    Options = SLMLPOptions

    def build_projector(self) -> tuple[nn.Module, int]:
        return self.options.build_head(self.feature_dim), self.options.head_out_dim
