from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from look.data.datasets import (
    DataInfo,
    build_eval_dataset,
    build_train_dataset,
    stratified_subset,
    view_seed,
)
from look.data.spec import DataSpec

SYNTHETIC = DataSpec(
    "synthetic", synthetic_num_samples=48, synthetic_num_classes=4, synthetic_image_size=16
)


def _all_views(dataset, *, num_workers: int, persistent: bool = False, loader=None) -> torch.Tensor:
    loader = loader or DataLoader(
        dataset, batch_size=8, shuffle=False, num_workers=num_workers, persistent_workers=persistent
    )
    batches = [torch.stack(views, dim=1) for views, _, _ in loader]
    return torch.cat(batches)


def test_items_have_views_label_and_index() -> None:
    dataset, info = build_train_dataset(SYNTHETIC, num_views=3, seed=0)
    views, label, index = dataset[7]
    assert len(views) == 3 and index == 7 and label == int(info.labels[7])
    assert all(v.shape == (3, 16, 16) and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])  # views of one image differ


def test_views_depend_only_on_seed_epoch_index_view() -> None:
    first, _ = build_train_dataset(SYNTHETIC, num_views=2, seed=5)
    second, _ = build_train_dataset(SYNTHETIC, num_views=2, seed=5)
    second[3]  # a different access history must not matter
    torch.manual_seed(1234)
    random.seed(99)
    for index in (0, 11, 47):
        for a, b in zip(first[index][0], second[index][0], strict=True):
            assert torch.equal(a, b)
    other_seed, _ = build_train_dataset(SYNTHETIC, num_views=2, seed=6)
    assert not torch.equal(first[11][0][0], other_seed[11][0][0])


def test_views_leave_the_global_rngs_alone() -> None:
    dataset, _ = build_train_dataset(SYNTHETIC, num_views=2, seed=0)
    torch.manual_seed(0)
    random.seed(0)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    dataset[5]
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_worker_count_does_not_change_views_but_epoch_does() -> None:
    dataset, _ = build_train_dataset(SYNTHETIC, num_views=2, seed=3)
    dataset.set_epoch(4)
    in_process = _all_views(dataset, num_workers=0)
    with_workers = _all_views(dataset, num_workers=2)
    assert torch.equal(in_process, with_workers)
    dataset.set_epoch(5)
    next_epoch = _all_views(dataset, num_workers=0)
    assert next_epoch.shape == in_process.shape
    differs = [not torch.equal(a, b) for a, b in zip(in_process, next_epoch, strict=True)]
    assert sum(differs) > 0.8 * len(differs)


def test_set_epoch_reaches_persistent_workers() -> None:
    dataset, _ = build_train_dataset(SYNTHETIC, num_views=1, seed=3)
    loader = DataLoader(dataset, batch_size=16, num_workers=2, persistent_workers=True)
    dataset.set_epoch(0)
    epoch0 = _all_views(dataset, num_workers=2, loader=loader)
    dataset.set_epoch(1)
    epoch1 = _all_views(dataset, num_workers=2, loader=loader)
    assert torch.equal(epoch1, _all_views(dataset, num_workers=0))
    assert not torch.equal(epoch0, epoch1)


def test_view_seed_is_a_pure_function_of_its_inputs() -> None:
    seeds = {
        view_seed(s, e, i, v)
        for s in range(2)
        for e in range(3)
        for i in range(50)
        for v in range(2)
    }
    assert len(seeds) == 2 * 3 * 50 * 2
    assert view_seed(1, 2, 3, 4) == view_seed(1, 2, 3, 4) < 2**64
    with pytest.raises(ValueError, match="non-negative"):
        view_seed(0, -1, 0, 0)


def test_stratified_subset_keeps_class_proportions() -> None:
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 90 + [3] * 10)
    chosen = stratified_subset(labels, 100)
    assert len(chosen) == 100 == len(set(chosen.tolist()))
    assert torch.all(chosen[1:] > chosen[:-1])
    assert torch.bincount(labels[chosen]).tolist() == [60, 30, 9, 1]
    assert torch.equal(chosen, stratified_subset(labels, 100))
    assert not torch.equal(chosen, stratified_subset(labels, 100, seed=1))


def test_stratified_subset_rounding_and_minimum() -> None:
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 5 + [3] * 985)
    counts = torch.bincount(labels[stratified_subset(labels, 10)]).tolist()
    assert sum(counts) == 10 and min(counts) == 1
    with pytest.raises(ValueError, match="between the number of classes"):
        stratified_subset(labels, 3)
    with pytest.raises(ValueError, match="between the number of classes"):
        stratified_subset(labels, 1001)


def test_subset_applies_to_train_split_in_both_builders() -> None:
    spec = DataSpec("synthetic", synthetic_num_samples=200, synthetic_num_classes=4, subset=40)
    train, info = build_train_dataset(spec, num_views=1, seed=0)
    assert len(train) == info.num_samples == 40
    assert torch.bincount(info.labels).tolist() == [10] * 4
    other_seed, _ = build_train_dataset(spec, num_views=1, seed=9)
    assert torch.equal(other_seed.source.indices, train.source.indices)
    evaluation, eval_info = build_eval_dataset(spec, "train")
    assert torch.equal(eval_info.labels, info.labels)
    assert torch.equal(evaluation.source.indices, train.source.indices)
    test, test_info = build_eval_dataset(spec, "test")
    assert len(test) == test_info.num_samples == 50


