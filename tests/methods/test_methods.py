from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from look.config import ConfigError
from look.losses import look_loss
from look.methods import METHODS, build_method, get_method_class

from .conftest import CTX, SMALL_HEAD, TinyBackbone, make_batch

METHOD_CFGS = {
    "look": {"name": "look", "k": 5, **SMALL_HEAD},
    "nca": {"name": "nca", **SMALL_HEAD},
    "ce": {"name": "ce"},
    "sl_mlp": {"name": "sl_mlp", **SMALL_HEAD},
    "supcon": {"name": "supcon", **SMALL_HEAD},
    "mocov2": {"name": "mocov2", "queue_size": 32, **SMALL_HEAD},
}


def test_every_registered_method_is_exercised() -> None:
    assert set(METHODS) == set(METHOD_CFGS)


@pytest.mark.parametrize("name", sorted(METHOD_CFGS))
def test_method_trains_a_few_steps(name: str) -> None:
    torch.manual_seed(0)
    method = build_method(METHOD_CFGS[name], TinyBackbone(), 12, CTX)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    before = [p.detach().clone() for p in method.backbone.parameters()]
    for step in range(4):
        batch = make_batch(16, method.num_views, num_classes=3, seed=step, offset=16 * step)
        out = method(batch)
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert all(torch.isfinite(v) for v in out.metrics.values())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        method.after_optimizer_step((step + 1) / 4)
    after = list(method.backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # Every parameter that requires grad must be reachable from the loss (DDP needs this).
    out = method(make_batch(16, method.num_views, num_classes=3, seed=9, offset=0))
    out.loss.backward()
    unused = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_look_writes_memory_after_the_loss() -> None:
    torch.manual_seed(0)
    method = build_method(METHOD_CFGS["look"], TinyBackbone(), 12, CTX)
    batch = make_batch(16, 1, num_classes=3, seed=0)
    out = method(batch)
    # Empty memory: no query has a neighbour, so the loss is an exact zero that still has a graph.
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    assert out.metrics["dropped_frac"].item() == 1.0
    assert method.memory.valid.sum().item() == 16
    assert torch.equal(method.memory.ids[batch.indices], batch.indices)


def test_look_loss_in_method_matches_functional_loss() -> None:
    torch.manual_seed(0)
    method = build_method(METHOD_CFGS["look"], TinyBackbone(), 12, CTX)
    method.eval()  # deterministic head (no BN batch statistics) for the comparison
    for step in range(3):
        method(make_batch(16, 1, num_classes=3, seed=step, offset=16 * step))
    batch = make_batch(16, 1, num_classes=3, seed=7, offset=8)
    memory = method.memory.features.clone()
    labels, valid, ids = (
        method.memory.labels.clone(),
        method.memory.valid.clone(),
        method.memory.ids.clone(),
    )
    z = torch.nn.functional.normalize(method.head(method.backbone(batch.views[0])), dim=1)
    expected = look_loss(
        z,
        batch.labels,
        memory,
        labels,
        k=5,
        temperature=0.1,
        query_indices=batch.indices,
        memory_ids=ids,
        memory_valid=valid,
    )
    assert torch.allclose(method(batch).loss, expected, atol=1e-6)


def test_nca_equals_look_with_all_neighbours() -> None:
    outs = []
    for cfg in ({"name": "nca", **SMALL_HEAD}, {"name": "look", "k": None, **SMALL_HEAD}):
        torch.manual_seed(0)
        method = build_method(cfg, TinyBackbone(), 12, CTX)
        for step in range(3):
            out = method(make_batch(16, 1, num_classes=3, seed=step, offset=16 * step))
        outs.append(out.loss)
    assert torch.equal(outs[0], outs[1])


def test_k_fraction_sets_k_from_the_mean_class_size() -> None:
    # CTX: 64 samples, 3 classes -> mean class size 21.33; half of it rounds to 11.
    method = build_method(
        {"name": "look", "k_fraction": 0.5, **SMALL_HEAD}, TinyBackbone(), 12, CTX
    )
    assert method.options.k == 11
    with pytest.raises(ConfigError, match="k_fraction must be in"):
        build_method({"name": "look", "k_fraction": 1.5}, TinyBackbone(), 12, CTX)
    with pytest.raises(ConfigError, match="give k or k_fraction, not both"):
        build_method({"name": "look", "k": 30, "k_fraction": 0.5}, TinyBackbone(), 12, CTX)


def test_impossible_k_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"k=64 is impossible.*or k: null for NCA"):
        build_method({"name": "look", "k": 64}, TinyBackbone(), 12, CTX)
    # A sharded bank needs a finite k: NCA is not offered as the way out.
    with pytest.raises(ConfigError, match=r"Use k <= 63\.$"):
        build_method({"name": "look", "k": 64, "memory": "sharded_bank"}, TinyBackbone(), 12, CTX)
    # A k from k_fraction says where it came from (one class: its mean is the whole bank).
    one_class = dataclasses.replace(CTX, num_classes=1)
    with pytest.raises(ConfigError, match=r"k=64 \(k_fraction=1\.0 × a mean class of 64 images"):
        build_method({"name": "look", "k_fraction": 1.0}, TinyBackbone(), 12, one_class)
    with pytest.raises(ConfigError, match="k must be >= 1"):
        build_method({"name": "look", "k": 0}, TinyBackbone(), 12, CTX)
    with pytest.raises(ConfigError, match="k must be null"):
        build_method({"name": "nca", "k": 5}, TinyBackbone(), 12, CTX)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": "look", "temperature": 0}, "temperature must be > 0"),
        ({"name": "look", "no_positive": "zero"}, "no_positive='zero'"),
        ({"name": "look", "memory": "queue", "memory_init": "warmup"}, "needs memory=bank"),
        ({"name": "supcon", "temperature": -1.0}, "temperature must be > 0"),
        # An option of another method: the section still holds that method's keys.
        (
            {"name": "ce", "k": 5},
            r"method 'ce' has no option 'k' \(an option of look, nca\).*method=\{name: ce\}",
        ),
        ({"name": "ce", "kk": 5}, "unknown config key"),
        ({"name": "mocov2", "encoder_momentum": 1.0}, "encoder_momentum"),
        ({"name": "simclr"}, "unknown method"),
    ],
)
def test_bad_method_options(cfg: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_method(cfg, TinyBackbone(), 12, CTX)


def test_resolved_options_are_plain_and_complete() -> None:
    resolved = get_method_class("look").resolved_options({"name": "look", "k": 7})
    assert resolved["k"] == 7 and resolved["name"] == "look"
    names = {f.name for f in dataclasses.fields(get_method_class("look").Options)}
    assert set(resolved) == names | {"name"}


@pytest.mark.parametrize("update", ["momentum", "ema_encoder"])
@pytest.mark.parametrize("memory", ["bank", "queue"])
def test_look_memory_variants(update: str, memory: str, tmp_path: Path) -> None:
    cfg = {
        "name": "look",
        "k": 5,
        "memory": memory,
        "memory_update": update,
        **({"queue_size": 32} if memory == "queue" else {}),
        **SMALL_HEAD,
    }
    torch.manual_seed(0)
    method = build_method(cfg, TinyBackbone(), 12, CTX)
    for step in range(3):
        out = method(make_batch(16, 1, num_classes=3, seed=step, offset=16 * step))
        out.loss.backward()
        method.after_optimizer_step(0.5)
    assert out.metrics["dropped_frac"].item() < 1.0
    # The memory is part of the state dict, so checkpoints carry it.
    path = tmp_path / "m.pt"
    torch.save(method.state_dict(), path)
    clone = build_method(cfg, TinyBackbone(), 12, CTX)
    clone.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(clone.memory.features, method.memory.features)


def test_look_warmup_fills_the_bank() -> None:
    method = build_method(
        {"name": "look", "k": 5, "memory_init": "warmup", **SMALL_HEAD}, TinyBackbone(), 12, CTX
    )
    assert method.needs_warmup_pass
    for start in range(0, 64, 16):
        method.warmup_step(make_batch(16, 1, num_classes=3, seed=start, offset=start))
    assert bool(method.memory.valid.all())
    out = method(make_batch(16, 1, num_classes=3, seed=99))
    assert out.metrics["dropped_frac"].item() < 1.0


def test_look_reports_saturated_queries() -> None:
    # One class: every neighbour agrees, p_i = 1, the loss and its gradient vanish.
    torch.manual_seed(0)
    method = build_method(METHOD_CFGS["look"], TinyBackbone(), 12, CTX)
    for step in range(3):
        out = method(make_batch(16, 1, num_classes=1, seed=step, offset=16 * step))
    assert out.metrics["saturated_frac"].item() == 1.0
    assert out.loss.item() == 0.0
    out = method(make_batch(16, 1, num_classes=3, seed=5, offset=0))
    assert 0.0 <= out.metrics["saturated_frac"].item() < 1.0


SHARDED_CFG = {"name": "look", "k": 5, "memory": "sharded_bank", **SMALL_HEAD}


def test_sharded_bank_look_equals_replicated_look_in_one_process() -> None:
    runs = {}
    for name, cfg in (("replicated", METHOD_CFGS["look"]), ("sharded", SHARDED_CFG)):
        torch.manual_seed(0)
        method = build_method(cfg, TinyBackbone(), 12, CTX)
        opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
        losses = []
        for step in range(3):
            out = method(make_batch(16, 1, num_classes=3, seed=step, offset=16 * step))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.detach())
        runs[name] = (method, losses)
    (replicated, expected), (sharded, got) = runs["replicated"], runs["sharded"]
    assert type(sharded.memory).__name__ == "ShardedMemoryBank"
    assert got[-1].item() > 0.0  # the later steps have neighbours, so the check is not vacuous
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-6), (a, b)
    assert torch.allclose(sharded.memory.features, replicated.memory.features, atol=1e-6)


