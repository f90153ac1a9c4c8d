"""MoCo v2's shuffling BN: a key is normalised with other samples than its query, and each key
still lands in its own image's slot."""

from __future__ import annotations

import warnings

import pytest
import torch

from look.config import ConfigError
from look.methods import build_method
from look.methods.common import embed
from look.methods.mocov2 import MoCoV2

from .conftest import CTX, SMALL_HEAD, TinyBackbone, make_batch


def _moco(**options: object) -> MoCoV2:
    torch.manual_seed(0)
    cfg = {"name": "mocov2", "queue_size": 32, **SMALL_HEAD, **options}
    method = build_method(cfg, TinyBackbone(), 12, CTX)
    assert isinstance(method, MoCoV2)
    return method


def _key_images(batch_size: int = 16) -> torch.Tensor:
    return make_batch(batch_size, 2, num_classes=3, seed=0).views[1]


def _encode(method: MoCoV2, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return embed(method.key_backbone, method.key_head, images)


def test_keys_are_normalised_over_groups_of_a_random_permutation() -> None:
    method, images = _moco(bn_splits=2), _key_images()
    torch.manual_seed(1)
    with torch.no_grad():
        keys = method._shuffled_keys(images)
    torch.manual_seed(1)
    order = torch.randperm(16)
    expected = torch.empty_like(keys)
    for group in order.chunk(2):
        expected[group] = _encode(method, images[group])
    assert torch.allclose(keys, expected, atol=1e-6)
    in_order = torch.cat([_encode(method, images[:8]), _encode(method, images[8:])])
    assert not torch.allclose(keys, in_order, atol=1e-3)  # the head's BN saw other groups


def test_without_batch_norm_the_shuffle_returns_each_key_to_its_image() -> None:
    method, images = _moco(bn_splits=4, head_batch_norm=False), _key_images()
    with torch.no_grad():
        keys = method._shuffled_keys(images)
    assert torch.allclose(keys, _encode(method, images), atol=1e-6)


def test_shuffle_off_keeps_the_groups_in_order() -> None:
    method, images = _moco(bn_splits=2, shuffle_bn=False), _key_images()
    with torch.no_grad():
        keys = method._shuffled_keys(images)
    in_order = torch.cat([_encode(method, images[:8]), _encode(method, images[8:])])
    assert torch.allclose(keys, in_order, atol=1e-6)


def test_queries_are_normalised_per_group_in_order() -> None:
    split, whole = _moco(bn_splits=2, shuffle_bn=False), _moco(bn_splits=1, shuffle_bn=False)
    first, second = (make_batch(16, 2, num_classes=3, seed=s, offset=16 * s) for s in (0, 1))
    losses = []
    for method in (split, whole):
        method(first)  # fills the queue: with no negatives the loss is 0 whatever the queries
        losses.append(method(second).loss)
    assert all(torch.isfinite(loss) for loss in losses)
    assert not torch.allclose(losses[0], losses[1])


def test_a_batch_too_small_for_its_batch_norm_groups_is_refused() -> None:
    method = _moco(bn_splits=4)
    with pytest.raises(ValueError, match="bn_splits=4"):
        method(make_batch(6, 2, num_classes=3, seed=0))


def test_bn_splits_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="bn_splits must be >= 1"):
        _moco(bn_splits=0)


def test_bn_splits_that_do_not_divide_the_batch_warn() -> None:
    from dataclasses import replace

    context = CTX
    cfg = {"name": "mocov2", "queue_size": 64, **SMALL_HEAD, "bn_splits": 5}
    with pytest.warns(RuntimeWarning, match=r"they hold \[7, 7, 7, 7, 4\] samples"):
        build_method(cfg, TinyBackbone(), 12, replace(context, local_batch_size=32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_method(
            {**cfg, "bn_splits": 4}, TinyBackbone(), 12, replace(context, local_batch_size=32)
        )


def test_the_logged_queue_fill_does_not_depend_on_when_the_write_happens() -> None:
    # The trainer defers the write under some settings (nan_policy, accumulation) and not under
    # others: the logged fill is the queue as the step read it, either way.
    fills = []
    for deferred in (False, True):
        method = _moco()
        method.defer_memory_writes = deferred
        batch = make_batch(16, 2, num_classes=3, seed=0)
        fills.append(float(method(batch).metrics["queue_filled_frac"]))
    assert fills == [0.0, 0.0]


def test_one_process_with_one_bn_group_warns_that_the_shuffle_does_nothing() -> None:
    from dataclasses import replace

    trainer_context = replace(CTX, local_batch_size=32)
    cfg = {"name": "mocov2", "queue_size": 64, **SMALL_HEAD}
    with pytest.warns(RuntimeWarning, match=r"shuffles nothing.*set method.bn_splits"):
        build_method(cfg, TinyBackbone(), 12, trainer_context)
    with warnings.catch_warnings():  # groups to shuffle, or no shuffle asked for: no warning
        warnings.simplefilter("error")
        build_method({**cfg, "bn_splits": 4}, TinyBackbone(), 12, trainer_context)
        build_method({**cfg, "shuffle_bn": False}, TinyBackbone(), 12, trainer_context)
        build_method(cfg, TinyBackbone(), 12, CTX)  # a model built to evaluate, not to train
