"""A LOOK training step never makes the host wait for the device (outside the fused search's
overflow check), and the device-side guards that replace host checks still refuse bad input.

On the CPU every read is free, so the library checks on the host there. These tests run the
accelerator policy on the CPU by making ``host_reads_are_free`` answer False, and count the
operations that synchronise on CUDA (``item``/``bool``/``tolist``, ``nonzero``, ``unique``,
boolean-mask indexing, ...).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import look.memory as memory_module
import look.methods.look as look_method
import look.search as search_module
import look.sharded as sharded_module
from look.engine.trainer import TrainingStepError, pretrain
from look.host_sync import DeferredChecks
from look.losses import look_loss_terms
from look.memory import MemoryBank, MemoryQueue
from look.methods import Batch, MethodContext, build_method
from look.models import create_backbone

# The package re-exports a function named look_loss, which hides the module of that name.
look_loss_module = importlib.import_module("look.losses.look_loss")

# ATen operations whose output size or value the host must read (a synchronisation on CUDA).
_SYNCING_OPS = {
    "_local_scalar_dense",  # item(), bool(), int(), float()
    "nonzero",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "masked_select",
    "bincount",
    "repeat_interleave",
}


class SyncCounter(TorchDispatchMode):
    """Records every operation that would make the host wait for a CUDA device."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in _SYNCING_OPS:
            self.calls.append(name)
        elif name in ("index", "index_put", "index_put_") and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        ):
            self.calls.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def accelerator_policy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The accelerator code paths on the CPU; yields the list ``tolist`` calls are recorded in."""
    for module in (search_module, look_loss_module, memory_module, sharded_module, look_method):
        monkeypatch.setattr(module, "host_reads_are_free", lambda device: False)
    tolist_calls: list[str] = []
    original_tolist = torch.Tensor.tolist

    def counting_tolist(self: torch.Tensor) -> Any:
        tolist_calls.append("tolist")
        return original_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    yield tolist_calls


def _look_method(memory: str, k: int | None, rows: int = 300) -> Any:
    torch.manual_seed(0)
    backbone, feature_dim = create_backbone("look_cnn_small")
    options = {"name": "look", "k": k, "temperature": 0.1, "memory": memory}
    if memory == "queue":
        options["queue_size"] = 128
    ctx = MethodContext(num_classes=5, num_samples=rows)
    return build_method(options, backbone, feature_dim, ctx).train()


def _batch(batch_size: int, rows: int, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return Batch(
        views=[torch.randn(batch_size, 3, 28, 28, generator=generator)],
        labels=torch.randint(0, 5, (batch_size,), generator=generator),
        indices=torch.randperm(rows, generator=generator)[:batch_size],
    )


@pytest.mark.parametrize(("memory", "k"), [("bank", 20), ("bank", None), ("queue", 20)])
def test_look_step_has_no_host_sync(
    accelerator_policy: list[str], memory: str, k: int | None
) -> None:
    method = _look_method(memory, k)
    method(_batch(32, 300, seed=0))  # a partly filled memory: the valid mask is in use
    with SyncCounter() as counter:
        out = method(_batch(32, 300, seed=1))
        out.loss.backward()
    assert counter.calls == []
    assert accelerator_policy == []
    assert torch.isfinite(out.loss)


def test_sync_counter_sees_the_host_checks() -> None:
    """The counter is not blind: on the CPU policy the same step does read values."""
    method = _look_method("bank", 20)
    method(_batch(32, 300, seed=0))
    with SyncCounter() as counter:
        method(_batch(32, 300, seed=1))
    assert "_local_scalar_dense" in counter.calls


def test_non_finite_query_gives_nan_loss_instead_of_a_wait(accelerator_policy: list[str]) -> None:
    memory = F.normalize(torch.randn(50, 8), dim=1)
    query = F.normalize(torch.randn(4, 8), dim=1)
    query[2, 0] = float("nan")
    labels = torch.tensor([0, 1, 0, 1])
    terms = look_loss_terms(query, labels, memory, torch.arange(50) % 2, k=5, temperature=0.1)
    assert torch.isnan(terms.loss[2]) and bool(terms.valid[2])
    assert torch.isfinite(terms.loss[[0, 1, 3]]).all()
    # On the CPU policy the same input is refused outright.


def test_sharded_loss_marks_a_non_finite_query_with_nan(accelerator_policy: list[str]) -> None:
    bank = sharded_module.ShardedMemoryBank(40, 8)
    bank.update(torch.arange(40), torch.randn(40, 8), torch.arange(40) % 2)
    query = F.normalize(torch.randn(3, 8), dim=1)
    query[1, 3] = float("inf")
    terms = sharded_module.sharded_look_loss_terms(
        query, torch.tensor([0, 1, 0]), bank, k=5, temperature=0.1, query_indices=None
    )
    assert torch.isnan(terms.loss[1]) and bool(terms.valid[1])
    assert torch.isfinite(terms.loss[[0, 2]]).all()


def test_an_overwritten_shard_is_reported_one_write_later(accelerator_policy: list[str]) -> None:
    bank = sharded_module.ShardedMemoryBank(40, 8)
    bank.shard_range[1] = 20  # as if another rank's range had been copied over this one
    ids, labels = torch.arange(40), torch.arange(40) % 2
    bank.update(ids, F.normalize(torch.randn(40, 8), dim=1), labels)
    assert accelerator_policy == [], "the check waits on nothing at its own write"
    with pytest.raises(RuntimeError, match=r"holds rows \[0, 20\), not its own \[0, 40\)"):
        bank.update(ids, F.normalize(torch.randn(40, 8), dim=1), labels)


def test_non_finite_query_is_refused_on_the_cpu() -> None:
    query = torch.full((2, 4), float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        look_loss_terms(
            query, torch.tensor([0, 1]), torch.randn(5, 4), torch.arange(5) % 2, k=2,
            temperature=0.1,
        )  # fmt: skip


def test_a_caller_that_checks_the_loss_gets_a_nan_term_on_the_cpu_too() -> None:
    # The trainer checks every loss and applies train.nan_policy (stop or skip), so it asks for
    # the accelerator's behaviour everywhere.
    query = F.normalize(torch.randn(3, 4), dim=1)
    query[1, 2] = float("nan")
    memory = F.normalize(torch.randn(6, 4), dim=1)
    terms = look_loss_terms(
        query, torch.tensor([0, 1, 0]), memory, torch.arange(6) % 2, k=2, temperature=0.1,
        check_finite_query=False,
    )  # fmt: skip
    assert torch.isnan(terms.loss[1]) and bool(terms.valid[1])
    assert torch.isfinite(terms.loss[[0, 2]]).all()
    bank = sharded_module.ShardedMemoryBank(6, 4)
    bank.update(torch.arange(6), memory, torch.arange(6) % 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        sharded_module.sharded_look_loss_terms(
            query, torch.tensor([0, 1, 0]), bank, k=2, temperature=0.1, query_indices=None
        )
    terms = sharded_module.sharded_look_loss_terms(
        query, torch.tensor([0, 1, 0]), bank, k=2, temperature=0.1, query_indices=None,
        check_finite_query=False,
    )  # fmt: skip
    assert torch.isnan(terms.loss[1]) and torch.isfinite(terms.loss[[0, 2]]).all()


def test_a_nan_query_without_a_same_label_neighbour_is_marked_not_dropped_on_the_cpu() -> None:
    # A NaN query's neighbours are arbitrary; with no row of its label among them it would be
    # left out as "no positive" (loss 0) while its gradient is NaN: the caller's loss check
    # would never see it. It must count, with a NaN loss, on both paths.
    memory = F.normalize(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    memory_labels = torch.tensor([0] * 9 + [1])  # one row of label 1
    query = F.normalize(torch.randn(2, 4), dim=1)
    query[0] = float("nan")
    query_labels = torch.tensor([1, 0])
    for backend in ("auto", "torch"):
        terms = look_loss_terms(
            query, query_labels, memory, memory_labels, k=2, temperature=0.1,
            check_finite_query=False, search_backend=backend,
        )  # fmt: skip
        assert torch.isnan(terms.loss[0]) and bool(terms.valid[0]), backend
    bank = sharded_module.ShardedMemoryBank(10, 4)
    bank.update(torch.arange(10), memory, memory_labels)
    terms = sharded_module.sharded_look_loss_terms(
        query, query_labels, bank, k=2, temperature=0.1, query_indices=None,
        check_finite_query=False,
    )  # fmt: skip
    assert torch.isnan(terms.loss[0]) and bool(terms.valid[0])


def _unit(rows: int, dim: int = 4, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("memory_kind", ["bank", "queue"])
def test_refused_rows_are_not_written_and_reported_by_the_next_update(
    accelerator_policy: list[str], memory_kind: str
) -> None:
    memory = MemoryBank(10, 4, momentum=0.5) if memory_kind == "bank" else MemoryQueue(10, 4)
    memory.update(torch.tensor([0, 1, 2]), _unit(3), torch.tensor([0, 1, 2]))
    before = {key: value.clone() for key, value in memory.state_dict().items()}
    features = _unit(3, seed=1)
    features[1] = float("nan")
    memory.update(torch.tensor([3, 4, 5]), features, torch.tensor([0, 1, 2]))
    # Rows 3 and 5 are written, the NaN row is not.
    slot_of_nan = 4
    assert bool(memory.valid[3]) and bool(memory.valid[5]) and not bool(memory.valid[slot_of_nan])
    assert torch.isfinite(memory.features).all()
    assert int(memory.labels[slot_of_nan]) == -1 and int(memory.ids[slot_of_nan]) == -1
    for key in ("features", "labels", "ids", "valid"):
        # The buffers themselves: state_dict() would report the pending check.
        assert torch.equal(getattr(memory, key)[:3], before[key][:3]), key
    with pytest.raises(ValueError, match="1 feature rows were NaN/Inf"):
        memory.update(torch.tensor([6]), _unit(1, seed=2), torch.tensor([0]))
    # Reported once: the memory works again afterwards.
    memory.update(torch.tensor([6]), _unit(1, seed=2), torch.tensor([0]))
    assert bool(memory.valid[6])


def _memory(kind: str) -> Any:
    if kind == "bank":
        return MemoryBank(10, 4, momentum=0.5)
    if kind == "queue":
        return MemoryQueue(6, 4)
    return sharded_module.ShardedMemoryBank(10, 4, momentum=0.5)  # one process: every row


@pytest.mark.parametrize("policy", ["host", "accelerator"])
@pytest.mark.parametrize("memory_kind", ["bank", "queue", "sharded"])
def test_a_disabled_update_writes_refuses_and_reports_nothing(
    monkeypatch: pytest.MonkeyPatch, policy: str, memory_kind: str
) -> None:
    """``enabled=False`` (decided on the device: the trainer queues the write before it knows
    whether the step stands) leaves every buffer as it was, the queue's pointer too, and does
    not report the rows it would have refused; ``enabled=True`` is a plain update."""
    if policy == "accelerator":
        for module in (memory_module, sharded_module):
            monkeypatch.setattr(module, "host_reads_are_free", lambda device: False)
    memory, twin = _memory(memory_kind), _memory(memory_kind)
    for target in (memory, twin):
        target.update(torch.tensor([0, 1, 2]), _unit(3), torch.tensor([0, 1, 2]))
    before = {key: value.clone() for key, value in memory.state_dict().items()}
    poisoned = _unit(3, seed=1)
    poisoned[1] = float("nan")  # would be refused, and reported by the next update
    memory.update(torch.tensor([3, 4, 5]), poisoned, torch.tensor([0, -1, 2]),
                  enabled=torch.tensor(False))  # fmt: skip
    for key, value in before.items():  # the buffers (state_dict() would settle the checks)
        assert torch.equal(memory.state_dict()[key] if key == "ptr" else getattr(
            memory, key.removeprefix("memory.")), value), key  # fmt: skip
    good = _unit(2, seed=2)
    memory.update(torch.tensor([6, 7]), good, torch.tensor([1, 1]), enabled=torch.tensor(True))
    twin.update(torch.tensor([6, 7]), good, torch.tensor([1, 1]))  # nothing to report: no raise
    for key, value in twin.state_dict().items():
        assert torch.equal(memory.state_dict()[key], value), key


def check_the_memory_is_written_before_the_flag_read(trainer: Any) -> None:
    """For a trainer under ``train.nan_policy=skip``: the memory holds the first batch when the
    step reads its flags (the step's one host read of a tensor on the memory's device), nothing
    is left queued, and a NaN batch's skipped step leaves the memory bit-identical, with nothing
    to report at the next check. Shared by the CPU test below and the GPU test."""
    trainer.method.train()
    memory = trainer.method.memory
    batches = iter(trainer._loader(0, 0))
    batch = next(batches)
    rows_at_read: list[int] = []
    original_tolist = torch.Tensor.tolist

    def snapshot_then_read(self: torch.Tensor) -> Any:
        if self.device == memory.valid.device:  # not the sampler's reads of CPU indices on a GPU
            rows_at_read.append(int(memory.valid.sum()))
        return original_tolist(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", snapshot_then_read)
        assert trainer._step(0, batch)[0] is not None
    assert rows_at_read == [batch.indices.unique().numel()]  # written before the one read
    assert not trainer.method.has_pending_memory_writes
    trainer._finish_step(skipped=False)
    before = {key: value.clone() for key, value in memory.state_dict().items()}
    poisoned = next(batches)
    poisoned.views[0][:] = float("nan")
    assert trainer._step(0, poisoned)[0] is None
    trainer._finish_step(skipped=True)
    for key, value in memory.state_dict().items():  # settles the checks: nothing to report
        assert torch.equal(value, before[key]), key


def test_the_trainer_writes_the_memory_before_its_host_read_unless_the_step_is_skipped(
    tmp_path: Path, accelerator_policy: list[str]
) -> None:
    """On an accelerator the memory write is queued once the backward pass is, before the
    trainer reads its flags (so its kernels overlap the backward pass instead of following the
    optimizer step on an idle GPU); a step that is then skipped has written nothing."""
    from look.engine.trainer import Trainer
    from tests.engine.test_trainer import tiny_config

    trainer = Trainer(tiny_config("train.nan_policy=skip"), tmp_path / "run")
    check_the_memory_is_written_before_the_flag_read(trainer)


def test_bank_batch_with_no_good_row_changes_nothing(accelerator_policy: list[str]) -> None:
    bank = MemoryBank(6, 4, momentum=0.5)
    bank.update(torch.tensor([0, 3]), _unit(2), torch.tensor([1, 2]))
    before = {key: value.clone() for key, value in bank.state_dict().items()}
    bank.update(torch.tensor([7, -3]), _unit(2, seed=1), torch.tensor([0, 0]))  # ids outside
    for key, value in before.items():
        assert torch.equal(getattr(bank, key), value), key
    with pytest.raises(ValueError, match="2 ids were outside"):
        bank.settle_checks()


def test_bad_label_is_not_written_and_state_dict_reports_it(accelerator_policy: list[str]) -> None:
    bank = MemoryBank(6, 4, momentum=0.0)
    bank.update(torch.tensor([1, 2]), _unit(2), torch.tensor([-1, 4]))
    assert bank.valid.tolist() == [False, False, True, False, False, False]
    with pytest.raises(ValueError, match="1 labels were negative"):
        bank.state_dict()


def _sequential_bank(ids: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> MemoryBank:
    """Reference: the batch written one row at a time, in order (last occurrence wins)."""
    bank = MemoryBank(12, 4, momentum=0.0)
    for row in range(ids.numel()):
        bank.update(ids[row : row + 1], features[row : row + 1], labels[row : row + 1])
    return bank


def test_duplicate_ids_last_occurrence_wins_like_sequential_writes() -> None:
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        ids = torch.randint(0, 12, (15,), generator=generator)
        features = _unit(15, seed=int(torch.randint(0, 1000, (1,), generator=generator)))
        labels = torch.randint(0, 4, (15,), generator=generator)
        bank = MemoryBank(12, 4, momentum=0.0)
        bank.update(ids, features, labels)
        expected = _sequential_bank(ids, features, labels)
        for key in ("features", "labels", "ids", "valid"):
            assert torch.equal(getattr(bank, key), getattr(expected, key)), key


def test_deferred_checks_report_all_but_the_newest() -> None:
    seen: list[list[int]] = []
    checks = DeferredChecks()
    checks.push(torch.tensor([1, 0]), seen.append)
    checks.push(torch.tensor([2, 3]), seen.append)
    checks.settle(keep=1)
    assert seen == [[1, 0]] and len(checks) == 1
    checks.settle(keep=0)
    assert seen == [[1, 0], [2, 3]] and len(checks) == 0


def test_training_under_the_accelerator_policy_matches_the_cpu_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device-side guards change nothing for good input: the same loss curve, to the bit."""
    from tests.engine.test_trainer import tiny_config, train_losses

    pretrain(tiny_config(), tmp_path / "cpu_policy")
    for module in (search_module, look_loss_module, memory_module, sharded_module, look_method):
        monkeypatch.setattr(module, "host_reads_are_free", lambda device: False)
    pretrain(tiny_config(), tmp_path / "accelerator_policy")
    assert train_losses(tmp_path / "accelerator_policy") == train_losses(tmp_path / "cpu_policy")