def test_sharded_bank_needs_a_finite_k() -> None:
    with pytest.raises(ConfigError, match="sharded_bank needs a finite k"):
        build_method({**SHARDED_CFG, "k": None}, TinyBackbone(), 12, CTX)


@pytest.mark.parametrize("update", ["momentum", "ema_encoder"])
def test_sharded_bank_checkpoint_round_trips(update: str, tmp_path: Path) -> None:
    cfg = {**SHARDED_CFG, "memory_update": update}
    torch.manual_seed(0)
    method = build_method(cfg, TinyBackbone(), 12, CTX)
    for step in range(2):
        method(make_batch(16, 1, num_classes=3, seed=step, offset=16 * step))
    state = method.checkpoint_state()
    # The whole bank under the replicated bank's keys: world-size independent, no shard bounds.
    assert state["memory.features"].shape == (CTX.num_samples, SMALL_HEAD["head_out_dim"])
    assert "memory.shard_range" not in state
    path = tmp_path / "m.pt"
    torch.save(state, path)
    torch.manual_seed(1)
    clone = build_method(cfg, TinyBackbone(), 12, CTX)
    clone.load_checkpoint_state(torch.load(path, weights_only=True))
    for name in ("features", "labels", "ids", "valid"):
        assert torch.equal(getattr(clone.memory, name), getattr(method.memory, name)), name
    for (key, a), b in zip(method.state_dict().items(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    # It loads into a replicated bank too, and a wrong checkpoint is refused with its keys named.
    replicated = build_method({**cfg, "memory": "bank"}, TinyBackbone(), 12, CTX)
    replicated.load_checkpoint_state(torch.load(path, weights_only=True))
    assert torch.equal(replicated.memory.features, method.memory.features)
    with pytest.raises(ValueError, match="missing keys"):
        clone.load_checkpoint_state({k: v for k, v in state.items() if k.startswith("memory.")})


def test_large_fp32_gpu_bank_gets_advice_to_store_bf16() -> None:
    from types import SimpleNamespace

    from look.methods.look import LOOKOptions, slow_search_advice

    def bank(rows: int, dtype: torch.dtype, cuda: bool = True) -> torch.Tensor:
        # Only what the check reads; a real CUDA tensor is not needed to test the rule.
        return SimpleNamespace(is_cuda=cuda, shape=(rows, 128), dtype=dtype)  # type: ignore[return-value]

    options = LOOKOptions()
    advice = slow_search_advice(bank(1_281_167, torch.float32), 200, options)
    assert advice is not None and "memory_dtype=bfloat16" in advice
    assert slow_search_advice(bank(1_281_167, torch.bfloat16), 200, options) is None
    assert slow_search_advice(bank(1_281_167, torch.float32, cuda=False), 200, options) is None
    assert slow_search_advice(bank(60_000, torch.float32), 200, options) is None
    assert slow_search_advice(bank(1_281_167, torch.float32), None, options) is None  # NCA
    scan = LOOKOptions(search_backend="torch")
    assert slow_search_advice(bank(1_281_167, torch.float32), 200, scan) is None


@pytest.mark.parametrize("name", sorted(METHOD_CFGS))
def test_a_step_without_diagnostics_has_the_same_loss(name: str) -> None:
    # The trainer's steps that are not logged (wants_metrics False): the loss alone, unchanged.
    losses, keys = [], []
    for wants_metrics in (True, False):
        torch.manual_seed(0)
        method = build_method(METHOD_CFGS[name], TinyBackbone(), 12, CTX)
        method.wants_metrics = wants_metrics
        for step in range(2):  # the second step searches a memory the first one wrote
            out = method(make_batch(16, method.num_views, num_classes=3, seed=step))
            method.after_optimizer_step(0.5)
        losses.append(out.loss.detach())
        keys.append(set(out.metrics))
    assert torch.equal(losses[0], losses[1])
    assert keys[1] == {"loss"} and len(keys[0]) > 1 and "loss" in keys[0]


@pytest.mark.parametrize(
    "cfg",
    [
        {
            "name": "look",
            "k": 40,
            "search_backend": "auto",
            **SMALL_HEAD,
        },  # the loss's B × N product
        {"name": "look", "k": 5, "search_backend": "torch", **SMALL_HEAD},  # the chunked scan
        {"name": "look", "k": 5, "memory": "queue", "queue_size": 32, **SMALL_HEAD},
        {"name": "nca", **SMALL_HEAD},
        METHOD_CFGS["mocov2"],
    ],
    ids=["look_dense", "look_scan", "look_queue", "nca", "mocov2"],
)
def test_a_full_memory_searched_without_its_mask_gives_the_same_steps(
    cfg: dict[str, object],
) -> None:
    # Once the memory knows it is full it passes no mask (FeatureMemory.search_valid): the same
    # losses and gradients to the bit as a memory that keeps passing its all-True mask.
    runs = []
    for keep_mask in (False, True):
        torch.manual_seed(0)
        method = build_method(cfg, TinyBackbone(), 12, CTX)
        memory = method.queue if cfg["name"] == "mocov2" else method.memory
        if keep_mask:
            memory.search_valid = lambda memory=memory: memory.valid  # type: ignore[method-assign]
        opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
        losses, unmasked = [], []
        for step in range(14):  # 64 rows, 16 per step: full after 4 steps, checked at the 8th
            unmasked.append(memory.search_valid() is None)
            out = method(
                make_batch(16, method.num_views, num_classes=3, seed=step, offset=16 * step % 64)
            )
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            method.after_optimizer_step(step / 14)
            losses.append(out.loss.detach())
        runs.append((losses, unmasked, [p.detach().clone() for p in method.parameters()]))
    (losses, unmasked, params), (losses_masked, still_masked, params_masked) = runs
    assert any(unmasked) and not any(still_masked)
    assert all(torch.equal(a, b) for a, b in zip(losses, losses_masked, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(params, params_masked, strict=True))


@pytest.mark.parametrize("no_positive", ["drop", "nearest"])
def test_look_with_k_1_warns_that_it_learns_nothing(no_positive: str) -> None:
    cfg = {**METHOD_CFGS["look"], "k": 1, "no_positive": no_positive}
    with pytest.warns(RuntimeWarning, match="k=1 learns nothing"):
        method = build_method(cfg, TinyBackbone(), 12, CTX)
    # What the warning says: every step's loss is exactly zero, also with queries that have
    # their one neighbour (not all dropped).
    for step in range(3):
        out = method(make_batch(16, 1, num_classes=3, seed=step, offset=16 * step))
        method.after_optimizer_step(0.5)
        assert out.loss.item() == 0.0
    assert out.metrics["dropped_frac"].item() < 1.0


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"memory_update": "ema_encoder", "memory_momentum": 0.9}, "memory_momentum=0.9"),
        ({"memory": "queue", "memory_momentum": 0.9}, "memory_momentum=0.9 (a queue stores"),
        ({"encoder_momentum": 0.999}, "encoder_momentum=0.999"),
        ({"queue_size": 64}, "queue_size=64 (memory=bank is no queue)"),
        ({"k": None, "no_positive": "nearest"}, "no_positive='nearest'"),
    ],
)
def test_look_options_that_have_no_effect_here_are_named(
    options: dict[str, object], named: str
) -> None:
    with pytest.warns(UserWarning, match="no effect here") as caught:
        build_method({**METHOD_CFGS["look"], **options}, TinyBackbone(), 12, CTX)
    assert any(named in str(w.message) for w in caught)


