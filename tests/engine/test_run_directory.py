"""What a run directory keeps and says across restarts: readers that leave a live job alone, a
fresh start that leaves no old checkpoint, a resumed run that is not finished until it is, a
failed save, initial weights that moved, and ranks that agree on the checkpoint they resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from look.engine.checkpoint import CheckpointCorruptError, find_checkpoint_files
from look.engine.export import load_checkpoint_from
from look.engine.trainer import Trainer, TrainingStepError, pretrain

from .test_trainer import tiny_config


def _fail_at_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next run dies at its first step, before it saves anything (a kill, a diverging
    step): what it left behind is what the test reads."""

    def fail(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        # As a real step error says it: what it leaves to resume from.
        raise TrainingStepError(f"step {self.global_step + 1} failed. {self._kept_checkpoint()}")

    monkeypatch.setattr(Trainer, "_step", fail)


def test_readers_leave_a_save_in_progress_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=2"), run)
    # The temporary file of a save in progress, as a live job holds it.
    writing = run / "checkpoints" / ".ckpt-being-written.tmp"
    writing.write_bytes(b"partial")
    assert load_checkpoint_from(run)["global_step"] == 2  # `look export`, `look evaluate`
    assert (
        "(ckpt-000000002.pt)" in Trainer(tiny_config("train.max_steps=3"), run).plan()["starts_at"]
    )  # a dry run
    assert writing.exists()
    # The job that holds the directory's lock is its only writer: it removes crash leftovers.
    pretrain(tiny_config("train.max_steps=3"), run)
    assert not writing.exists()


def test_export_takes_a_checkpoints_folder_and_refuses_what_is_no_checkpoint(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=2"), run)
    assert load_checkpoint_from(run / "checkpoints")["global_step"] == 2
    for plain in (run / "backbone.safetensors", tmp_path / "weights.pth"):
        torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "weights.pth")
        with pytest.raises(CheckpointCorruptError, match=r"not a `look pretrain` checkpoint.*"
                           r"plain weights"):  # fmt: skip
            load_checkpoint_from(plain)


def test_starting_over_removes_the_old_runs_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=8"), run)
    assert sorted(find_checkpoint_files(run / "checkpoints").values()) == [4, 6, 8]
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _fail_at_first_step(patch)
        with pytest.raises(TrainingStepError, match="No checkpoint had been written yet"):
            pretrain(tiny_config("train.max_steps=8", "optim.lr=0.05"), run, resume=False)
    assert "removed the 3 checkpoint(s) of the run it held" in capsys.readouterr().out
    assert find_checkpoint_files(run / "checkpoints") == {}
    # The plain command then trains the new run from step 0 (it used to "finish" the old one
    # from its step 8, under the new run's config and emptied log).
    result = pretrain(tiny_config("train.max_steps=2", "optim.lr=0.05"), run)
    assert result.global_step == 2 and len(result.epoch_seconds) == 0
    assert sorted(find_checkpoint_files(run / "checkpoints").values()) == [2]


def test_a_resumed_run_is_not_finished_until_it_has_trained_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=2"), run)
    assert (run / "summary.json").is_file() and (run / "backbone.safetensors").is_file()
    with monkeypatch.context() as patch:
        _fail_at_first_step(patch)
        with pytest.raises(TrainingStepError):
            pretrain(tiny_config("train.max_steps=4"), run)
    # Stopped at step 2 of 4: nothing says "finished", and config.yaml says what it runs with.
    assert not (run / "summary.json").exists() and not (run / "backbone.safetensors").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 4
    pretrain(tiny_config("train.max_steps=4"), run)
    summary = (run / "summary.json").read_text()
    assert json.loads(summary)["global_step"] == 4
    from safetensors import safe_open

    with safe_open(str(run / "backbone.safetensors"), "pt") as exported:
        assert exported.metadata()["global_step"] == "4"  # as `look export` records it
    # Run again, finished: nothing is trained, and the summary keeps the session that trained.
    assert pretrain(tiny_config("train.max_steps=4"), run).global_step == 4
    assert (run / "summary.json").read_text() == summary


def test_a_failed_save_is_a_step_error_that_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import look.engine.trainer as trainer_module

    saves = []
    real_save = trainer_module.save_checkpoint

    def save_until_the_disk_is_full(*args: Any, **kwargs: Any) -> Path:
        saves.append(args[1])
        if len(saves) > 1:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_until_the_disk_is_full)
    with pytest.raises(
        TrainingStepError,
        match=r"step 6 failed saving its checkpoint: .*No space left on device.*"
        r"The last good checkpoint, ckpt-000000004.pt in .*, is kept",
    ) as failed:
        pretrain(tiny_config(), tmp_path / "run")
    assert str(failed.value).count("failed saving") == 1, "said once, not wrapped twice"
    assert find_checkpoint_files(tmp_path / "run" / "checkpoints") == {"ckpt-000000004.pt": 4}


