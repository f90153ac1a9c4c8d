from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from look.engine.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from look.engine.optim import LARS, build_lr_scheduler, build_optimizer, scale_lr


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_param_groups_exclude_bias_and_norm_from_weight_decay(name: str) -> None:
    model = _small_model()
    optimizer = build_optimizer(model.named_parameters(), name=name, lr=0.1, weight_decay=1e-4)
    groups = {g["group_name"]: g for g in optimizer.param_groups}
    decay_ids = {id(p) for p in groups["decay"]["params"]}
    no_decay_ids = {id(p) for p in groups["no_decay"]["params"]}
    assert decay_ids == {id(model[0].weight), id(model[2].weight)}
    assert no_decay_ids == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert groups["decay"]["weight_decay"] == 1e-4
    assert groups["no_decay"]["weight_decay"] == 0.0
    if name == "lars":
        assert isinstance(optimizer, LARS)
        assert groups["decay"]["lars_adaptation"] is True
        assert groups["no_decay"]["lars_adaptation"] is False


def test_flag_off_applies_weight_decay_everywhere() -> None:
    model = _small_model()
    optimizer = build_optimizer(
        model.named_parameters(),
        name="sgd",
        lr=0.1,
        weight_decay=0.01,
        exclude_bias_and_norm_from_wd=False,
    )
    assert all(g["weight_decay"] == 0.01 for g in optimizer.param_groups)