def test_look_options_that_take_effect_warn_about_nothing() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for options in (
            {"memory_update": "ema_encoder", "encoder_momentum": 0.999},
            {"memory": "queue", "queue_size": 64},
            {"memory_momentum": 0.9},
        ):
            build_method({**METHOD_CFGS["look"], **options}, TinyBackbone(), 12, CTX)


def test_the_int8_search_prefilter_builds_a_bank_with_an_int8_copy() -> None:
    cfg = {"name": "look", "k": 5, "memory_dtype": "bfloat16", "search_prefilter": "int8"}
    method = build_method({**cfg, **SMALL_HEAD}, TinyBackbone(), 12, CTX)
    assert method.memory.int8_prefilter and method.memory.search_prefilter() is not None
    first = method(make_batch(16, 1, num_classes=3, seed=0))
    assert torch.isfinite(first.loss)
    # Only what is missing is asked for.
    for wrong, need in (
        ({"memory_dtype": "float32"}, r"bf16/fp16 bank for the fused search: set memory_dtype"),
        ({"memory": "queue"}, r"fused search: use memory bank or sharded_bank \(got queue\)$"),
    ):
        with pytest.raises(ConfigError, match=need):
            build_method({**cfg, **wrong, **SMALL_HEAD}, TinyBackbone(), 12, CTX)
    with pytest.raises(ConfigError, match="search_prefilter='int4' is not one of"):
        build_method({**cfg, "search_prefilter": "int4"}, TinyBackbone(), 12, CTX)
