from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from look.data import DataSpec
from look.evaluation import (
    PROTOCOLS,
    FewShotOptions,
    FinetuneOptions,
    KnnOptions,
    LinearProbeOptions,
    ModelSource,
    evaluate,
    parse_dataset_spec,
    resolve_protocols,
)
from look.evaluation import features as features_module
from look.models import create_backbone
from tests.evaluation.conftest import SYNTHETIC_SPEC

# Small settings so that an end-to-end evaluation takes about a second.
FAST = {
    "linear_options": LinearProbeOptions(c_grid=(0.01, 1.0)),
    "knn_options": KnnOptions(ks=(5, 200)),
    "finetune_options": FinetuneOptions(epochs=1, batch_size=16),
    "fewshot_options": FewShotOptions(n_way=3, shots=(1, 2), queries=2, episodes=20),
    "progress": False,
}


@pytest.fixture
def count_extractions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Number of images the network ran on, per extraction (cache hits add nothing)."""
    calls: list[int] = []
    original = features_module.extract_features

    def counting(model: nn.Module, dataset: Dataset, **kwargs: Any) -> torch.Tensor:
        calls.append(len(dataset))
        return original(model, dataset, **kwargs)

    monkeypatch.setattr(features_module, "extract_features", counting)
    return calls


def test_parse_dataset_spec() -> None:
    assert parse_dataset_spec("fashion_mnist") == DataSpec(dataset="fashion_mnist")
    assert parse_dataset_spec("cifar100:/data/c") == DataSpec(dataset="cifar100", root="/data/c")
    assert parse_dataset_spec("imagefolder:/x:y") == DataSpec(dataset="imagefolder", root="/x:y")
    assert parse_dataset_spec("Fashion-MNIST").dataset == "fashion_mnist"
    synthetic = parse_dataset_spec("synthetic:samples=64,classes=4,size=16")
    assert (synthetic.synthetic_num_samples, synthetic.synthetic_num_classes) == (64, 4)
    assert synthetic.synthetic_image_size == 16
    assert parse_dataset_spec("mnist", download=True).download
    skipping = parse_dataset_spec("imagefolder:/x", corrupt_images="skip")
    assert skipping.corrupt_images == "skip"
    for bad, match in (
        ("imagenet", "unknown dataset"),
        ("imagefolder", "needs a root"),
        ("digits:/somewhere", "takes no root"),
        ("synthetic:samples=x", "synthetic option"),
        ("", "empty dataset spec"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_dataset_spec(bad)


def test_resolve_protocols() -> None:
    assert resolve_protocols("all") == PROTOCOLS
    assert resolve_protocols(["fewshot", "linear"]) == ("linear", "fewshot")
    assert resolve_protocols("knn,finetune") == ("knn", "finetune")
    with pytest.raises(ValueError, match="unknown protocol"):
        resolve_protocols("probe")


def test_checkpoint_end_to_end_records_coarse_to_fine(
    pretrained_run: Path, tmp_path: Path, count_extractions: list[int]
) -> None:
    report = evaluate(
        pretrained_run,
        SYNTHETIC_SPEC,
        "all",
        labels="fine",
        output_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        **FAST,
    )
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert set(written["protocols"]) == set(PROTOCOLS)
    assert written["labels"] == {
        "evaluation": "fine",
        "evaluation_grouping": None,
        "pretraining": "coarse",
        "pretraining_dataset": "synthetic",
    }
    assert written["model"]["source"] == "checkpoint" and written["model"]["method"] == "look"
    assert written["dataset"]["image_size"] == 16
    assert written["dataset"]["image_size_from"] == "pre-training config"
    assert written["dataset"]["num_classes"] == 4 and written["seed"] == 0
    linear = written["protocols"]["linear"]
    assert linear["best_c"] in (0.01, 1.0) and len(linear["validation_curve"]) == 2
    assert [r["k_effective"] for r in written["protocols"]["knn"]["results"]] == [5, 64]
    assert [s["k_shot"] for s in written["protocols"]["fewshot"]["settings"]] == [1, 2]
    assert written["protocols"]["finetune"]["epochs"] == 1
    for name in PROTOCOLS:
        result = written["protocols"][name]
        for value in _accuracies(result):
            assert 0.0 <= value <= 100.0
        assert written["timings_s"][name] >= 0.0
    assert count_extractions == [64, 16], "train and test features, extracted once each"
    assert written["protocol_settings"]["knn"]["ks"] == [5, 200]
    assert written["complete"] is True and "pending_protocols" not in written
    # Fine-tuning checkpointed every epoch into the output folder, and cleared it when done.
    assert not (tmp_path / "out" / "finetune_checkpoints").exists()


@pytest.mark.parametrize("interruption", [RuntimeError("out of memory"), KeyboardInterrupt()])
def test_a_failing_protocol_keeps_the_finished_ones(
    pretrained_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    interruption: BaseException,
) -> None:
    """Fine-tuning runs last and longest; its failure (or a Ctrl-C) must not lose the
    frozen-feature results computed before it, and the file must say it is partial."""
    import look.evaluation.suite as suite
    from look.analysis.results import IncompleteResultsWarning, read_results_file

    def failing_finetune(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise interruption

    monkeypatch.setattr(suite, "finetune", failing_finetune)
    with pytest.raises(type(interruption)):
        evaluate(
            pretrained_run,
            SYNTHETIC_SPEC,
            "linear,knn,finetune",
            output_dir=tmp_path / "out",
            cache_dir=None,
            **FAST,
        )
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["complete"] is False
    assert set(written["protocols"]) == {"linear", "knn"}
    assert written["pending_protocols"] == ["finetune"]
    assert written["failed_protocol"]["name"] == "finetune"
    assert type(interruption).__name__ in written["failed_protocol"]["error"]
    with pytest.warns(IncompleteResultsWarning, match="finetune failed"):
        result = read_results_file(tmp_path / "out" / "results.json")
    assert "linear/top1" in result.metrics and not any(
        key.startswith("finetune") for key in result.metrics
    )


@pytest.mark.parametrize("stopped", [True, False], ids=["stopped", "failed"])
def test_an_older_complete_results_file_is_replaced_when_the_first_protocol_ends_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopped: bool
) -> None:
    """Nothing finished yet: the file must still say so, not keep an earlier evaluation's
    numbers marked complete (which `look report` and the demo would take as this one's)."""
    import look.evaluation.suite as suite
    from look.analysis.results import IncompleteResultsWarning, read_results_file
    from look.engine.stop_signals import TrainingStopped

    def run() -> dict[str, Any]:
        return evaluate(
            ModelSource(timm="look_cnn_small"),
            SYNTHETIC_SPEC,
            "finetune",
            output_dir=tmp_path / "out",
            cache_dir=None,
            **FAST,
        )

    run()  # an earlier, finished evaluation into the same folder
    ending = TrainingStopped("SIGTERM", 2, 4, "x") if stopped else ValueError("diverged")

    def ending_finetune(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise ending

    monkeypatch.setattr(suite, "finetune", ending_finetune)
    with pytest.raises(type(ending)):
        run()
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["complete"] is False and written["protocols"] == {}
    assert written["pending_protocols"] == ["finetune"]
    assert ("failed_protocol" in written) is not stopped
    with pytest.warns(IncompleteResultsWarning):
        read_results_file(tmp_path / "out" / "results.json")


def _accuracies(result: dict) -> list[float]:
    if "results" in result:
        return [r["top1"] for r in result["results"]]
    if "settings" in result:
        return [s["mean_accuracy"] for s in result["settings"]]
    return [result["top1"], result["mean_per_class_accuracy"]]


def test_cache_hits_and_invalidation_through_evaluate(
    tmp_path: Path, count_extractions: list[int]
) -> None:
    cache = tmp_path / "cache"

    def run(source: ModelSource, **kwargs: object) -> dict:
        return evaluate(
            source,
            SYNTHETIC_SPEC,
            ["knn"],
            output_dir=tmp_path / "out",
            **{**FAST, "cache_dir": cache, **kwargs},
        )

    first = run(ModelSource(timm="look_cnn_small"))
    assert count_extractions == [64, 16]
    second = run(ModelSource(timm="look_cnn_small"))
    assert count_extractions == [64, 16], "second call runs no forward pass"
    assert second["features"]["train"]["from_cache"] and second["features"]["test"]["from_cache"]
    assert second["protocols"]["knn"]["results"] == first["protocols"]["knn"]["results"]
    # The labels are not part of the key: coarse labels reuse the same features.
    coarse = run(ModelSource(timm="look_cnn_small"), labels="coarse")
    assert count_extractions == [64, 16] and coarse["dataset"]["num_classes"] == 2
    # Another image size means another transform: extracted again.
    run(ModelSource(timm="look_cnn_small"), image_size=12)
    assert count_extractions == [64, 16, 64, 16]
    # Other weights: extracted again.
    backbone, _ = create_backbone("look_cnn_small")
    with torch.no_grad():
        next(backbone.parameters()).mul_(1.5)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, weights)
    run(ModelSource(timm="look_cnn_small", weights=weights))
    assert count_extractions == [64, 16, 64, 16, 64, 16]
    # The same weights built with other constructor arguments (a stem stride, a pooling): other
    # features, extracted again, then cached under their own key.
    strided = ModelSource(timm="look_cnn_small", weights=weights, model_kwargs={"stem_stride": 1})
    assert not run(strided)["features"]["test"]["from_cache"]
    assert run(strided)["features"]["test"]["from_cache"]
    assert count_extractions == [64, 16] * 4
    # cache_dir=None never reads nor writes.
    run(ModelSource(timm="look_cnn_small"), cache_dir=None)
    assert len(count_extractions) == 10


def test_head_features_and_timm_model(pretrained_run: Path, tmp_path: Path) -> None:
    head = evaluate(
        pretrained_run,
        SYNTHETIC_SPEC,
        "knn,fewshot",
        output_dir=tmp_path / "head",
        cache_dir=None,
        use_head=True,
        **FAST,
    )
    assert head["features"]["train"]["feature_dim"] == 16
    assert head["protocols"]["knn"]["features"] == "head"
    assert "projection head" in head["model"]["frozen_features"]
    plain = evaluate(
        ModelSource(timm="look_cnn_small"),
        SYNTHETIC_SPEC,
        "linear",
        output_dir=tmp_path / "plain",
        cache_dir=None,
        **FAST,
    )
    assert plain["model"]["source"] == "timm" and plain["model"]["pretraining"] is None
    assert plain["labels"]["pretraining"] is None
    assert plain["dataset"]["image_size_from"] == "dataset default"
    assert plain["features"]["train"]["feature_dim"] == 256


def test_digits_are_resized_to_the_pretraining_image_size(
    pretrained_run: Path, tmp_path: Path
) -> None:
    report = evaluate(
        pretrained_run,
        "digits",
        "knn",
        output_dir=tmp_path / "digits",
        cache_dir=None,
        batch_size=512,
        **FAST,
    )
    assert report["dataset"]["image_size"] == 16 and report["dataset"]["num_classes"] == 10
    assert (
        report["features"]["train"]["num_images"] + report["features"]["test"]["num_images"] == 1797
    )


def test_bad_requests_fail_before_any_work(tmp_path: Path, count_extractions: list[int]) -> None:
    common = {"output_dir": tmp_path / "out", "cache_dir": None, "progress": False}
    with pytest.raises(ValueError, match="k must be >= 1"):
        evaluate(
            ModelSource(timm="look_cnn_small"),
            SYNTHETIC_SPEC,
            "knn",
            knn_options=KnnOptions(ks=(0,)),
            **common,
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate(tmp_path / "missing_run", SYNTHETIC_SPEC, "knn", **common)
    with pytest.raises(FileNotFoundError, match="grouping file"):
        evaluate(
            ModelSource(timm="look_cnn_small"), SYNTHETIC_SPEC, "knn", labels="nope.json", **common
        )
    with pytest.raises(ValueError, match="only 4 of the 4 classes present in the test split qualify"):
        evaluate(
            ModelSource(timm="look_cnn_small"),
            SYNTHETIC_SPEC,
            "fewshot",
            fewshot_options=FewShotOptions(n_way=5, shots=(1,), queries=1, episodes=5),
            **common,
        )
    # Episodes that need more test images per class than there are fail before the linear probe
    # extracts anything, not after it.
    with pytest.raises(ValueError, match="1-shot episodes with 200 queries"):
        evaluate(
            ModelSource(timm="look_cnn_small"),
            SYNTHETIC_SPEC,
            "linear,fewshot",
            fewshot_options=FewShotOptions(n_way=2, shots=(1, 5), queries=200, episodes=5),
            **common,
        )
    assert count_extractions == []
    assert not (tmp_path / "out" / "results.json").exists()


def _write_image_folder(
    root: Path, *, val_colours: dict[str, tuple[int, int, int]], train: bool = True
) -> None:
    """train/{cat,dog}/ with 4 red / blue images each, val/ with 2 per class in ``val_colours``."""
    from tests.data.conftest import write_png

    train_colours = {"cat": (200, 30, 30), "dog": (30, 30, 200)}
    for name, colour in train_colours.items():
        for i in range(4 if train else 0):
            write_png(root / "train" / name / f"{i}.png", colour)
        for i in range(2):
            write_png(root / "val" / name / f"{i}.png", val_colours[name])


def test_replaced_image_files_miss_the_feature_cache(
    tmp_path: Path, count_extractions: list[int]
) -> None:
    root = tmp_path / "images"
    _write_image_folder(root, val_colours={"cat": (200, 30, 30), "dog": (30, 30, 200)})

    def run() -> dict:
        return evaluate(
            ModelSource(timm="look_cnn_small"),
            f"imagefolder:{root}",
            "knn",
            output_dir=tmp_path / "out",
            image_size=16,
            cache_dir=tmp_path / "cache",
            **{**FAST, "knn_options": KnnOptions(ks=(3,))},
        )

    first = run()
    assert first["protocols"]["knn"]["results"][0]["top1"] == 100.0
    assert first["dataset"]["test_split"] == "val", "the folder read, not the split's name"
    assert count_extractions == [8, 4]
    # Overwrite the val images in place, colours swapped: the same names and count.
    _write_image_folder(root, val_colours={"cat": (30, 30, 200), "dog": (200, 30, 30)}, train=False)
    for path in (root / "val").rglob("*.png"):  # a later time, even on a coarse-clock file system
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    second = run()
    assert count_extractions == [8, 4, 4], "train features still hit, val ones are extracted"
    assert second["features"]["train"]["from_cache"]
    assert not second["features"]["test"]["from_cache"]
    assert second["protocols"]["knn"]["results"][0]["top1"] == 0.0


def test_unreadable_evaluation_images_are_left_out_not_duplicated(
    tmp_path: Path, count_extractions: list[int]
) -> None:
    from tests.data.conftest import write_truncated_png

    root = tmp_path / "images"
    _write_image_folder(root, val_colours={"cat": (200, 30, 30), "dog": (30, 30, 200)})
    broken = write_truncated_png(root / "val" / "cat" / "broken.png")
    spec = parse_dataset_spec(f"imagefolder:{root}", corrupt_images="skip")
    reports = []
    for _ in range(2):  # extracted, then from the cache: the same images left out
        with pytest.warns(RuntimeWarning, match=r"left out 1 unreadable image.*broken\.png"):
            reports.append(
                evaluate(
                    ModelSource(timm="look_cnn_small"),
                    spec,
                    "knn,finetune",
                    output_dir=tmp_path / "out",
                    image_size=16,
                    cache_dir=tmp_path / "cache",
                    **{**FAST, "knn_options": KnnOptions(ks=(3,))},
                )
            )
    assert count_extractions == [8, 5]
    for report in reports:
        test = report["features"]["test"]
        assert test["num_images"] == 4, "4 readable val images, no substitute counted twice"
        assert test["unreadable_files"] == [str(broken)]
        assert report["protocols"]["knn"]["num_test"] == 4
        assert report["protocols"]["finetune"]["num_test"] == 4
        assert report["protocols"]["finetune"]["unreadable_test_files"] == [str(broken)]
    assert reports[1]["features"]["test"]["from_cache"]


def test_each_image_folder_split_is_listed_once_per_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fine-tuning reads the splits the frozen protocols read: it reuses their listings; a
    second evaluation lists again (the folder may have changed between commands)."""
    from tests.listing import count_listings

    root = tmp_path / "images"
    _write_image_folder(root, val_colours={"cat": (200, 30, 30), "dog": (30, 30, 200)})
    listed = count_listings(monkeypatch)
    for _ in range(2):
        report = evaluate(
            ModelSource(timm="look_cnn_small"),
            parse_dataset_spec(f"imagefolder:{root}"),
            "knn,finetune",
            output_dir=tmp_path / "out",
            image_size=16,
            cache_dir=None,
            **{**FAST, "knn_options": KnnOptions(ks=(3,))},
        )
        assert report["protocols"]["finetune"]["num_train"] == 8
    assert sorted(listed) == ["train", "train", "val", "val"]


def test_messages_say_what_evaluate_can_do(tmp_path: Path) -> None:
    from tests.data.conftest import write_png

    flat = tmp_path / "flat"  # class folders directly under the root: no train/ nor val/
    for name in ("cat", "dog"):
        write_png(flat / name / "0.png", (0, 0, 0))
    common = {"output_dir": tmp_path / "out", "cache_dir": None, "progress": False}
    with pytest.raises(FileNotFoundError, match=r"no train/ folder.*move the class folders") as e:
        evaluate(ModelSource(timm="look_cnn_small"), f"imagefolder:{flat}", "knn", **common)
    assert "evaluate on the training split" not in str(e.value)
    with pytest.raises(ValueError, match=r"--labels path/to/grouping\.json") as e:
        evaluate(ModelSource(timm="look_cnn_small"), "digits", "knn", labels="coarse", **common)
    assert "--set" not in str(e.value)
    for limit in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"cache_max_gb=.* must be a positive number of GB"):
            evaluate(
                ModelSource(timm="look_cnn_small"), "digits", "knn", cache_max_gb=limit, **common
            )


@pytest.mark.parametrize("main_process", [True, False])
def test_protocol_warnings_come_from_the_main_process_only(
    pretrained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, main_process: bool
) -> None:
    """Under torchrun every rank runs the protocols on the same features: one warning, not one
    per rank."""
    import warnings

    import look.evaluation.suite as suite
    from look.evaluation.fewshot import FewShotEpisodesWarning

    monkeypatch.setattr(suite, "is_main_process", lambda: main_process)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(
            pretrained_run,
            SYNTHETIC_SPEC,
            "fewshot",
            output_dir=tmp_path / "out",
            cache_dir=None,
            **FAST,  # 20 episodes: fewer than the protocol's 600
        )
    episodes = [w for w in caught if issubclass(w.category, FewShotEpisodesWarning)]
    assert len(episodes) == (1 if main_process else 0)


def test_images_too_small_for_the_backbone_are_refused_before_any_data_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import look.evaluation.suite as suite

    def no_data(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the dataset was built before the image size was checked")

    monkeypatch.setattr(suite, "build_eval_dataset", no_data)
    with pytest.raises(ValueError, match=r"'convnext_atto' cannot take 16 px images.*--image-size"):
        evaluate(ModelSource(timm="convnext_atto"), SYNTHETIC_SPEC, "knn", output_dir=tmp_path)


def test_imbalanced_test_classes_are_recorded_and_report_mean_per_class(tmp_path: Path) -> None:
    # Three fine classes in one group, one in the other: test counts 12 and 4 (ratio 3 > 2).
    from look.analysis.report import write_report

    grouping = tmp_path / "grouping.json"
    grouping.write_text(json.dumps({"name": "3-1", "fine_to_coarse": {
        "class_0": "a", "class_1": "a", "class_2": "a", "class_3": "b"}}))  # fmt: skip
    for folder, labels in (("imbalanced", str(grouping)), ("balanced", "fine")):
        evaluate(ModelSource(timm="look_cnn_small"), SYNTHETIC_SPEC, "knn", labels=labels,
                 output_dir=tmp_path / folder, **FAST)  # fmt: skip
    written = json.loads((tmp_path / "imbalanced" / "results.json").read_text())
    assert written["dataset"]["imbalanced"] and written["dataset"]["test_class_count_ratio"] == 3
    assert not json.loads((tmp_path / "balanced" / "results.json").read_text())["dataset"][
        "imbalanced"
    ]
    markdown = write_report([tmp_path / "imbalanced"], tmp_path / "report", plots=False)
    table = markdown.markdown.read_text()
    assert "kNN k5 (mean/class)" in table and "mean per-class accuracy" in table
