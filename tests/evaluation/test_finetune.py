from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from look.data import DataSpec
from look.evaluation import FinetuneOptions, default_finetune_recipe, finetune, state_fingerprint
from look.models import create_backbone

SPEC = DataSpec(
    dataset="synthetic",
    synthetic_num_samples=48,
    synthetic_num_classes=4,
    synthetic_image_size=16,
    image_size=16,
)


def test_one_epoch_on_cpu_reports_accuracy_and_leaves_the_backbone_alone() -> None:
    backbone, dim = create_backbone("look_cnn_small")
    before = state_fingerprint(backbone)
    result = finetune(
        backbone,
        dim,
        SPEC,
        options=FinetuneOptions(epochs=1, batch_size=16, lr=0.05),
        progress=False,
    )
    assert state_fingerprint(backbone) == before
    assert 0.0 <= result["top1"] <= 100.0 and 0.0 <= result["mean_per_class_accuracy"] <= 100.0
    assert result["epochs"] == 1 and result["steps"] == 3 and result["batch_size"] == 16
    assert result["num_train"] == 48 and result["num_test"] == 12 and result["num_classes"] == 4
    assert result["augment"] == "crop_flip" and result["final_epoch_train_loss"] > 0


def test_coarse_labels_train_a_coarse_classifier() -> None:
    backbone, dim = create_backbone("look_cnn_small")
    result = finetune(
        backbone, dim, SPEC, labels="coarse", options=FinetuneOptions(epochs=1), progress=False
    )
    assert result["num_classes"] == 2
    assert result["batch_size"] == 48, "the default batch (128) is clipped to the training set"


def test_default_recipe_depends_on_image_size() -> None:
    small, large = default_finetune_recipe(28), default_finetune_recipe(224)
    assert small["batch_size"] == 128 and small["epochs"] == 5 and 0.01 <= small["lr"] <= 0.05
    assert large["batch_size"] == 64 and large["lr"] == 0.01


def test_bad_options_are_refused() -> None:
    backbone, dim = create_backbone("look_cnn_small")
    for options, match in (
        (FinetuneOptions(epochs=0), "epochs"),
        (FinetuneOptions(lr=-1.0), "lr"),
        (FinetuneOptions(batch_size=0), "batch_size"),
        (FinetuneOptions(momentum=1.0), "momentum"),
    ):
        with pytest.raises(ValueError, match=match):
            finetune(backbone, dim, SPEC, options=options, progress=False)


def test_a_killed_finetuning_resumes_from_its_last_epoch_with_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    # (look.evaluation.finetune, the attribute, is the function: import the module by name.)
    finetune_module = importlib.import_module("look.evaluation.finetune")

    options = FinetuneOptions(epochs=3, batch_size=16, lr=0.05)

    def run(backbone: torch.nn.Module, checkpoint_dir: Path | None) -> dict:
        return finetune(
            backbone, dim, SPEC, options=options, progress=False, checkpoint_dir=checkpoint_dir
        )

    torch.manual_seed(0)
    backbone, dim = create_backbone("look_cnn_small")
    whole = run(backbone, None)

    saved_epochs: list[int] = []
    original_save = finetune_module.save_checkpoint

    def save_then_die(directory: Path, step: int, state: dict, **kwargs: object) -> Path:
        path = original_save(directory, step, state, **kwargs)
        saved_epochs.append(state["epoch"])  # (files are named by step)
        if state["epoch"] == 1:
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint
        return path

    monkeypatch.setattr(finetune_module, "save_checkpoint", save_then_die)
    checkpoints = tmp_path / "finetune_checkpoints"
    with pytest.raises(KeyboardInterrupt):
        run(backbone, checkpoints)
    assert len(list(checkpoints.glob("ckpt-*.pt"))) == 1

    torch.manual_seed(123)  # the global generator as a fresh process might leave it
    resumed = run(backbone, checkpoints)
    assert saved_epochs == [1, 2, 3], "the re-run trained epochs 2 and 3 only"
    assert resumed["final_epoch_train_loss"] == whole["final_epoch_train_loss"]
    assert (resumed["top1"], resumed["mean_per_class_accuracy"]) == (
        whole["top1"],
        whole["mean_per_class_accuracy"],
    )
    assert not checkpoints.exists(), "a finished fine-tuning leaves no checkpoint behind"


