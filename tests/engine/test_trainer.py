from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from look.config import ConfigError, RunConfig, load_config
from look.engine.trainer import Trainer, TrainingStepError, pretrain
from look.methods import Batch
from look.models import load_exported_backbone

TINY = [
    "data.dataset=synthetic",
    "data.synthetic_num_samples=96",
    "data.synthetic_num_classes=4",
    "data.synthetic_image_size=16",
    "data.num_workers=0",
    "model.backbone=look_resnet_tiny",
    "method.name=look",
    "method.k=5",
    "method.head_hidden_dim=32",
    "method.head_out_dim=16",
    "optim.batch_size=16",
    "optim.epochs=2",
    "optim.warmup_epochs=0.5",
    "train.log_every_steps=1",
    "train.checkpoint_every_steps=4",
    "train.tensorboard=false",
    "train.progress=false",
    "train.device=cpu",
]


def tiny_config(*extra: str) -> RunConfig:
    return load_config(None, [*TINY, *extra])


def pretrain_on_rank(rank: int, port: int, out_dir: str, overrides: tuple[str, ...]) -> None:
    """One of two gloo ranks of a tiny run (an ``mp.spawn`` target), as under torchrun."""
    from tests.ddp import set_torchrun_environment

    set_torchrun_environment(rank, 2, port)
    torch.set_num_threads(1)
    pretrain(tiny_config(*overrides, "train.ddp_timeout_s=60"), Path(out_dir))
    torch.distributed.destroy_process_group()


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        r["step"]: r["loss"] for r in rows if r.get("split", "train") == "train" and "loss" in r
    }


