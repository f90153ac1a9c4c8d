from __future__ import annotations

import pytest

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