def test_a_run_from_initial_weights_resumes_after_the_file_moved(tmp_path: Path) -> None:
    pretrain(tiny_config("train.max_steps=1"), tmp_path / "source")
    initial = tmp_path / "scratch" / "init.safetensors"
    initial.parent.mkdir()
    shutil.copy(tmp_path / "source" / "backbone.safetensors", initial)
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=2", f"model.pretrained_weights={initial}"), run)
    moved = tmp_path / "init.safetensors"
    initial.rename(moved)  # the node's scratch space is gone; the checkpoint holds the weights
    assert pretrain(tiny_config("train.max_steps=3", f"model.pretrained_weights={initial}"),
                    run).global_step == 3  # fmt: skip
    assert (
        pretrain(
            tiny_config(
                "train.max_steps=4", f"model.pretrained_weights={moved}", "data.download=true"
            ),
            run,
        ).global_step
        == 4
    )


def _resume_on_rank(rank: int, port: int, run: str, results: str) -> None:
    """Resume ``run`` twice on one of two gloo ranks, writing the step each resumes from or its
    error: first with rank 1 seeing an older newest checkpoint (a stale view of a shared file
    system), then with rank 1 unable to read the file rank 0 picked."""
    import look.engine.trainer as trainer_module
    from tests.ddp import set_torchrun_environment

    set_torchrun_environment(rank, 2, port)
    torch.set_num_threads(1)
    real_load = trainer_module.load_checkpoint
    if rank == 1:
        stale = Path(run) / "checkpoints" / "ckpt-000000004.pt"
        trainer_module.load_latest_checkpoint = lambda *a, **k: (real_load(stale), stale)
    outcomes: list[Any] = []
    for unreadable_on_rank_1 in (False, True):
        if rank == 1 and unreadable_on_rank_1:

            def unreadable(path: Path, **kwargs: Any) -> Any:
                raise CheckpointCorruptError(f"checkpoint {path} cannot be read (stale handle)")

            trainer_module.load_checkpoint = unreadable
        trainer = Trainer(tiny_config("train.ddp_timeout_s=60"), Path(run))
        try:
            outcomes.append(trainer._try_resume() and trainer.global_step)
        except CheckpointCorruptError as error:
            outcomes.append(str(error))
    Path(results, f"rank{rank}.json").write_text(json.dumps(outcomes))
    torch.distributed.destroy_process_group()


def test_every_rank_resumes_from_the_checkpoint_rank_0_picked(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from tests.ddp import free_port

    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=8"), run)  # checkpoints at steps 4, 6 and 8
    mp.spawn(_resume_on_rank, args=(free_port(), str(run), str(tmp_path)), nprocs=2, join=True)
    (stale_0, unreadable_0), (stale_1, unreadable_1) = (
        json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)
    )
    # Rank 1 loads rank 0's file, not the older one it would have found itself.
    assert stale_0 == stale_1 == 8
    # A rank that cannot read it stops every rank, named.
    assert unreadable_0 == unreadable_1
    assert "rank 1 cannot read" in unreadable_0 and "ckpt-000000008.pt" in unreadable_0


def test_a_run_resumes_after_the_corrupt_image_errors_advice(tmp_path: Path) -> None:
    # The mid-run error advises data.corrupt_images=skip: it changes nothing already learnt.
    run = tmp_path / "run"
    pretrain(tiny_config("train.max_steps=2", "data.corrupt_images=fail"), run)
    assert (
        pretrain(tiny_config("train.max_steps=3", "data.corrupt_images=skip"), run).global_step == 3
    )


def test_a_checkpoint_saved_before_a_method_option_existed_resumes_with_its_default(
    tmp_path: Path,
) -> None:
    from look.engine.trainer import _config_differences

    current = Trainer(tiny_config(), tmp_path / "run").resolved
    saved = json.loads(json.dumps(current))
    del saved["method"]["ce_weight"]  # (an option LOOK gained after runs were saved)
    assert _config_differences(saved, current) == []
    saved["method"]["k"] = 6
    assert _config_differences(saved, current) == ["method.k: checkpoint 6 vs now 5"]


def test_a_resume_counts_the_skips_in_a_row_it_inherits(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config("train.max_steps=2"), tmp_path / "run")
    trainer.consecutive_skips = 2
    trainer.save()
    resumed = Trainer(tiny_config("train.max_steps=2"), tmp_path / "run")
    assert resumed._try_resume() and resumed.consecutive_skips == 2


def test_supcon_warns_when_a_resume_changes_its_micro_batches(tmp_path: Path) -> None:
    from look.engine.export import training_settings

    supcon = ("method={name: supcon, head_hidden_dim: 32, head_out_dim: 16}",)
    run = tmp_path / "run"
    pretrain(tiny_config(*supcon, "train.max_steps=2"), run)
    # Its micro-batches are contrasted alone: another A learns something else.
    with pytest.warns(RuntimeWarning, match=r"optim\.grad_accum_steps: checkpoint 1 vs now 2"):
        pretrain(tiny_config(*supcon, "train.max_steps=3", "optim.grad_accum_steps=2"), run)
    # ... and look report keeps runs of other A apart; for CE, A is a speed setting.
    supcon_run = Trainer(tiny_config(*supcon), tmp_path / "a").resolved
    assert training_settings(supcon_run)["optim"]["grad_accum_steps"] == 1
    ce_run = Trainer(tiny_config("method={name: ce}"), tmp_path / "b").resolved
    assert "grad_accum_steps" not in training_settings(ce_run)["optim"]