def test_frozen_and_shared_parameters_are_skipped() -> None:
    shared = nn.Linear(2, 2)
    model = nn.ModuleDict({"a": shared, "b": shared, "frozen": nn.Linear(2, 2)})
    model["frozen"].requires_grad_(False)
    optimizer = build_optimizer(
        model.named_parameters(remove_duplicate=False), name="adamw", lr=1e-3, weight_decay=0.05
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == 2
    assert {id(p) for p in params} == {id(shared.weight), id(shared.bias)}


def test_build_optimizer_validates_inputs() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer(_small_model().named_parameters(), name="adam", lr=0.1, weight_decay=0.0)
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(_small_model().named_parameters(), name="sgd", lr=0.0, weight_decay=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        build_optimizer(_small_model().named_parameters(), name="sgd", lr=0.1, weight_decay=-1)
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer(
            _small_model().named_parameters(), name="lars", lr=0.1, weight_decay=0, momentum=1.0
        )
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(
            _small_model().named_parameters(),
            name="adamw",
            lr=0.1,
            weight_decay=0,
            betas=(0.9, 1.5),
        )
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(iter([]), name="sgd", lr=0.1, weight_decay=0.0)
    with pytest.raises(TypeError, match="named_parameters"):
        build_optimizer(_small_model().parameters(), name="sgd", lr=0.1, weight_decay=0.0)  # type: ignore[arg-type]


def test_lars_step_matches_hand_computation() -> None:
    linear = nn.Linear(2, 1)
    lr, momentum, wd, eta = 0.5, 0.9, 0.1, 0.001
    optimizer = build_optimizer(
        linear.named_parameters(),
        name="lars",
        lr=lr,
        weight_decay=wd,
        momentum=momentum,
        lars_trust_coefficient=eta,
    )
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
        linear.bias.copy_(torch.tensor([1.0]))
    weight_grad = [0.6, 0.8]  # ||g|| = 1
    bias_grad = 2.0

    def hand_lars(w: list[float], buffer: list[float]) -> tuple[list[float], list[float]]:
        w_norm = math.hypot(*w)
        g_norm = math.hypot(*weight_grad)
        trust = eta * w_norm / (g_norm + wd * w_norm)
        update = [trust * (g + wd * x) for g, x in zip(weight_grad, w, strict=True)]
        buffer = [momentum * b + u for b, u in zip(buffer, update, strict=True)]
        return [x - lr * b for x, b in zip(w, buffer, strict=True)], buffer

    w, w_buffer = [3.0, 4.0], [0.0, 0.0]
    b, b_buffer = 1.0, 0.0
    for _ in range(2):  # two steps so the momentum buffer is exercised
        linear.weight.grad = torch.tensor([weight_grad])
        linear.bias.grad = torch.tensor([bias_grad])
        optimizer.step()
        w, w_buffer = hand_lars(w, w_buffer)
        b_buffer = momentum * b_buffer + bias_grad  # no trust ratio, no decay on the bias
        b = b - lr * b_buffer
    torch.testing.assert_close(linear.weight, torch.tensor([w]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(linear.bias, torch.tensor([b]), rtol=1e-6, atol=1e-7)
    assert linear.weight.detach().tolist() != [[3.0, 4.0]]


def test_lars_zero_weight_uses_unit_trust_ratio() -> None:
    param = nn.Parameter(torch.zeros(2, 2))
    optimizer = LARS([param], lr=1.0, momentum=0.0, weight_decay=0.0)
    param.grad = torch.ones(2, 2)
    optimizer.step()
    torch.testing.assert_close(param.detach(), -torch.ones(2, 2))


def test_lars_first_step_exact_values() -> None:
    param = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    optimizer = LARS([param], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001)
    param.grad = torch.tensor([[0.6, 0.8]])
    optimizer.step()
    # trust = 0.001 * 5 / (1 + 0.1 * 5) = 1/300; update = [0.9, 1.2] / 300 = [0.003, 0.004]
    torch.testing.assert_close(param.detach(), torch.tensor([[2.9985, 3.998]]))


def _lr_sequence(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_cosine_values() -> None:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = build_lr_scheduler(optimizer, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    lrs = _lr_sequence(scheduler, 13)

    def cosine(t: int) -> float:
        progress = min(1.0, (t - 2) / 8)
        return 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    expected = [1.0, 2.0] + [cosine(t) for t in range(2, 13)]
    assert lrs == pytest.approx(expected)
    assert lrs[2] == pytest.approx(2.0)
    assert lrs[10] == pytest.approx(0.2) and lrs[12] == pytest.approx(0.2)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))


def test_constant_schedule_and_no_warmup() -> None:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, total_steps=6, warmup_steps=3, schedule="constant")
    assert _lr_sequence(scheduler, 6) == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_lr_scheduler(optimizer, total_steps=4, warmup_steps=0)
    assert _lr_sequence(scheduler, 1) == [1.0]


def test_scheduler_validates_inputs() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="schedule"):
        build_lr_scheduler(optimizer, total_steps=10, warmup_steps=0, schedule="step")
    with pytest.raises(ValueError, match="warmup_steps"):
        build_lr_scheduler(optimizer, total_steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="total_steps"):
        build_lr_scheduler(optimizer, total_steps=0, warmup_steps=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        build_lr_scheduler(optimizer, total_steps=10, warmup_steps=0, min_lr_ratio=1.5)


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_resume_through_checkpoint_matches_uninterrupted_run(tmp_path: Path, name: str) -> None:
    total, warmup, stop_at = 12, 3, 5
    inputs = torch.randn(total, 6, 3, 5, 5, generator=torch.Generator().manual_seed(1))

    def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        model = _model()
        model(inputs[0])  # materialise the lazy layer before building the optimizer
        optimizer = build_optimizer(model.named_parameters(), name=name, lr=0.1, weight_decay=0.01)
        scheduler = build_lr_scheduler(
            optimizer, total_steps=total, warmup_steps=warmup, min_lr_ratio=0.05
        )
        return model, optimizer, scheduler

    def train(model, optimizer, scheduler, steps: range) -> list[float]:  # type: ignore[no-untyped-def]
        lrs = []
        for step in steps:
            lrs.append([g["lr"] for g in optimizer.param_groups])
            optimizer.zero_grad()
            model(inputs[step]).square().mean().backward()
            optimizer.step()
            scheduler.step()
        return lrs

    reference = build()
    reference_lrs = train(*reference, range(total))

    first = build()
    resumed_lrs = train(*first, range(stop_at))
    save_checkpoint(
        tmp_path,
        stop_at,
        {
            "model": first[0].state_dict(),
            "optimizer": first[1].state_dict(),
            "scheduler": first[2].state_dict(),
        },
    )
    state = load_checkpoint(checkpoint_path(tmp_path, stop_at))
    second = build()
    second[0].load_state_dict(state["model"])
    second[1].load_state_dict(state["optimizer"])
    second[2].load_state_dict(state["scheduler"])
    resumed_lrs += train(*second, range(stop_at, total))

    assert resumed_lrs == reference_lrs
    for resumed, uninterrupted in zip(
        second[0].state_dict().values(), reference[0].state_dict().values(), strict=True
    ):
        torch.testing.assert_close(resumed, uninterrupted, rtol=0, atol=0)


def test_scale_lr() -> None:
    assert scale_lr(0.1, 1024) == pytest.approx(0.4)
    assert scale_lr(0.3, 128, reference_batch=256) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="global_batch"):
        scale_lr(0.1, 0)
    with pytest.raises(ValueError, match="base_lr"):
        scale_lr(-0.1, 256)
