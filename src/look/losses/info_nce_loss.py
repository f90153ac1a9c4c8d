"""InfoNCE loss for MoCo v2 (one positive key per query, a queue of negative keys)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from look.host_sync import host_reads_are_free
from look.losses.look_loss import (
    _constant_rows,
    check_temperature,
    masked_mean,
    refuse_non_finite_on_host,
)
from look.search import autocast_disabled, compute_dtype_for

__all__ = ["InfoNCELoss", "info_nce_loss", "info_nce_loss_terms"]


def info_nce_loss_terms(
    query: Tensor,
    positive_key: Tensor,
    negatives: Tensor,
    *,
    temperature: float,
    negatives_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-query InfoNCE: cross-entropy of ``[q·k⁺, q·n_1, …, q·n_K] / τ`` with target 0.

    Args:
        query: ``(B, d)`` L2-normalised query embeddings.
        positive_key: ``(B, d)`` the positive key of each query (in MoCo, the momentum encoder's
            embedding of the other view; it carries whatever gradient its graph has).
        negatives: ``(K, d)`` negative keys (the queue), used as detached constants; ``K`` may be 0.
        temperature: τ > 0.
        negatives_valid: ``(K,)`` bool, the negatives that take part (e.g. the written slots of a
            queue); the others are masked out on the device, so a caller need not select them
            with a boolean index (which makes the host wait for a GPU).

    Returns:
        ``(loss, valid)``, both ``(B,)``; loss in fp32 (fp64 for fp64 input), valid all True.
    """
    temperature = check_temperature(temperature)
    for name, tensor in (
        ("query", query),
        ("positive_key", positive_key),
        ("negatives", negatives),
    ):
        if not isinstance(tensor, Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a 2-D floating-point tensor (rows, dim), got {shape}")
    if positive_key.shape != query.shape:
        raise ValueError(
            f"positive_key must have the shape of query {tuple(query.shape)}, "
            f"got {tuple(positive_key.shape)}"
        )
    if negatives.shape[1] != query.shape[1]:
        raise ValueError(
            f"negatives must have feature dimension {query.shape[1]} like query, "
            f"got shape {tuple(negatives.shape)}"
        )
    if negatives_valid is not None and (
        not isinstance(negatives_valid, Tensor)
        or negatives_valid.dtype != torch.bool
        or negatives_valid.shape != (negatives.shape[0],)
    ):
        raise ValueError(
            f"negatives_valid must be a bool tensor of shape ({negatives.shape[0]},), got "
            f"{getattr(negatives_valid, 'dtype', type(negatives_valid).__name__)} "
            f"{tuple(getattr(negatives_valid, 'shape', ()))}"
        )

    device = query.device
    dtype = compute_dtype_for(query, positive_key, negatives)
    with autocast_disabled(device):
        queries = query.to(dtype)
        positive_logits = (queries * positive_key.to(device, dtype)).sum(dim=1, keepdim=True)
        # A copy of the rows in both cases: a queue updated in place before backward must not
        # be what autograd saved for the product.
        usable = None if negatives_valid is None else negatives_valid.to(device)
        negative_logits = queries @ _constant_rows(negatives.to(device), dtype, usable).T
        if usable is not None:
            negative_logits = negative_logits.masked_fill(~usable, float("-inf"))
        logits = torch.cat([positive_logits, negative_logits], dim=1) / temperature
        targets = torch.zeros(query.shape[0], dtype=torch.int64, device=device)
        loss = F.cross_entropy(logits, targets, reduction="none")
    valid = torch.ones(query.shape[0], dtype=torch.bool, device=device)
    return loss, valid


def _negatives_in_use(negatives: Tensor, negatives_valid: Tensor | None) -> Tensor:
    """The negatives the NaN check reads: unused slots (a queue's unwritten ones) may hold
    anything. (Only where host reads are free: the selection reads the mask.)"""
    if negatives_valid is None or not host_reads_are_free(negatives.device):
        return negatives
    return negatives[negatives_valid.to(negatives.device)]


def info_nce_loss(
    query: Tensor,
    positive_key: Tensor,
    negatives: Tensor,
    *,
    temperature: float,
    negatives_valid: Tensor | None = None,
) -> Tensor:
    """Scalar InfoNCE loss: mean of :func:`info_nce_loss_terms` over the batch; NaN/Inf input
    is refused on the CPU (``ValueError``)."""
    refuse_non_finite_on_host(
        "InfoNCE",
        query=query,
        positive_key=positive_key,
        negatives=_negatives_in_use(negatives, negatives_valid),
    )
    loss, valid = info_nce_loss_terms(
        query, positive_key, negatives, temperature=temperature, negatives_valid=negatives_valid
    )
    return masked_mean(loss, valid)


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce_loss`, holding the temperature."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def terms(
        self,
        query: Tensor,
        positive_key: Tensor,
        negatives: Tensor,
        *,
        negatives_valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-query ``(loss, valid)``, as :func:`info_nce_loss_terms`."""
        return info_nce_loss_terms(
            query,
            positive_key,
            negatives,
            temperature=self.temperature,
            negatives_valid=negatives_valid,
        )

    def forward(
        self,
        query: Tensor,
        positive_key: Tensor,
        negatives: Tensor,
        *,
        negatives_valid: Tensor | None = None,
    ) -> Tensor:
        """Scalar loss (mean of :meth:`terms`); NaN/Inf input is refused on the CPU.
        ``negatives_valid`` masks the negatives that take part (a queue's written slots)."""
        refuse_non_finite_on_host(
            "InfoNCE",
            query=query,
            positive_key=positive_key,
            negatives=_negatives_in_use(negatives, negatives_valid),
        )
        loss, valid = self.terms(query, positive_key, negatives, negatives_valid=negatives_valid)
        return masked_mean(loss, valid)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