def test_the_memory_warm_up_writes_every_row_and_leaves_the_running_statistics(
    tmp_path: Path,
) -> None:
    from look.engine.trainer import Trainer

    trainer = Trainer(tiny_config("method.memory_init=warmup"), tmp_path / "r")
    statistics = {
        name: buffer.clone()
        for name, buffer in trainer.method.named_buffers()
        if name.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    assert statistics, "the tiny backbone has batch norm"
    trainer._warmup_memory()
    assert bool(trainer.method.memory.valid.all()), "every row written"
    for name, buffer in trainer.method.named_buffers():
        if name in statistics:
            assert torch.equal(buffer, statistics[name]), f"the warm-up moved {name}"


def test_the_memory_knows_the_per_rank_batch(tmp_path: Path) -> None:
    # Under DDP this lets the memory gather without reading row counts on the host.
    from look.engine.trainer import Trainer

    trainer = Trainer(tiny_config("method.memory=queue", "method.queue_size=32"), tmp_path / "r")
    assert trainer.method.memory.rows_per_rank == 16  # type: ignore[union-attr]


def test_tiny_run_writes_everything(tmp_path: Path) -> None:
    result = pretrain(tiny_config(), tmp_path / "run")
    run = tmp_path / "run"
    assert result.global_step == 12 and result.epochs_completed == 2
    assert len(result.epoch_seconds) == 2
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"]["k"] == 5 and saved["method"]["temperature"] == 0.1  # defaults filled
    assert sorted(train_losses(run)) == list(range(1, 13))
    assert (run / "metrics_train.csv").is_file() and (run / "metrics_epoch.csv").is_file()
    assert json.loads((run / "summary.json").read_text())["global_step"] == 12
    ckpts = sorted((run / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts and ckpts[-1].name == "ckpt-000000012.pt"
    state = torch.load(ckpts[-1], weights_only=True)  # no pickled objects anywhere
    assert state["global_step"] == 12 and state["config"]["method"]["name"] == "look"
    assert state["model"]["memory.valid"].all()
    backbone, dim = load_exported_backbone(str(run / "backbone.safetensors"))
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, dim)
    # The file alone (copied out of the run) still says how the backbone was pre-trained.
    from safetensors import safe_open

    with safe_open(str(run / "backbone.safetensors"), "pt") as exported:
        metadata = exported.metadata()
    assert metadata["dataset"] == "synthetic" and metadata["image_size"] == "16"


@pytest.mark.parametrize("method", ["look", "look_sharded_bank", "ce"])
def test_resume_mid_epoch_gives_the_identical_loss_curve(tmp_path: Path, method: str) -> None:
    extra = {
        "look": (),
        "look_sharded_bank": ("method.memory=sharded_bank",),
        "ce": ("method={name: ce}",),
    }[method]
    pretrain(tiny_config(*extra), tmp_path / "full")
    # Stop after 5 steps (checkpoint at step 4 and at the stop), then run the rest.
    pretrain(tiny_config(*extra, "train.max_steps=5"), tmp_path / "split")
    pretrain(tiny_config(*extra), tmp_path / "split")
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert sorted(split) == sorted(full) == list(range(1, 13))
    assert split == full


def test_the_training_loader_leaves_torchs_global_generator_alone(tmp_path: Path) -> None:
    # A run resumed mid-epoch creates one loader iterator more than an uninterrupted run: had it
    # drawn from the global generator, every later draw (MoCo's shuffled batch norm under DDP,
    # dropout) would differ from the uninterrupted run's.
    from look.engine.trainer import Trainer

    trainer = Trainer(tiny_config(), tmp_path / "run")
    before = torch.get_rng_state()
    next(iter(trainer._loader(epoch=1, start_step=2)))
    assert torch.equal(torch.get_rng_state(), before)


def test_the_plan_shows_the_k_that_k_fraction_gives(tmp_path: Path) -> None:
    from look.engine.trainer import Trainer

    # 96 images in 4 classes: a mean class of 24, half of it 12. (k: null, or the default k,
    # may stand next to k_fraction; another k may not.)
    trainer = Trainer(tiny_config("method.k=null", "method.k_fraction=0.5"), tmp_path / "run")
    method = trainer.plan()["method"]
    assert method["k"] == 12 and method["k_fraction"] == 0.5
    with pytest.raises(ConfigError, match=r"not both .*--set method\.k_fraction=null"):
        Trainer(tiny_config("method.k_fraction=0.5"), tmp_path / "other")


def test_a_run_records_the_k_that_k_fraction_gave_and_not_the_unused_k(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors import safe_open

    run = tmp_path / "run"
    pretrain(tiny_config("method.k=null", "method.k_fraction=0.5", "train.max_steps=1"), run)
    assert "the method derived from the data: method.k=12" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["derived_method_options"] == {"k": 12}
    config_text = (run / "config.yaml").read_text()
    assert config_text.startswith("# derived from the data at the start: method.k=12\n")
    assert load_config(run / "config.yaml").method["k_fraction"] == 0.5  # (still a recipe)
    with safe_open(str(run / "backbone.safetensors"), "pt") as exported:
        training = json.loads(exported.metadata()["training"])
    assert training["method_options"]["k_fraction"] == 0.5
    assert "k" not in training["method_options"]  # not the k the run never used
    # A run that sets k itself derives nothing.
    pretrain(tiny_config("train.max_steps=1"), tmp_path / "plain")
    assert (
        json.loads((tmp_path / "plain" / "summary.json").read_text())["derived_method_options"]
        == {}
    )
    assert not (tmp_path / "plain" / "config.yaml").read_text().startswith("#")


def test_csv_logs_follow_every_checkpoint_and_log_each_steps_own_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import csv

    from look.engine.metrics_log import MetricsLogger

    # A job killed before its end never closes its logger: its CSV files must not depend on it.
    monkeypatch.setattr(MetricsLogger, "close", lambda self: None)
    pretrain(tiny_config("optim.warmup_epochs=0", "train.max_steps=8"), tmp_path / "run")
    with open(tmp_path / "run" / "metrics_train.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["step"]) for row in rows] == list(range(1, 9))
    # Step 1 trains at the full rate (no warm-up), and every step at a positive one (the
    # schedule reaches 0 after the last step of its 12).
    assert float(rows[0]["lr"]) == pytest.approx(0.1)
    assert all(float(row["lr"]) > 0 for row in rows)
    assert float(rows[1]["lr"]) < float(rows[0]["lr"])


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    pretrain(tiny_config("train.max_steps=2"), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"method\.k: checkpoint 5 vs now 6"):
        pretrain(tiny_config("method.k=6"), tmp_path / "run")
    # Starting over removes the earlier run's checkpoints (tests/engine/test_run_directory.py).
    pretrain(tiny_config("method.k=6", "train.max_steps=1"), tmp_path / "run", resume=False)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("ckpt-*.pt")] == [
        "ckpt-000000001.pt"
    ]


def test_resume_follows_the_data_not_its_folder(tmp_path: Path) -> None:
    import shutil

    from PIL import Image

    from tests.engine.test_check_images import image_folder_overrides, write_image_folder

    images, run = tmp_path / "images", tmp_path / "run"
    write_image_folder(images, broken=0)
    pretrain(tiny_config(*image_folder_overrides(images, "train.max_steps=1")), run)
    # The same images copied elsewhere (a node's local disk): the run goes on from there.
    shutil.copytree(images, tmp_path / "copy")
    copy = image_folder_overrides(tmp_path / "copy", "train.max_steps=2")
    assert pretrain(tiny_config(*copy), run).global_step == 2
    # One image more: the checkpoint's memory rows and sampler positions index another list.
    Image.new("RGB", (16, 16)).save(tmp_path / "copy" / "train" / "a" / "extra.png")
    with pytest.raises(
        ConfigError, match=r"trained on other data .*16 images in 2 classes.*17 images"
    ):
        pretrain(tiny_config(*image_folder_overrides(tmp_path / "copy")), run)
    # Renamed, same count: refused too.
    (tmp_path / "copy" / "train" / "a" / "extra.png").unlink()
    (tmp_path / "copy" / "train" / "a" / "00.png").rename(
        tmp_path / "copy" / "train" / "a" / "x.png"
    )
    with pytest.raises(ConfigError, match=r"trained on other data .*16 images.*16 images"):
        pretrain(tiny_config(*image_folder_overrides(tmp_path / "copy")), run)


def test_resume_may_change_the_search_backend_and_chunk_size(tmp_path: Path) -> None:
    # Speed settings only; a run saved before method.search_backend existed must resume too.
    pretrain(tiny_config("train.max_steps=2", "method.search_backend=torch"), tmp_path / "run")
    result = pretrain(tiny_config("train.max_steps=4", "method.chunk_size=7"), tmp_path / "run")
    assert result.global_step == 4


def test_resume_with_another_precision_goes_on_and_warns_that_the_curve_leaves_the_old_one(
    tmp_path: Path,
) -> None:
    # Other hardware may need another precision; the run goes on, but not as the same curve.
    pretrain(tiny_config("train.max_steps=2", "train.amp=none"), tmp_path / "run")
    with pytest.warns(RuntimeWarning, match=r"train\.amp: checkpoint 'none' vs now 'bf16'"):
        result = pretrain(tiny_config("train.max_steps=3", "train.amp=bf16"), tmp_path / "run")
    assert result.global_step == 3
    with warnings.catch_warnings():  # logging, checkpointing and the like change nothing learnt
        warnings.filterwarnings("error", message="resuming")
        pretrain(
            tiny_config("train.max_steps=4", "train.amp=bf16", "train.log_every_steps=3"),
            tmp_path / "run",
        )


@pytest.mark.parametrize(("first", "then"), [("bank", "sharded_bank"), ("sharded_bank", "bank")])
def test_resume_may_swap_a_bank_for_a_sharded_one(tmp_path: Path, first: str, then: str) -> None:
    """A sharded bank is the same bank spread over the ranks (its checkpoint holds the whole
    bank): a run may move to it when it grows past one GPU's memory, or back, and the curve goes
    on as if it had never changed (up to float rounding)."""
    whole = train_losses_of(pretrain(tiny_config(f"method.memory={first}"), tmp_path / "whole"))
    pretrain(tiny_config(f"method.memory={first}", "train.max_steps=5"), tmp_path / "swap")
    swapped = train_losses_of(pretrain(tiny_config(f"method.memory={then}"), tmp_path / "swap"))
    # The two memories compute the loss along different paths: equal up to float rounding.
    assert swapped.keys() == whole.keys()
    assert swapped == pytest.approx(whole, rel=1e-5)
    with pytest.raises(ConfigError, match=r"method\.memory"):  # a queue is another memory
        pretrain(tiny_config("method.memory=queue", "method.queue_size=32"), tmp_path / "swap")


def train_losses_of(result: Any) -> dict[int, float]:
    return train_losses(result.output_dir)


def test_batch_larger_than_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="larger than the training set"):
        pretrain(tiny_config("optim.batch_size=128"), tmp_path / "run")


DIVERGING = (
    "method={name: ce}",
    "optim.lr=1e12",
    "optim.warmup_epochs=0",
    "train.checkpoint_every_steps=1",
)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    # A huge learning rate makes CE diverge to inf/nan after the first update.
    with pytest.raises(TrainingStepError, match=r"non-finite loss at step \d+ \(epoch 0"):
        pretrain(tiny_config(*DIVERGING), tmp_path / "run")
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts, "the checkpoint from before the divergence must be kept"
    for ckpt in ckpts:
        state = torch.load(ckpt, weights_only=True)
        assert all(
            torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()
        )


def test_skip_policy_gives_up_after_too_many_consecutive_skips(tmp_path: Path) -> None:
    cfg = tiny_config(*DIVERGING, "train.nan_policy=skip", "train.nan_max_consecutive_skips=3")
    with pytest.raises(TrainingStepError, match="4 in a row"):
        pretrain(cfg, tmp_path / "run")


def test_a_skipped_step_leaves_the_running_statistics_as_they_were(tmp_path: Path) -> None:
    # Its gradients are dropped; so must be what its forward pass did to batch norm's running
    # statistics, which a NaN batch would otherwise fill with NaN for the rest of the run.
    from look.engine.trainer import Trainer

    trainer = Trainer(tiny_config("method={name: ce}", "train.nan_policy=skip"), tmp_path / "run")
    trainer.method.train()
    statistics = trainer.running_statistics.live
    assert len(statistics) >= 6  # running mean, variance and count of several batch norms
    batch = next(iter(trainer._loader(0, 0)))
    before = [tensor.clone() for tensor in statistics]
    poisoned = Batch([view.clone() for view in batch.views], batch.labels, batch.indices)
    poisoned.views[0][0] = float("nan")
    assert trainer._step(0, poisoned)[0] is None  # skipped
    assert trainer.skipped_steps == 1
    for now, then in zip(statistics, before, strict=True):
        assert torch.equal(now, then)
    # A good step does move them: the check above is not vacuous.
    assert trainer._step(0, batch)[0] is not None
    assert any(not torch.equal(now, then) for now, then in zip(statistics, before, strict=True))


def _memory_state(trainer: Any) -> dict[str, torch.Tensor]:
    """Everything of the method that is not trained by gradients: memories, queues, EMA copies."""
    trained = {name for name, p in trainer.method.named_parameters() if p.requires_grad}
    return {
        name: value.clone()
        for name, value in trainer.method.checkpoint_state().items()
        if name not in trained
    }


@pytest.mark.parametrize(
    "method",
    ["method.memory_update=momentum", "method.memory_update=ema_encoder",
     "method={name: mocov2, queue_size: 32}"],
    ids=["look", "look_ema_encoder", "mocov2"],
)  # fmt: skip
def test_a_skipped_step_leaves_no_trace_in_the_memory(tmp_path: Path, method: str) -> None:
    # A NaN batch under train.nan_policy=skip: its rows (NaN embeddings) must not reach the
    # memory bank or key queue, whose NaN check would otherwise stop the run the policy was
    # meant to keep going; nor may the momentum encoders move.
    from look.engine.trainer import Trainer

    trainer = Trainer(tiny_config(method, "train.nan_policy=skip"), tmp_path / "run")
    trainer.method.train()
    batches = iter(trainer._loader(0, 0))
    trainer._step(0, next(batches))  # one good step, so the memory holds something
    trainer._finish_step(skipped=False)
    before = _memory_state(trainer)
    batch = next(batches)
    poisoned = Batch([view.clone() for view in batch.views], batch.labels, batch.indices)
    poisoned.views[0][:] = float("nan")
    if len(poisoned.views) > 1:
        poisoned.views[1][:] = float("nan")  # MoCo's keys come from the second view
    assert trainer._step(0, poisoned)[0] is None
    trainer._finish_step(skipped=True)
    after = _memory_state(trainer)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    # The same batch, not poisoned, does change the memory: the check above is not vacuous.
    assert trainer._step(0, batch)[0] is not None
    trainer._finish_step(skipped=False)
    after = _memory_state(trainer)
    assert any(not torch.equal(after[name], value) for name, value in before.items())


def _cli(run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = [a for a in TINY if not a.startswith("data.synthetic_num_samples")]
    overrides = [*args, "data.synthetic_num_samples=480", "optim.epochs=3", *extra]
    cmd = [sys.executable, "-m", "look", "pretrain", "--output", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_kill_9_then_rerun_resumes_with_the_identical_curve(tmp_path: Path) -> None:
    reference = _cli(tmp_path / "reference")
    assert reference.wait(timeout=240) == 0, reference.stdout.read().decode()  # type: ignore[union-attr]

    victim = _cli(tmp_path / "victim")
    manifest = tmp_path / "victim" / "checkpoints" / "checkpoints.json"
    deadline = time.time() + 120
    while not manifest.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "victim" / "summary.json").exists()

    resumed = _cli(tmp_path / "victim")
    output = resumed.communicate(timeout=240)[0].decode()
    assert resumed.returncode == 0, output
    assert "resuming" in output
    assert train_losses(tmp_path / "victim") == train_losses(tmp_path / "reference")


def test_only_the_logged_steps_compute_diagnostics(tmp_path: Path) -> None:
    from look.engine.trainer import Trainer

    trainer = Trainer(tiny_config("train.log_every_steps=5", "train.max_steps=7"), tmp_path / "r")
    asked: list[bool] = []
    forward = trainer.method.forward

    def spy(batch: Batch) -> Any:
        asked.append(trainer.method.wants_metrics)
        return forward(batch)

    trainer.method.forward = spy  # type: ignore[method-assign]
    trainer.fit()
    # Steps 5 and 7 (the last) are logged, with LOOK's diagnostics.
    assert asked == [False, False, False, False, True, False, True]
    assert trainer.method.wants_metrics
    rows = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [r for r in rows if r.get("split", "train") == "train" and "loss" in r]
    assert [r["step"] for r in logged] == [5, 7]
    assert all("saturated_frac" in r and "memory_filled_frac" in r for r in logged)


def test_a_logged_step_is_written_after_the_next_steps_host_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading a logged step's metrics at once would make the host wait for the GPU a second time
    # in that step; they are written after the next step's own read, and before any checkpoint.
    from look.engine.metrics_log import MetricsLogger
    from look.engine.trainer import Trainer

    events: list[str] = []
    log = MetricsLogger.log

    def spy_log(self: MetricsLogger, step: int, values: Any, split: str = "train") -> None:
        events.append(f"{split}{step}")
        log(self, step, values, split=split)

    monkeypatch.setattr(MetricsLogger, "log", spy_log)
    overrides = ("train.log_every_steps=2", "train.max_steps=7", "train.checkpoint_every_steps=6")
    trainer = Trainer(tiny_config(*overrides), tmp_path / "r")
    forward = trainer.method.forward

    def spy_forward(batch: Batch) -> Any:
        events.append(f"forward{trainer.global_step + 1}")
        return forward(batch)

    trainer.method.forward = spy_forward  # type: ignore[method-assign]
    trainer.fit()
    # Step 6 ends the epoch (96 images, batch 16) and is checkpointed: logged before both.
    assert events == [
        "forward1", "forward2", "forward3", "train2", "forward4", "forward5", "train4",
        "forward6", "train6", "epoch6", "forward7", "train7",
    ]  # fmt: skip
    rows = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6, 7]
    assert all(r["lr"] > 0 and "saturated_frac" in r for r in rows if r["split"] == "train")


def test_steps_whose_loss_counts_no_item_are_counted_and_reported(tmp_path: Path) -> None:
    """Every class holds one image: LOOK never finds a neighbour of the query's class, so the
    loss is exactly 0 with no gradient. That must not pass silently for a converged run."""
    config = tiny_config(
        "data.synthetic_num_samples=32", "data.synthetic_num_classes=32", "method.k=3"
    )
    with pytest.warns(RuntimeWarning, match=r"epoch 0: 2 of 2 steps had no item the loss"):
        pretrain(config, tmp_path / "run")
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    epochs = [r for r in rows if r.get("split") == "epoch"]
    assert [r["steps_without_items"] for r in epochs] == [2, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps_without_items"] == 4

    # An ordinary run: only its first step, on a memory nothing was written to yet, may count.
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        pretrain(tiny_config(), tmp_path / "ordinary")
    summary = json.loads((tmp_path / "ordinary" / "summary.json").read_text())
    assert summary["steps_without_items"] <= 1


def test_a_vit_on_small_images_through_backbone_kwargs(tmp_path: Path) -> None:
    """timm's ViTs are built for 224 px: model.backbone_kwargs passes their img_size and
    patch_size, and the export records them, so evaluation rebuilds the same model."""
    from look.evaluation import ModelSource, load_model

    vit = (
        "model.backbone=vit_tiny_patch16_224",
        "model.backbone_kwargs={img_size: 16, patch_size: 4}",
    )
    pretrain(tiny_config(*vit, "train.max_steps=2"), tmp_path / "run")
    exported = load_exported_backbone(tmp_path / "run" / "backbone.safetensors")[0]
    assert exported.patch_embed.img_size == (16, 16)
    loaded = load_model(ModelSource(checkpoint=tmp_path / "run"))
    assert loaded.backbone(torch.randn(2, 3, 16, 16)).shape == (2, loaded.feature_dim)
    from look.engine.export import export_from_checkpoint

    export_from_checkpoint(tmp_path / "run", tmp_path / "again.safetensors")  # look export
    assert load_exported_backbone(tmp_path / "again.safetensors")[1] == loaded.feature_dim
    # Resumed with the same arguments; other arguments are another model.
    assert pretrain(tiny_config(*vit, "train.max_steps=3"), tmp_path / "run").global_step == 3
    with pytest.raises(ConfigError, match=r"model\.backbone_kwargs"):
        pretrain(
            tiny_config(vit[0], "model.backbone_kwargs={img_size: 16, patch_size: 8}"),
            tmp_path / "run",
        )


def test_a_run_saved_before_a_config_key_existed_resumes_with_its_default() -> None:
    from dataclasses import asdict

    from look.engine.trainer import _config_differences

    now = asdict(tiny_config())
    saved = {**now, "model": {k: v for k, v in now["model"].items() if k != "backbone_kwargs"}}
    assert _config_differences(saved, now) == []
    changed = {**now, "model": {**now["model"], "backbone_kwargs": {"img_size": 16}}}
    assert _config_differences(saved, changed) == [
        "model.backbone_kwargs: checkpoint {} vs now {'img_size': 16}"
    ]


def test_images_too_small_for_the_backbone_are_refused_when_the_trainer_is_built(
    tmp_path: Path,
) -> None:
    # convnext's 4×4 patch stem and three 2×2 downsamplings need 32 px; the message says so
    # before a batch is read, not torch's error from inside a layer at the first step.
    with pytest.raises(ValueError, match=r"'convnext_atto' cannot take 16 px images.*at least 32"):
        Trainer(tiny_config("model.backbone=convnext_atto"), tmp_path / "run")


def _draws_after_building_on_rank(rank: int, port: int, out_dir: str) -> None:
    """Build a trainer on one of two gloo ranks; write its first parameter and its next draw."""
    from tests.ddp import set_torchrun_environment

    set_torchrun_environment(rank, 2, port)
    torch.set_num_threads(1)
    trainer = Trainer(tiny_config("train.ddp_timeout_s=60"), Path(out_dir))
    first_parameter = next(trainer.method.parameters()).detach().clone()
    torch.save(
        {"parameter": first_parameter, "draw": torch.rand(8)}, Path(out_dir) / f"rank{rank}.pt"
    )
    torch.distributed.destroy_process_group()


def test_ranks_build_the_same_model_then_draw_their_own_masks(tmp_path: Path) -> None:
    """Dropout and drop-path masks must differ between ranks (their images do), while the model
    and memory they start from are one."""
    import torch.multiprocessing as mp

    from tests.ddp import free_port

    mp.spawn(_draws_after_building_on_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert torch.equal(ranks[0]["parameter"], ranks[1]["parameter"])
    assert not torch.equal(ranks[0]["draw"], ranks[1]["draw"])
    one_process = Trainer(tiny_config(), tmp_path / "one")  # rank 0 draws as one process does
    assert torch.equal(next(one_process.method.parameters()).detach(), ranks[0]["parameter"])
    assert torch.equal(torch.rand(8), ranks[0]["draw"])


def test_progress_in_a_log_that_is_no_terminal_is_whole_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A SLURM .out file: tqdm's carriage returns made one endless line of the whole run.
    pretrain(tiny_config("train.progress=true", "train.max_steps=6"), tmp_path / "run")
    lines = [line for line in capsys.readouterr().err.splitlines() if "look: step" in line]
    assert lines[0].startswith("look: step 1/6 (16.7 %), loss ") and "img/s, about" in lines[0]
    assert lines[-1].startswith("look: step 6/6 (100.0 %)") and lines[-1].endswith("0:00:00 left")
    assert len(lines) == 2, "one line per 30 s in between"
