"""Contrastive losses: LOOK (``k=None`` is NCA), SupCon (L_out) and InfoNCE (MoCo v2).

Each loss has a ``*_terms`` function returning per-item losses and a ``valid`` mask (the common
shape that ``look.engine.distributed.global_masked_mean`` reduces), a scalar function (local masked
mean) and an ``nn.Module`` wrapper holding the hyper-parameters.
"""

from look.losses.info_nce_loss import InfoNCELoss, info_nce_loss, info_nce_loss_terms
from look.losses.look_loss import (
    NO_POSITIVE_RULES,
    LookLoss,
    LookLossTerms,
    NotUnitNormWarning,
    look_loss,
    look_loss_terms,
    masked_mean,
)
from look.losses.supcon_loss import SupConLoss, supcon_loss, supcon_loss_terms

__all__ = [
    "NO_POSITIVE_RULES",
    "InfoNCELoss",
    "LookLoss",
    "LookLossTerms",
    "NotUnitNormWarning",
    "SupConLoss",
    "info_nce_loss",
    "info_nce_loss_terms",
    "look_loss",
    "look_loss_terms",
    "masked_mean",
    "supcon_loss",
    "supcon_loss_terms",
]
