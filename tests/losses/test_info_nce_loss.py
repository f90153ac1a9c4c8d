"""InfoNCE (MoCo v2) vs a cross-entropy reference and a per-query loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from look.losses import InfoNCELoss, info_nce_loss, info_nce_loss_terms

TEMPERATURE = 0.2


def unit_rows(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=1)


def test_matches_cross_entropy_and_loop_reference() -> None:
    query = unit_rows(6, 8, 0).requires_grad_(True)
    positive_key = unit_rows(6, 8, 1).requires_grad_(True)
    negatives = unit_rows(20, 8, 2).requires_grad_(True)
    loss, valid = info_nce_loss_terms(query, positive_key, negatives, temperature=TEMPERATURE)
    assert valid.all() and valid.dtype == torch.bool
    assert loss.shape == (6,) and loss.dtype == torch.float64

    # The MoCo formulation: logits [l_pos, l_neg] with target 0.
    reference_query = query.detach().clone().requires_grad_(True)
    l_pos = torch.einsum("nc,nc->n", reference_query, positive_key.detach()).unsqueeze(-1)
    l_neg = torch.einsum("nc,kc->nk", reference_query, negatives.detach())
    logits = torch.cat([l_pos, l_neg], dim=1) / TEMPERATURE
    reference = F.cross_entropy(logits, torch.zeros(6, dtype=torch.int64), reduction="none")
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-12)

    # And the same number written out with math, one query at a time.
    query_values, key_values, negative_values = (
        query.detach(),
        positive_key.detach(),
        negatives.detach(),
    )
    for i in range(6):
        positive = math.exp(float(query_values[i] @ key_values[i]) / TEMPERATURE)
        negative = sum(math.exp(float(query_values[i] @ n) / TEMPERATURE) for n in negative_values)
        assert loss[i].item() == pytest.approx(
            -math.log(positive / (positive + negative)), rel=1e-10
        )

    (grad,) = torch.autograd.grad(loss.mean(), query, retain_graph=True)
    (reference_grad,) = torch.autograd.grad(reference.mean(), reference_query)
    torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-12)

    info_nce_loss(query, positive_key, negatives, temperature=TEMPERATURE).backward()
    assert negatives.grad is None  # the queue is a constant
    assert positive_key.grad is not None  # the positive key keeps whatever graph it has


def test_no_negatives_gives_zero_loss() -> None:
    query = unit_rows(3, 4, 3)
    loss, _ = info_nce_loss_terms(
        query, query, torch.empty(0, 4, dtype=torch.float64), temperature=0.1
    )
    assert torch.all(loss == 0)


def test_fp32_under_bf16_autocast() -> None:
    query, key, negatives = unit_rows(4, 8, 4), unit_rows(4, 8, 5), unit_rows(16, 8, 6)
    expected, _ = info_nce_loss_terms(query, key, negatives, temperature=TEMPERATURE)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss, _ = info_nce_loss_terms(
            query.to(torch.bfloat16),
            key.to(torch.bfloat16),
            negatives.to(torch.bfloat16),
            temperature=TEMPERATURE,
        )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=0, atol=0.1)


def test_module_and_scalar_agree() -> None:
    query, key, negatives = unit_rows(5, 4, 7), unit_rows(5, 4, 8), unit_rows(9, 4, 9)
    loss, _ = info_nce_loss_terms(query, key, negatives, temperature=0.07)
    module = InfoNCELoss(0.07)
    assert "temperature=0.07" in repr(module)
    torch.testing.assert_close(module(query, key, negatives), loss.mean())
    torch.testing.assert_close(info_nce_loss(query, key, negatives, temperature=0.07), loss.mean())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "got 0.0"),
        (
            {"positive_key": torch.randn(3, 4)},
            r"positive_key must have the shape of query \(2, 4\)",
        ),
        ({"negatives": torch.randn(5, 3)}, "negatives must have feature dimension 4"),
        ({"query": torch.randn(4)}, "query must be a 2-D"),
    ],
)
def test_validation_errors(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "query": torch.randn(2, 4),
        "positive_key": torch.randn(2, 4),
        "negatives": torch.randn(5, 4),
        "temperature": TEMPERATURE,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        info_nce_loss_terms(
            arguments.pop("query"),  # type: ignore[arg-type]
            arguments.pop("positive_key"),  # type: ignore[arg-type]
            arguments.pop("negatives"),  # type: ignore[arg-type]
            **arguments,  # type: ignore[arg-type]
        )


def test_valid_mask_equals_selecting_the_valid_negatives() -> None:
    g = torch.Generator().manual_seed(5)
    negatives = F.normalize(torch.randn(12, 6, generator=g), dim=1)
    valid = torch.rand(12, generator=g) > 0.4
    unwritten = negatives.masked_fill(~valid.unsqueeze(1), float("nan"))  # unused rows: anything
    key = F.normalize(torch.randn(5, 6, generator=g), dim=1)

    def run(**negative_args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        query = F.normalize(torch.randn(5, 6, generator=torch.Generator().manual_seed(6)), dim=1)
        query.requires_grad_(True)
        loss, _ = info_nce_loss_terms(query, key, temperature=0.2, **negative_args)  # type: ignore[arg-type]
        loss.sum().backward()
        return loss.detach(), query.grad  # type: ignore[return-value]

    masked_loss, masked_grad = run(negatives=unwritten, negatives_valid=valid)
    selected_loss, selected_grad = run(negatives=negatives[valid])
    torch.testing.assert_close(masked_loss, selected_loss)
    torch.testing.assert_close(masked_grad, selected_grad)
    with pytest.raises(ValueError, match="negatives_valid must be a bool tensor of shape"):
        info_nce_loss_terms(key, key, negatives, temperature=0.2, negatives_valid=valid[:3])


def test_the_module_and_scalar_take_the_valid_mask_too() -> None:
    """A queue's unwritten slots may hold anything (NaN here): masked, they neither count nor
    trip the NaN check."""
    g = torch.Generator().manual_seed(7)
    negatives = F.normalize(torch.randn(10, 6, generator=g), dim=1)
    valid = torch.arange(10) < 6
    unwritten = negatives.masked_fill(~valid.unsqueeze(1), float("nan"))
    query = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    key = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    expected = InfoNCELoss(0.2)(query, key, negatives[valid])
    assert torch.equal(InfoNCELoss(0.2)(query, key, unwritten, negatives_valid=valid), expected)
    scalar = info_nce_loss(query, key, unwritten, temperature=0.2, negatives_valid=valid)
    assert torch.equal(scalar, expected)
    with pytest.raises(ValueError, match="NaN"):
        InfoNCELoss(0.2)(query, key, unwritten)  # unmasked, the NaN rows are input


@pytest.mark.parametrize("with_mask", [False, True])
def test_negatives_updated_in_place_before_backward(with_mask: bool) -> None:
    # MoCo enqueues its keys into the queue after the loss and before backward: the product must
    # have saved a copy of the rows, with or without a mask (a full queue passes none).
    g = torch.Generator().manual_seed(7)
    negatives = F.normalize(torch.randn(10, 6, generator=g), dim=1)
    key = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    mask = {"negatives_valid": torch.ones(10, dtype=torch.bool)} if with_mask else {}

    def grad(update_in_place: bool) -> torch.Tensor:
        rows = negatives.clone()
        query = F.normalize(torch.randn(4, 6, generator=torch.Generator().manual_seed(8)), dim=1)
        query.requires_grad_(True)
        loss, _ = info_nce_loss_terms(query, key, rows, temperature=0.2, **mask)  # type: ignore[arg-type]
        if update_in_place:
            rows[:4] = key
        loss.sum().backward()
        return query.grad  # type: ignore[return-value]

    assert torch.equal(grad(update_in_place=True), grad(update_in_place=False))


def test_nan_input_is_refused_on_the_cpu() -> None:
    query, key = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    negatives = F.normalize(torch.randn(16, 8), dim=1)
    poisoned = negatives.clone()
    poisoned[5, 1] = float("inf")
    for loss in (lambda *a: info_nce_loss(*a, temperature=TEMPERATURE), InfoNCELoss(TEMPERATURE)):
        with pytest.raises(ValueError, match=r"negatives contains NaN or Inf.*InfoNCE"):
            loss(query, key, poisoned)
        assert torch.isfinite(loss(query, key, negatives))