def test_coarse_training_keeps_fine_labels_of_the_same_images() -> None:
    spec = DataSpec("synthetic", synthetic_num_samples=40, synthetic_num_classes=6, labels="coarse")
    dataset, info = build_train_dataset(spec, num_views=2, seed=0)
    assert isinstance(info, DataInfo)
    assert info.num_classes == 3 and info.class_names == ("group_0", "group_1", "group_2")
    assert info.fine_class_names == tuple(f"class_{c}" for c in range(6))
    assert info.grouping == "synthetic_coarse" and info.fine_to_coarse == (0, 0, 1, 1, 2, 2)
    fine = torch.tensor(info.fine_labels)
    assert info.labels.dtype == torch.int64
    assert torch.equal(info.labels, fine // 2)
    assert torch.equal(dataset.fine_labels, fine)
    assert all(dataset[i][1] == int(fine[i]) // 2 for i in range(10))


def test_eval_dataset_label_override() -> None:
    spec = DataSpec("synthetic", synthetic_num_samples=40, synthetic_num_classes=4, labels="coarse")
    fine_eval, fine_info = build_eval_dataset(spec, "test")
    coarse_eval, coarse_info = build_eval_dataset(spec, "test", labels="coarse")
    assert fine_info.num_classes == 4 and coarse_info.num_classes == 2
    image, label = coarse_eval[3]
    assert image.shape == (3, 32, 32) and label == int(fine_eval.labels[3]) // 2
    assert torch.equal(fine_eval[3][0], image)  # the same deterministic image


def test_grouping_json_path_as_labels(tmp_path: Path) -> None:
    path = tmp_path / "halves.json"
    path.write_text('{"fine_to_coarse": {"class_0": "low", "class_1": "low", "class_2": "high"}}')
    spec = DataSpec(
        "synthetic", synthetic_num_samples=30, synthetic_num_classes=3, labels=str(path)
    )
    _, info = build_train_dataset(spec, num_views=1, seed=0)
    assert info.class_names == ("low", "high") and info.grouping == "halves"
    bad = DataSpec("synthetic", synthetic_num_samples=40, synthetic_num_classes=4, labels=str(path))
    with pytest.raises(ValueError, match="class_3"):
        build_train_dataset(bad, num_views=1, seed=0)


def test_evaluation_labels_of_one_class_are_refused(tmp_path: Path) -> None:
    """Nothing to tell apart: every accuracy would be 100 %. (Pre-training warns only, below.)"""
    one = DataSpec("synthetic", synthetic_num_samples=20, synthetic_num_classes=1)
    with pytest.raises(ValueError, match=r"test split of synthetic has 1 class .*at least two"):
        build_eval_dataset(one, "test")
    path = tmp_path / "all.json"
    path.write_text('{"fine_to_coarse": {"class_0": "all", "class_1": "all"}}')
    grouped = DataSpec("synthetic", synthetic_num_samples=20, synthetic_num_classes=2)
    with pytest.raises(
        ValueError, match=r"train split .* 1 class with labels '.*all.json' \(all\)"
    ):
        build_eval_dataset(grouped, "train", str(path))


def test_digits_through_the_builders() -> None:
    train, info = build_train_dataset(DataSpec("digits"), num_views=2, seed=0)
    test, test_info = build_eval_dataset(DataSpec("digits"), "test")
    assert (info.num_samples, test_info.num_samples) == (1257, 540)
    assert info.image_size == 32 and train[0][0][0].shape == (3, 32, 32)
    assert test[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("num_views", 0, "num_views"), ("seed", -1, "seed")],
)
def test_bad_builder_arguments(field: str, value: int, message: str) -> None:
    arguments = {"num_views": 1, "seed": 0} | {field: value}
    with pytest.raises(ValueError, match=message):
        build_train_dataset(SYNTHETIC, **arguments)


def test_index_out_of_range() -> None:
    dataset, _ = build_train_dataset(SYNTHETIC, num_views=1, seed=0)
    with pytest.raises(IndexError):
        dataset[48]


# ---- warnings about labels a supervised method cannot learn from well -------------------------


def test_well_populated_labels_build_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_train_dataset(SYNTHETIC, num_views=1, seed=0)


def test_single_image_classes_are_named(image_folder: Path, make_png) -> None:
    make_png(image_folder / "train" / "bird" / "0.png", (0, 200, 0))
    with pytest.warns(UserWarning, match=r"1 training class\(es\) hold a single image: 'bird';"):
        build_train_dataset(DataSpec("imagefolder", root=str(image_folder)), num_views=1, seed=0)
    # Many of them: the first ten by name, then a count.
    spec = DataSpec("synthetic", synthetic_num_samples=120, synthetic_num_classes=12, subset=12)
    with pytest.warns(UserWarning, match="single image") as caught:
        build_train_dataset(spec, num_views=1, seed=0)
    (message,) = [str(w.message) for w in caught if "single image" in str(w.message)]
    assert "'class_9'" in message and "'class_10'" not in message and "and 2 more" in message


def test_a_single_training_class_is_flagged(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text('{"fine_to_coarse": {"class_0": "all", "class_1": "all", "class_2": "all"}}')
    spec = DataSpec(
        "synthetic", synthetic_num_samples=30, synthetic_num_classes=3, labels=str(path)
    )
    with pytest.warns(UserWarning, match="every training image has the same label 'all'"):
        _, info = build_train_dataset(spec, num_views=1, seed=0)
    assert info.num_classes == 1  # a warning, not an error: mocov2 ignores the labels


def test_label_warnings_come_from_the_first_rank_only(
    monkeypatch: pytest.MonkeyPatch, image_folder: Path, make_png
) -> None:
    make_png(image_folder / "train" / "bird" / "0.png", (0, 200, 0))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_train_dataset(DataSpec("imagefolder", root=str(image_folder)), num_views=1, seed=0)
