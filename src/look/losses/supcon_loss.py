"""Supervised contrastive loss, L_out form (Khosla et al., NeurIPS 2020).

For anchor ``i`` with embedding ``z_i``, ``A(i)`` is every contrast row except the anchor itself and
``P(i) ⊆ A(i)`` the rows with the anchor's label:

    loss_i = −(1/|P(i)|) Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a∈A(i)} exp(z_i·z_a/τ) ).

The usual two-view batch is ``anchors = cat(view_1, view_2)`` with labels repeated, contrast
defaulting to the anchors. Under DDP, ``contrast`` is the gathered (with grad) global batch and
``anchor_positions`` says where this rank's anchors sit in it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from look.host_sync import host_reads_are_free
from look.losses.look_loss import (
    check_temperature,
    masked_logsumexp,
    masked_mean,
    refuse_non_finite_on_host,
    warn_unless_unit_rows,
)
from look.search import autocast_disabled, compute_dtype_for

__all__ = ["SupConLoss", "supcon_loss", "supcon_loss_terms"]


def _validate_supcon_inputs(
    anchors: Tensor,
    anchor_labels: Tensor,
    contrast: Tensor,
    contrast_labels: Tensor,
    anchor_positions: Tensor | None,
) -> None:
    for name, tensor in (("anchors", anchors), ("contrast", contrast)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a 2-D floating-point tensor (rows, dim), got {shape}")
    if anchors.shape[1] != contrast.shape[1]:
        raise ValueError(
            f"anchors and contrast must have the same feature dimension, got anchors "
            f"{tuple(anchors.shape)} and contrast {tuple(contrast.shape)}"
        )
    for name, tensor, rows, rows_name in (
        ("anchor_labels", anchor_labels, anchors.shape[0], "anchors"),
        ("contrast_labels", contrast_labels, contrast.shape[0], "contrast"),
        ("anchor_positions", anchor_positions, anchors.shape[0], "anchors"),
    ):
        if tensor is None:
            if name == "anchor_labels":  # (the others may be left out)
                raise ValueError("anchor_labels must be given: SupCon's positives share a label")
            continue
        if not isinstance(tensor, Tensor) or tensor.shape != (rows,):
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must have shape ({rows},) to match {rows_name}, got {shape}")
        if tensor.is_floating_point() or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {tensor.dtype}")
    # (read on the host only where that is free: on a GPU it would wait for the device every
    # step; the method builds its positions itself)
    if (
        anchor_positions is not None
        and anchor_positions.numel() > 0
        and host_reads_are_free(anchor_positions.device)
    ):
        low, high = int(anchor_positions.min()), int(anchor_positions.max())
        if low < -1 or high >= contrast.shape[0]:
            raise ValueError(
                f"anchor_positions must lie in [0, {contrast.shape[0]}) (or be -1 for an anchor "
                f"that is not a contrast row), got values in [{low}, {high}]"
            )


def supcon_loss_terms(
    anchors: Tensor,
    anchor_labels: Tensor,
    *,
    temperature: float,
    contrast: Tensor | None = None,
    contrast_labels: Tensor | None = None,
    anchor_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-anchor SupCon (L_out) loss and validity mask.

    Args:
        anchors: ``(B, d)`` L2-normalised anchor embeddings.
        anchor_labels: ``(B,)`` integer labels.
        temperature: τ > 0.
        contrast: ``(M, d)`` rows to contrast against (may include the anchors, e.g. a gathered
            global batch); defaults to ``anchors``. Gradient flows into it as well.
        contrast_labels: ``(M,)`` labels of ``contrast``; required when ``contrast`` is given.
        anchor_positions: ``(B,)`` row of ``contrast`` that *is* anchor ``i`` (excluded from its
            own denominator and positives), ``-1`` if none. Defaults to ``arange(B)`` when
            ``contrast`` defaults to the anchors, and to "no row is the anchor" otherwise.

    Returns:
        ``(loss, valid)``, both ``(B,)``: loss in fp32 (fp64 for fp64 input), exactly 0 where the
        anchor has no positive (``valid`` False); never NaN for finite, L2-normalised input
        (:func:`supcon_loss` and :class:`SupConLoss` refuse NaN/Inf input on the CPU).
    """
    temperature = check_temperature(temperature)
    if contrast is None:
        if contrast_labels is not None:
            raise ValueError("contrast_labels was given without contrast; pass both or neither")
        contrast, contrast_labels = anchors, anchor_labels
        if anchor_positions is None and isinstance(anchors, Tensor):
            anchor_positions = torch.arange(anchors.shape[0], device=anchors.device)
    elif contrast_labels is None:
        raise ValueError("contrast was given without contrast_labels; pass both")
    _validate_supcon_inputs(anchors, anchor_labels, contrast, contrast_labels, anchor_positions)

    device = anchors.device
    dtype = compute_dtype_for(anchors, contrast)
    with autocast_disabled(device):
        logits = anchors.to(dtype) @ contrast.to(device, dtype).T / temperature  # (B, M)
        contrast_rows = torch.arange(contrast.shape[0], device=device)
        if anchor_positions is None:
            is_self = torch.zeros_like(logits, dtype=torch.bool)
        else:
            is_self = anchor_positions.to(device).unsqueeze(1) == contrast_rows.unsqueeze(0)
        in_denominator = ~is_self
        is_positive = in_denominator & (
            anchor_labels.to(device).unsqueeze(1) == contrast_labels.to(device).unsqueeze(0)
        )
        positive_count = is_positive.sum(dim=1)
        valid = positive_count > 0

        log_denominator = masked_logsumexp(logits, in_denominator)  # (B,)
        log_probability = logits - log_denominator.unsqueeze(1)
        # where, not multiply: log_probability may be huge where the row has no denominator.
        positive_log_probability = torch.where(
            is_positive, log_probability, torch.zeros_like(log_probability)
        ).sum(dim=1)
        mean_positive = positive_log_probability / positive_count.clamp(min=1).to(dtype)
        loss = torch.where(valid, -mean_positive, torch.zeros_like(mean_positive))
    return loss, valid


