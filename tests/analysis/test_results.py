"""Tests for look.analysis.results: reading both results.json shapes into one record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from look.analysis.results import (
    IncompleteResultsWarning,
    NonNumericAccuracyWarning,
    describe_model,
    method_label,
    protocol_metrics,
    read_results_file,
)
from tests.analysis.synthetic import evaluation_results


def write(path: Path, content: object) -> Path:
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def test_evaluation_format(tmp_path: Path) -> None:
    result = read_results_file(write(tmp_path / "results.json", evaluation_results(seed=3)))
    assert result.method == "look [resnet18] (coarse)"
    assert result.seed == 3  # the pre-training seed, not the evaluation's "seed": 7
    assert result.dataset == "fashion_mnist" and result.labels == "fine"
    assert result.metrics == {
        "linear/top1": 81.25,
        "linear/mean_per_class_accuracy": 80.25,
        "knn/k20/top1": 70.0,
        "knn/k20/mean_per_class_accuracy": 69.0,
        "knn/k200/top1": 65.0,
        "knn/k200/mean_per_class_accuracy": 64.0,
        "fewshot/5way1shot/mean_accuracy": 50.0,
        "fewshot/5way1shot/ci95": 1.5,
        "fewshot/5way5shot/mean_accuracy": 60.0,
        "fewshot/5way5shot/ci95": 1.2,
        "finetune/top1": 90.0,
        "finetune/mean_per_class_accuracy": 89.0,
    }  # percent as written; settings such as best_c or num_train are not metrics
    assert result.headline == (
        "linear/top1",
        "knn/k20/top1",
        "knn/k200/top1",
        "fewshot/5way1shot/mean_accuracy",
        "fewshot/5way5shot/mean_accuracy",
        "finetune/top1",
    )


def test_compact_shape_in_fractions_is_scaled_to_percent(tmp_path: Path) -> None:
    content = {
        "model": {"name": "m", "method": "ce", "seed": 1, "pretrain_labels": "groups.json"},
        "dataset": "cifar100",
        "labels": "coarse",
        "protocols": {
            "linear": {"top1": 0.5, "mean_per_class": 0.25},
            "knn": {"k20": {"top1": 0.75}},
            "fewshot": {"5way1shot": {"mean": 0.5, "ci95": 0.125}},
            "other": 0.5,
        },
        "multimodality": {"summary": {"knn_purity": 0.9, "cluster_count": 2}},
    }
    # Without units, values all in [0, 1] are a guess (fractions), and the reader says so.
    with pytest.warns(
        RuntimeWarning, match=r"no units .* read as fractions .*accuracies in percent"
    ):
        result = read_results_file(write(tmp_path / "results.json", content))
    assert result.method == "ce (groups)"  # a grouping path is shown by its stem
    assert result.dataset_label == "cifar100 (coarse)"
    assert result.metrics["linear/top1"] == 50.0
    assert result.metrics["fewshot/5way1shot/ci95"] == 12.5
    assert result.headline == (
        "linear/top1",
        "knn/k20/top1",
        "fewshot/5way1shot/mean_accuracy",  # the evaluation format's name: one column
        "other",
    )
    assert result.multimodality == {"knn_purity": 0.9, "cluster_count": 2.0}
    # Units say so: no guessing.
    content["units"] = "accuracies in percent"
    assert read_results_file(write(tmp_path / "r.json", content)).metrics["linear/top1"] == 0.5


def test_tolerant_reader(tmp_path: Path) -> None:
    with pytest.warns(NonNumericAccuracyWarning, match="linear = 'x'"):
        result = read_results_file(
            write(tmp_path / "results.json", {"model": "timm-resnet", "protocols": {"linear": "x"}})
        )
    assert (result.method, result.seed, result.dataset, result.metrics) == (
        "timm-resnet",
        None,
        "unknown",
        {},
    )
    metrics, headline = protocol_metrics(
        {"linear": {"top1": float("nan"), "mean_per_class": True, "note": "x"}}
    )
    assert metrics == {} and headline == []
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_results_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="JSON object"):
        read_results_file(write(tmp_path / "list.json", [1, 2]))
    with pytest.raises(FileNotFoundError):
        read_results_file(tmp_path / "missing.json")


def test_method_labels() -> None:
    assert method_label({"method": "look", "seed": 1, "pretrain_labels": "coarse"}) == (
        "look (coarse)"
    )
    assert method_label({"method": None, "name": "resnet18.tv_in1k"}) == "resnet18.tv_in1k"
    assert method_label({"method": None, "backbone": "resnet18"}) == "resnet18"
    assert method_label({"method": "ce", "backbone": "resnet50"}) == "ce [resnet50]"
    assert method_label({"method": "ce", "label": "CE baseline"}) == "CE baseline"
    # MoCo v2 reads no label: the label set of its data says nothing of it.
    moco = {"method": "mocov2", "backbone": "resnet18", "pretrain_labels": "coarse"}
    assert method_label(moco) == "mocov2 [resnet18] (no labels)"
    assert method_label("my-model") == "my-model"
    assert method_label(None) == "unknown"
    head = describe_model(
        {"method": "supcon"}, content={"protocols": {"knn": {"features": "head"}}, "seed": 4}
    )
    assert method_label(head) == "supcon [head]" and head["seed"] == 4


def test_a_random_network_and_the_same_one_with_weights_are_two_rows(tmp_path: Path) -> None:
    # (look evaluate --timm NAME [--weights FILE]: what its results.json records)
    external = {"source": "timm", "backbone": "resnet50", "pretraining": None}
    random_init = {**external, "weights": None, "initialisation": "random (seed 1)"}
    loaded = {**external, "weights": "/w/resnet50.safetensors", "initialisation": "weights file"}
    # Every run exports a backbone.safetensors: the weights' fingerprint tells two apart.
    other = {**loaded, "weights": "/v/resnet50.safetensors"}
    labels = []
    for index, (model, fingerprint) in enumerate(
        ((random_init, "0" * 64), (loaded, "1f0c9a2b" + "0" * 56), (other, "77aa" + "1" * 60))
    ):
        content = {**evaluation_results(seed=index), "model": model}
        content["labels"] = {"evaluation": "fine"}
        content["features"] = {"weights_sha256": fingerprint}
        labels.append(read_results_file(write(tmp_path / f"{index}.json", content)).method)
    assert labels == [
        "resnet50 (random init)",
        "resnet50 [resnet50.safetensors 1f0c9a2b]",
        "resnet50 [resnet50.safetensors 77aa1111]",
    ]
    assert method_label(loaded) == "resnet50 [resnet50.safetensors]"  # (no fingerprint given)
    # a look checkpoint's row is named by its pre-training, as before
    assert method_label({"method": "look", "backbone": "resnet50"}) == "look [resnet50]"


def test_image_folders_are_named_after_their_root_and_clipped_k_is_kept(tmp_path: Path) -> None:
    content = evaluation_results(dataset="imagefolder")
    content["dataset"]["root"] = "/data/pets"
    content["protocols"]["knn"]["results"][1]["k_effective"] = 54
    result = read_results_file(write(tmp_path / "results.json", content))
    assert result.dataset == "imagefolder:pets" and result.dataset_root == "/data/pets"
    assert result.knn_k_effective == {"knn/k200": 54}, "k20 was not clipped"
    # A built-in dataset keeps its name whatever its root.
    content = evaluation_results()
    content["dataset"]["root"] = "/data/fmnist"
    result = read_results_file(write(tmp_path / "results.json", content))
    assert result.dataset == "fashion_mnist" and result.dataset_root is None
    assert result.knn_k_effective == {}
    # The compact shape names entries by their key.
    compact = {"model": "m", "dataset": "toy", "protocols": {"knn": {"k200": {"k_effective": 9}}}}
    result = read_results_file(write(tmp_path / "c.json", compact))
    assert result.knn_k_effective == {"knn/k200": 9}


def test_a_value_no_accuracy_can_take_is_refused(tmp_path: Path) -> None:
    # It would be shown, in bold, as the best result.
    path = tmp_path / "results.json"
    content = {"units": "accuracies in percent", "protocols": {"linear": {"top1": 250.0}}}
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"linear/top1 is 250.0, not an accuracy"):
        read_results_file(path)
    content["protocols"]["linear"]["top1"] = 97.5
    path.write_text(json.dumps(content))
    assert read_results_file(path).metrics["linear/top1"] == 97.5


def test_values_that_are_not_numbers_are_blank_and_named(tmp_path: Path) -> None:
    """A quoted number is a typing slip the reader must not hide; a deliberate blank is quiet."""
    path = write(
        tmp_path / "results.json",
        {
            "units": "accuracies in percent",
            "protocols": {
                "linear": {"top1": "85.3", "mean_per_class": None},
                "knn": {"k20": {"top1": 71.0}, "k200": {"top1": "n/a"}},
            },
        },
    )
    with pytest.warns(NonNumericAccuracyWarning) as caught:
        result = read_results_file(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "linear/top1 = '85.3'" in message and "k200" not in message
    assert "mean_per_class" not in message
    assert result.metrics == {"knn/k20/top1": 71.0}


def test_an_unfinished_evaluation_is_read_with_a_warning(tmp_path: Path) -> None:
    content = {
        "units": "accuracies in percent",
        "complete": False,
        "pending_protocols": ["knn", "finetune"],
        "protocols": {"linear": {"top1": 60.0}},
    }
    path = write(tmp_path / "results.json", content)
    with pytest.warns(IncompleteResultsWarning, match="knn, finetune did not run"):
        assert read_results_file(path).metrics == {"linear/top1": 60.0}
    content["complete"] = True
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_results_file(write(path, content))
