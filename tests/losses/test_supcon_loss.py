"""SupCon (L_out) vs a naive float64 per-anchor loop (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from look.losses import SupConLoss, supcon_loss, supcon_loss_terms

TEMPERATURE = 0.1


def reference_supcon(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    contrast: torch.Tensor,
    contrast_labels: torch.Tensor,
    anchor_positions: list[int | None],
    temperature: float,
) -> list[torch.Tensor | None]:
    """Khosla et al. eq. 2, literally: one anchor at a time, explicit A(i) and P(i)."""
    losses: list[torch.Tensor | None] = []
    for i in range(anchors.shape[0]):
        others = [a for a in range(contrast.shape[0]) if a != anchor_positions[i]]
        positives = [p for p in others if int(contrast_labels[p]) == int(anchor_labels[i])]
        if not positives:
            losses.append(None)
            continue
        logit = {a: (anchors[i] * contrast[a]).sum() / temperature for a in others}
        denominator = sum(torch.exp(logit[a]) for a in others)
        log_probabilities = [torch.log(torch.exp(logit[p]) / denominator) for p in positives]
        losses.append(-sum(log_probabilities) / len(positives))
    return losses


def reference_mean(losses: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    kept = [loss for loss in losses if loss is not None]
    return torch.stack(kept).mean() if kept else like.sum() * 0


def reference_values(losses: list[torch.Tensor | None]) -> torch.Tensor:
    return torch.tensor(
        [0.0 if loss is None else loss.item() for loss in losses], dtype=torch.float64
    )


def unit_rows(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=1)


def test_two_views_default_contrast_matches_reference() -> None:
    view_1, view_2 = unit_rows(6, 5, 0), unit_rows(6, 5, 1)
    labels = torch.tensor(
        [0, 1, 2, 0, 1, 3]
    )  # class 3 has one image: its other view is the positive
    anchors = torch.cat([view_1, view_2]).requires_grad_(True)
    anchor_labels = labels.repeat(2)
    loss, valid = supcon_loss_terms(anchors, anchor_labels, temperature=TEMPERATURE)
    assert loss.dtype == torch.float64
    assert valid.all()
    reference_anchors = anchors.detach().clone().requires_grad_(True)
    reference = reference_supcon(
        reference_anchors,
        anchor_labels,
        reference_anchors,
        anchor_labels,
        list(range(12)),
        TEMPERATURE,
    )
    torch.testing.assert_close(loss, reference_values(reference), rtol=0, atol=1e-10)
    (grad,) = torch.autograd.grad(loss.mean(), anchors)
    (reference_grad,) = torch.autograd.grad(
        reference_mean(reference, reference_anchors), reference_anchors
    )
    torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-10)


def test_single_member_class_with_one_view_is_invalid_not_nan() -> None:
    anchors = unit_rows(5, 4, 2).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2])  # label 2: no other row
    loss, valid = supcon_loss_terms(anchors, labels, temperature=TEMPERATURE)
    assert valid.tolist() == [True, True, True, True, False]
    assert loss[4].item() == 0.0
    assert torch.isfinite(loss).all()
    reference = reference_supcon(anchors, labels, anchors, labels, list(range(5)), TEMPERATURE)
    torch.testing.assert_close(loss, reference_values(reference), rtol=0, atol=1e-10)
    (grad,) = torch.autograd.grad(supcon_loss(anchors, labels, temperature=TEMPERATURE), anchors)
    assert torch.isfinite(grad).all()


def test_gathered_contrast_containing_the_anchors() -> None:
    # As under DDP: contrast is the global batch, this rank's anchors are rows 4..7 of it.
    anchors = unit_rows(4, 6, 3).requires_grad_(True)
    other_rank = unit_rows(5, 6, 4).requires_grad_(True)
    contrast = torch.cat([other_rank[:4], anchors, other_rank[4:]])
    anchor_labels = torch.tensor([0, 1, 2, 5])
    contrast_labels = torch.tensor([0, 0, 1, 3, 0, 1, 2, 5, 2])
    positions = torch.arange(4, 8)
    loss, valid = supcon_loss_terms(
        anchors,
        anchor_labels,
        temperature=TEMPERATURE,
        contrast=contrast,
        contrast_labels=contrast_labels,
        anchor_positions=positions,
    )
    assert valid.tolist() == [True, True, True, False]  # label 5 appears only as the anchor itself

    reference_anchors = anchors.detach().clone().requires_grad_(True)
    reference_other = other_rank.detach().clone().requires_grad_(True)
    reference_contrast = torch.cat([reference_other[:4], reference_anchors, reference_other[4:]])
    reference = reference_supcon(
        reference_anchors,
        anchor_labels,
        reference_contrast,
        contrast_labels,
        [4, 5, 6, 7],
        TEMPERATURE,
    )
    torch.testing.assert_close(loss, reference_values(reference), rtol=0, atol=1e-10)
    grads = torch.autograd.grad(loss.sum() / valid.sum(), [anchors, other_rank])
    reference_grads = torch.autograd.grad(
        reference_mean(reference, reference_anchors), [reference_anchors, reference_other]
    )
    for got, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert grads[1].abs().sum() > 0  # gradient reaches the contrast rows too


def test_contrast_without_the_anchors() -> None:
    anchors = unit_rows(5, 4, 5).requires_grad_(True)
    contrast = unit_rows(7, 4, 6).requires_grad_(True)
    anchor_labels = torch.tensor([0, 1, 2, 1, 9])
    contrast_labels = torch.tensor([0, 1, 1, 2, 0, 2, 3])
    loss, valid = supcon_loss_terms(
        anchors, anchor_labels, temperature=0.5, contrast=contrast, contrast_labels=contrast_labels
    )
    assert valid.tolist() == [True, True, True, True, False]
    reference = reference_supcon(anchors, anchor_labels, contrast, contrast_labels, [None] * 5, 0.5)
    torch.testing.assert_close(loss, reference_values(reference), rtol=0, atol=1e-10)
    grads = torch.autograd.grad(loss.sum() / 4, [anchors, contrast])
    reference_grads = torch.autograd.grad(reference_mean(reference, anchors), [anchors, contrast])
    for got, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_explicit_contrast_equal_to_default() -> None:
    anchors = unit_rows(8, 3, 7)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 3, 0])
    default = supcon_loss_terms(anchors, labels, temperature=TEMPERATURE)
    explicit = supcon_loss_terms(
        anchors,
        labels,
        temperature=TEMPERATURE,
        contrast=anchors,
        contrast_labels=labels,
        anchor_positions=torch.arange(8),
    )
    torch.testing.assert_close(default[0], explicit[0])
    assert torch.equal(default[1], explicit[1])


def test_known_value_for_two_orthogonal_pairs() -> None:
    anchors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    loss, valid = supcon_loss_terms(anchors, labels, temperature=1.0)
    # Each anchor: positive logit 1, the other two logits 0 → −log(e / (e + 2)).
    expected = -math.log(math.e / (math.e + 2))
    torch.testing.assert_close(loss, torch.full((4,), expected))
    assert valid.all()


def test_all_invalid_gives_exact_zero_with_graph() -> None:
    anchors = unit_rows(4, 3, 8).float().requires_grad_(True)
    loss = supcon_loss(anchors, torch.arange(4), temperature=TEMPERATURE)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert anchors.grad is not None
    assert torch.all(anchors.grad == 0)
    single = supcon_loss(anchors[:1], torch.zeros(1, dtype=torch.int64), temperature=TEMPERATURE)
    assert single.item() == 0.0


def test_fp32_and_bf16_autocast_inputs() -> None:
    anchors64 = unit_rows(10, 6, 9)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    expected = reference_values(
        reference_supcon(anchors64, labels, anchors64, labels, list(range(10)), TEMPERATURE)
    )
    loss, _ = supcon_loss_terms(anchors64.float(), labels, temperature=TEMPERATURE)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=0, atol=1e-5)
    anchors_bf16 = anchors64.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss_bf16, _ = supcon_loss_terms(anchors_bf16, labels, temperature=TEMPERATURE)
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16.double(), expected, rtol=0, atol=0.1)
    loss_bf16.sum().backward()
    assert anchors_bf16.grad is not None and torch.isfinite(anchors_bf16.grad.float()).all()


def test_module_and_scalar_agree() -> None:
    anchors = unit_rows(6, 4, 10)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    loss, valid = supcon_loss_terms(anchors, labels, temperature=0.2)
    module = SupConLoss(0.2)
    assert "temperature=0.2" in repr(module)
    torch.testing.assert_close(module(anchors, labels), loss[valid].mean())
    torch.testing.assert_close(supcon_loss(anchors, labels, temperature=0.2), loss[valid].mean())
    torch.testing.assert_close(module.terms(anchors, labels)[0], loss)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0}, "temperature must be a finite number > 0, got 0"),
        ({"temperature": -1.0}, "got -1.0"),
        (
            {"anchor_labels": torch.zeros(3, dtype=torch.int64)},
            r"anchor_labels must have shape \(4,\)",
        ),
        ({"anchor_labels": torch.zeros(4)}, "anchor_labels must be an integer tensor"),
        ({"anchors": torch.randn(4)}, "anchors must be a 2-D"),
        ({"contrast": torch.randn(5, 3)}, "contrast was given without contrast_labels"),
        (
            {"contrast_labels": torch.zeros(5, dtype=torch.int64)},
            "contrast_labels was given without",
        ),
        (
            {"contrast": torch.randn(5, 2), "contrast_labels": torch.zeros(5, dtype=torch.int64)},
            "same feature dimension",
        ),
        (
            {"contrast": torch.randn(5, 3), "contrast_labels": torch.zeros(4, dtype=torch.int64)},
            r"contrast_labels must have shape \(5,\)",
        ),
        (
            {"anchor_positions": torch.tensor([0, 1, 2, 4])},
            r"anchor_positions must lie in \[0, 4\)",
        ),
        ({"anchor_positions": torch.arange(3)}, r"anchor_positions must have shape \(4,\)"),
        ({"anchor_labels": None}, "anchor_labels must be given"),
    ],
)
def test_validation_errors(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "anchors": F.normalize(torch.randn(4, 3), dim=1),
        "anchor_labels": torch.zeros(4, dtype=torch.int64),
        "temperature": TEMPERATURE,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        supcon_loss_terms(arguments.pop("anchors"), arguments.pop("anchor_labels"), **arguments)  # type: ignore[arg-type]
    if "temperature" in kwargs:
        with pytest.raises(ValueError, match=message):
            SupConLoss(kwargs["temperature"])  # type: ignore[arg-type]


def test_nan_input_is_refused_on_the_cpu() -> None:
    anchors = F.normalize(torch.randn(6, 4), dim=1)
    labels = torch.arange(6) % 2
    poisoned = anchors.clone()
    poisoned[0, 0] = float("nan")
    module = SupConLoss(0.1)
    for loss in (lambda a: supcon_loss(a, labels, temperature=0.1), lambda a: module(a, labels)):
        with pytest.raises(ValueError, match=r"anchors contains NaN or Inf.*SupCon"):
            loss(poisoned)
        assert torch.isfinite(loss(anchors))
    with pytest.raises(ValueError, match="contrast contains NaN or Inf"):
        supcon_loss(anchors, labels, temperature=0.1, contrast=poisoned, contrast_labels=labels)