def test_a_checkpoint_of_another_model_is_set_aside(tmp_path: Path) -> None:
    options = FinetuneOptions(epochs=1, batch_size=16, lr=0.05)
    checkpoints = tmp_path / "finetune_checkpoints"
    torch.manual_seed(0)
    first, dim = create_backbone("look_cnn_small")
    second, _ = create_backbone("look_cnn_small")
    fresh = finetune(second, dim, SPEC, options=options, progress=False)

    from look.engine.checkpoint import save_checkpoint

    # A stale checkpoint (another backbone's), as a re-run into the same folder would find it.
    stale_state = {"identity": {"backbone_sha256": state_fingerprint(first)}, "epoch": 1}
    save_checkpoint(checkpoints, 1, stale_state)
    with pytest.warns(RuntimeWarning, match="fine-tuning checkpoint of another model"):
        result = finetune(
            second, dim, SPEC, options=options, progress=False, checkpoint_dir=checkpoints
        )
    assert result["top1"] == fresh["top1"]
    assert result["final_epoch_train_loss"] == fresh["final_epoch_train_loss"]


def test_unreadable_checkpoints_are_set_aside_and_leftovers_removed(tmp_path: Path) -> None:
    # look evaluate has no option to start over: unreadable fine-tuning checkpoints (a torn
    # write, a full disk) must not block it for good.
    options = FinetuneOptions(epochs=1, batch_size=16, lr=0.05)
    checkpoints = tmp_path / "finetune_checkpoints"
    torch.manual_seed(0)
    backbone, dim = create_backbone("look_cnn_small")
    fresh = finetune(backbone, dim, SPEC, options=options, progress=False)
    checkpoints.mkdir()
    (checkpoints / "ckpt-000000001.pt").write_bytes(b"torn")
    leftover = checkpoints / ".ckpt-crashed.tmp"
    leftover.write_bytes(b"partial")
    with pytest.warns(RuntimeWarning, match="cannot be read; fine-tuning starts over"):
        result = finetune(
            backbone, dim, SPEC, options=options, progress=False, checkpoint_dir=checkpoints
        )
    assert result["top1"] == fresh["top1"]
    assert not leftover.exists()


def test_a_checkpoint_of_the_same_weights_built_otherwise_is_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stem stride or a pooling changes the network, not its weights: a fine-tuning of the same
    weights built with other constructor arguments must not continue from the checkpoint."""
    import importlib

    finetune_module = importlib.import_module("look.evaluation.finetune")
    options = FinetuneOptions(epochs=2, batch_size=16, lr=0.05)
    checkpoints = tmp_path / "finetune_checkpoints"

    def built(**kwargs: Any) -> tuple[torch.nn.Module, int]:
        torch.manual_seed(0)
        return create_backbone("look_cnn_small", model_kwargs=kwargs)

    default, dim = built()
    strided, _ = built(stem_stride=1)
    assert state_fingerprint(default) == state_fingerprint(strided)
    original_save = finetune_module.save_checkpoint

    def save_then_die(directory: Path, step: int, state: dict, **kwargs: Any) -> Path:
        original_save(directory, step, state, **kwargs)
        raise KeyboardInterrupt  # killed after the first epoch's checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(finetune_module, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            finetune(
                default, dim, SPEC, options=options, progress=False, checkpoint_dir=checkpoints
            )
    with pytest.warns(RuntimeWarning, match="fine-tuning checkpoint of another model"):
        finetune(strided, dim, SPEC, options=options, progress=False, checkpoint_dir=checkpoints)


def test_a_backbone_holding_nan_is_refused_before_the_first_step() -> None:
    backbone, dim = create_backbone("look_cnn_small")
    with torch.no_grad():
        next(backbone.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match=r"backbone to fine-tune's weights hold NaN or infinite"):
        finetune(backbone, dim, SPEC, options=FinetuneOptions(epochs=1), progress=False)