def supcon_loss(
    anchors: Tensor,
    anchor_labels: Tensor,
    *,
    temperature: float,
    contrast: Tensor | None = None,
    contrast_labels: Tensor | None = None,
    anchor_positions: Tensor | None = None,
) -> Tensor:
    """Scalar SupCon loss: mean of :func:`supcon_loss_terms` over valid anchors (0 with graph if
    none); NaN/Inf input is refused on the CPU (``ValueError``)."""
    _refuse_non_finite(anchors, contrast)
    loss, valid = supcon_loss_terms(
        anchors,
        anchor_labels,
        temperature=temperature,
        contrast=contrast,
        contrast_labels=contrast_labels,
        anchor_positions=anchor_positions,
    )
    return masked_mean(loss, valid)


def _refuse_non_finite(anchors: Tensor, contrast: Tensor | None) -> None:
    inputs = (
        {"anchors": anchors} if contrast is None else {"anchors": anchors, "contrast": contrast}
    )
    refuse_non_finite_on_host("SupCon", **inputs)


class SupConLoss(nn.Module):
    """Module form of :func:`supcon_loss`, holding the temperature."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def terms(
        self,
        anchors: Tensor,
        anchor_labels: Tensor,
        *,
        contrast: Tensor | None = None,
        contrast_labels: Tensor | None = None,
        anchor_positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-anchor ``(loss, valid)``, as :func:`supcon_loss_terms`."""
        warn_unless_unit_rows(self, "SupConLoss", anchors=anchors, contrast=contrast)
        return supcon_loss_terms(
            anchors,
            anchor_labels,
            temperature=self.temperature,
            contrast=contrast,
            contrast_labels=contrast_labels,
            anchor_positions=anchor_positions,
        )

    def forward(
        self,
        anchors: Tensor,
        anchor_labels: Tensor,
        *,
        contrast: Tensor | None = None,
        contrast_labels: Tensor | None = None,
        anchor_positions: Tensor | None = None,
    ) -> Tensor:
        """Scalar loss (local masked mean of :meth:`terms`); NaN/Inf input is refused on the
        CPU."""
        _refuse_non_finite(anchors, contrast)
        loss, valid = self.terms(
            anchors,
            anchor_labels,
            contrast=contrast,
            contrast_labels=contrast_labels,
            anchor_positions=anchor_positions,
        )
        return masked_mean(loss, valid)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