def test_diverging_look_run_stops_with_finite_checkpoints_under_the_accelerator_policy(
    tmp_path: Path, accelerator_policy: list[str]
) -> None:
    from tests.engine.test_trainer import tiny_config

    cfg = tiny_config("optim.lr=1e12", "optim.warmup_epochs=0", "train.checkpoint_every_steps=1")
    # The NaN embeddings reach the loss as NaN terms: the trainer's per-step check stops the run.
    with pytest.raises(TrainingStepError, match=r"non-finite loss at step \d+"):
        pretrain(cfg, tmp_path / "run")
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))
    assert checkpoints, "the checkpoint from before the divergence must be kept"
    for checkpoint in checkpoints:
        state = torch.load(checkpoint, weights_only=True)
        assert torch.isfinite(state["model"]["memory.features"]).all()


def test_diverging_look_run_with_skip_policy_skips_without_writing_nan_rows(
    tmp_path: Path, accelerator_policy: list[str]
) -> None:
    """Skipping non-finite steps does not let their NaN embeddings into the memory (the rows of a
    skipped step are dropped with it, on the CPU as on the accelerator), the skips are counted
    and the run stops once too many come in a row; no checkpoint holds a NaN row."""
    from tests.engine.test_trainer import tiny_config

    cfg = tiny_config(
        "optim.lr=1e12", "optim.warmup_epochs=0", "train.checkpoint_every_steps=1",
        "train.nan_policy=skip", "train.nan_max_consecutive_skips=3",
    )  # fmt: skip
    with pytest.raises(TrainingStepError, match="4 in a row"):
        pretrain(cfg, tmp_path / "run")
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))
    assert checkpoints
    for checkpoint in checkpoints:
        state = torch.load(checkpoint, weights_only=True)
        assert torch.isfinite(state["model"]["memory.features"]).all()


