"""Optimisers (SGD, LARS, AdamW) with weight-decay parameter groups, and warm-up + cosine schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "LARS",
    "OPTIMIZER_NAMES",
    "SCHEDULE_NAMES",
    "build_lr_scheduler",
    "build_optimizer",
    "scale_lr",
]

OPTIMIZER_NAMES = ("sgd", "lars", "adamw")
SCHEDULE_NAMES = ("cosine", "constant")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You, Gitman & Ginsburg, 2017).

    For each parameter ``w`` with gradient ``g`` in a group with ``lars_adaptation=True``::

        trust = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w||)   (1 if either norm is 0)
        update = trust * (g + weight_decay * w)
        buffer = momentum * buffer + update
        w = w - lr * buffer

    Groups with ``lars_adaptation=False`` (biases and normalisation weights, by the common practice
    of SimCLR/BYOL) skip the trust ratio and are plain momentum SGD with their own weight decay.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float,
        *,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        lars_adaptation: bool = True,
    ) -> None:
        _check_positive("lr", lr)
        _check_non_negative("weight_decay", weight_decay)
        _check_momentum(momentum)
        _check_positive("trust_coefficient", trust_coefficient)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "lars_adaptation": lars_adaptation,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one update; ``closure`` re-evaluates the loss as in ``torch.optim.SGD``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            weight_decay = group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                update = grad.add(param, alpha=weight_decay) if weight_decay != 0 else grad.clone()
                if group["lars_adaptation"]:
                    weight_norm = torch.linalg.vector_norm(param)
                    grad_norm = torch.linalg.vector_norm(grad)
                    trust_ratio = torch.where(
                        (weight_norm > 0) & (grad_norm > 0),
                        group["trust_coefficient"]
                        * weight_norm
                        / (grad_norm + weight_decay * weight_norm),
                        torch.ones_like(weight_norm),
                    )
                    update.mul_(trust_ratio)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(update)
                param.add_(buffer, alpha=-group["lr"])
        return loss


def build_optimizer(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    *,
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    exclude_bias_and_norm_from_wd: bool = True,
    lars_trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """Build ``"sgd"``, ``"lars"`` or ``"adamw"`` over ``model.named_parameters()``.

    Parameters are split into two groups (empty ones are left out), each tagged with ``group_name``:

    - ``"decay"``: tensors with 2 or more dimensions (conv and linear weights), ``weight_decay``;
    - ``"no_decay"``: 1-D and 0-D tensors and ``*.bias`` (biases, normalisation weights, learnable
      scalars), weight decay 0 when ``exclude_bias_and_norm_from_wd`` else ``weight_decay``; LARS
      never applies its trust ratio to this group.

    Frozen parameters (``requires_grad=False``) and repeated (shared) parameters are skipped.
    """
    name = name.lower() if isinstance(name, str) else name
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_NAMES)}")
    _check_positive("lr", lr)
    _check_non_negative("weight_decay", weight_decay)
    if name in ("sgd", "lars"):
        _check_momentum(momentum)
    if name == "lars":
        _check_positive("lars_trust_coefficient", lars_trust_coefficient)
    if name == "adamw" and (len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")

    decay, no_decay = _split_decay_groups(named_parameters)
    vector_weight_decay = 0.0 if exclude_bias_and_norm_from_wd else weight_decay
    groups: list[dict] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "group_name": "decay"})
    if no_decay:
        groups.append(
            {"params": no_decay, "weight_decay": vector_weight_decay, "group_name": "no_decay"}
        )
    if name == "lars":
        for group in groups:
            group["lars_adaptation"] = group["group_name"] == "decay"
        return LARS(
            groups,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=lars_trust_coefficient,
        )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def _split_decay_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for item in named_parameters:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
            raise TypeError(
                "expected (name, parameter) pairs such as model.named_parameters(), got an item "
                f"of type {type(item).__qualname__}"
            )
        param_name, param = item
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim <= 1 or param_name.endswith(".bias") or param_name == "bias":
            no_decay.append(param)
        else:
            decay.append(param)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters were given to the optimizer")
    return decay, no_decay


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.0,
    schedule: str = "cosine",
) -> LambdaLR:
    """Per-step schedule: linear warm-up from ``lr/warmup_steps`` to ``lr``, then cosine or constant.

    Call ``scheduler.step()`` after every optimizer step; the lr of step ``t`` (0-based) is
    ``lr * f(t)`` with ``f(t) = (t+1)/warmup_steps`` during warm-up, then for ``"cosine"``
    ``min_lr_ratio + (1-min_lr_ratio) * (1+cos(pi*p))/2`` where ``p = (t-warmup)/(total-warmup)``
    (held at ``min_lr_ratio`` past ``total_steps``), and 1 for ``"constant"``.

    The multiplier is a plain function, so ``scheduler.state_dict()`` holds only counters and the
    schedule itself comes from the configuration. To resume, rebuild the optimizer and scheduler
    the same way, then load the optimizer's state dict and the scheduler's state dict.
    """
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {SCHEDULE_NAMES}")
    if type(total_steps) is not int or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if type(warmup_steps) is not int or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be an int in [0, total_steps={total_steps}], got {warmup_steps!r}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    decay_steps = max(1, total_steps - warmup_steps)

    def lr_multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, lr_lambda=lr_multiplier)


def scale_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule (Goyal et al., 2017): ``base_lr * global_batch / reference_batch``."""
    _check_positive("base_lr", base_lr)
    if type(global_batch) is not int or global_batch < 1:
        raise ValueError(f"global_batch must be a positive int, got {global_batch!r}")
    if type(reference_batch) is not int or reference_batch < 1:
        raise ValueError(f"reference_batch must be a positive int, got {reference_batch!r}")
    return base_lr * global_batch / reference_batch


def _check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_momentum(momentum: float) -> None:
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