def _search_that_overflows_at(
    calls: set[int], monkeypatch: pytest.MonkeyPatch, *, flag_it: bool = True
) -> None:
    """Make LOOK's search return wrong neighbours at the given calls (1-based), as the fused GPU
    search does for queries whose candidate buffer overflowed, flagged as such (``flag_it``)
    with the exact result as the redo, like ``knn_search_deferred``'s fused path."""
    from look.search import DeferredKnnResult, KnnResult

    original = look_loss_module.knn_search_deferred
    count = [0]

    def search(*args: Any, **kwargs: Any) -> DeferredKnnResult:
        count[0] += 1
        exact = original(*args, **kwargs).finish()
        if count[0] not in calls:
            return DeferredKnnResult(exact, None, None)
        # Another query's neighbours: real rows, wrong for this query.
        wrong = KnnResult(exact.values.roll(1, dims=0), exact.indices.roll(1, dims=0))
        flags = torch.full((exact.indices.shape[0],), flag_it, device=exact.indices.device)
        return DeferredKnnResult(wrong, flags, lambda redo_rows: exact)

    monkeypatch.setattr(look_loss_module, "knn_search_deferred", search)


def test_an_inexact_step_is_redone_exactly_after_the_backward_is_queued(
    tmp_path: Path, accelerator_policy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the trainer reads the fused search's overflow flag with its loss check, after the
    backward pass is queued, and recomputes a flagged step exactly: the run then gives the exact
    run's loss curve, to the bit. Without the flag the wrong neighbours would change it."""
    import json

    from tests.engine.test_trainer import tiny_config, train_losses

    pretrain(tiny_config(), tmp_path / "exact")
    with monkeypatch.context() as patch:
        _search_that_overflows_at({3, 8}, patch)
        pretrain(tiny_config(), tmp_path / "redone")
    with monkeypatch.context() as patch:
        _search_that_overflows_at({3, 8}, patch, flag_it=False)
        pretrain(tiny_config(), tmp_path / "unflagged")
    exact = train_losses(tmp_path / "exact")
    assert train_losses(tmp_path / "redone") == exact
    assert train_losses(tmp_path / "unflagged") != exact
    summary = json.loads((tmp_path / "redone" / "summary.json").read_text())
    assert summary["inexact_steps_redone_this_session"] == 2
    # The whole trained state too, batch norm's running statistics included: the redone forward
    # passes do not count their batches twice.
    final = {run: _last_checkpoint_model(tmp_path / run) for run in ("exact", "redone")}
    assert any(name.endswith("running_mean") for name in final["exact"])
    assert final["exact"].keys() == final["redone"].keys()
    for name, value in final["exact"].items():
        assert torch.equal(final["redone"][name], value), name


def _last_checkpoint_model(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    return torch.load(last, weights_only=True)["model"]


def test_a_look_step_on_an_accelerator_waits_for_the_device_once_after_backward(
    tmp_path: Path, accelerator_policy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's step reads the device once (loss finite? search exact?), after backward,
    and LOOK's forward does not read it at all when the trainer checks exactness."""
    import look.engine.trainer as trainer_module
    from look.engine.trainer import Trainer
    from tests.engine.test_trainer import tiny_config

    trainer = Trainer(tiny_config(), tmp_path / "run")
    trainer.method.train()
    batch = next(iter(trainer._loader(0, 0)))
    accelerator_policy.clear()  # reads while setting up the run do not count
    with SyncCounter() as counter:
        out = trainer.model(batch)
    assert counter.calls == [] and accelerator_policy == []
    assert out.inexact is None  # the scan on the CPU is always exact
    read_after_backward: list[bool] = []
    original = trainer_module.all_reduce_sum

    def spy(flags: torch.Tensor) -> torch.Tensor:
        # The flags are reduced (then read) once the backward ran: gradients exist.
        parameters = [p for p in trainer.method.parameters() if p.requires_grad]
        read_after_backward.append(all(p.grad is not None for p in parameters))
        return original(flags)

    monkeypatch.setattr(trainer_module, "all_reduce_sum", spy)
    trainer._step(0, batch)
    assert read_after_backward == [True]
    assert accelerator_policy == ["tolist"]  # the one read of the step's flags


def _ddp_trainer_worker(rank: int, port: int, out_dir: str, flag_on_rank_0: bool) -> None:
    from tests.ddp import set_torchrun_environment
    from tests.engine.test_trainer import tiny_config

    set_torchrun_environment(rank, 2, port)
    torch.set_num_threads(1)
    for module in (search_module, look_loss_module, memory_module, sharded_module, look_method):
        module.host_reads_are_free = lambda device: False  # type: ignore[attr-defined]
    if flag_on_rank_0 and rank == 0:
        with pytest.MonkeyPatch.context() as patch:
            _search_that_overflows_at({3, 8}, patch)
            pretrain(tiny_config("train.ddp_timeout_s=60"), Path(out_dir))
    else:
        pretrain(tiny_config("train.ddp_timeout_s=60"), Path(out_dir))
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_a_step_flagged_on_one_rank_is_redone_on_every_rank(tmp_path: Path) -> None:
    """The flags are agreed over ranks: when only rank 0's search overflowed, both ranks redo the
    step (a rank-local redo would leave the other waiting in a collective), and the run gives
    the loss curve of a run where nothing overflowed."""
    import json

    import torch.multiprocessing as mp

    from tests.ddp import free_port
    from tests.engine.test_trainer import train_losses

    for name, flag in (("exact", False), ("redone", True)):
        mp.spawn(
            _ddp_trainer_worker,
            args=(free_port(), str(tmp_path / name), flag),
            nprocs=2,
            join=True,
        )
    assert train_losses(tmp_path / "redone") == train_losses(tmp_path / "exact")
    summary = json.loads((tmp_path / "redone" / "summary.json").read_text())
    assert summary["inexact_steps_redone_this_session"] == 2
