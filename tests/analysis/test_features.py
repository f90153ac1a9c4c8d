"""Tests for look.analysis.features: the feature-file format read by `look analyze`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from look.analysis.features import (
    WHOLE_SET_GROUP,
    FeatureSet,
    NoCoarseGroupingWarning,
    check_fine_to_coarse,
    collect_feature_sets,
    feature_sets_from_results,
    load_feature_set,
    save_feature_set,
)
from look.data import FASHION_MNIST_CLASSES
from tests.analysis.synthetic import (
    COARSE_NAMES,
    FINE_NAMES,
    FINE_TO_COARSE,
    evaluation_results,
)

FASHION_NAMES = list(FASHION_MNIST_CLASSES)


def make_feature_set(**overrides: object) -> FeatureSet:
    labels = torch.arange(6).repeat(2)
    fields: dict[str, object] = {
        "name": "look seed 0",
        "features": torch.randn(12, 4),
        "labels": labels,
        "coarse_labels": torch.from_numpy(FINE_TO_COARSE)[labels],
        "fine_names": tuple(FINE_NAMES),
        "coarse_names": tuple(COARSE_NAMES),
        "model": {"method": "look", "seed": 0},
        "dataset": "toy",
    }
    fields.update(overrides)
    return FeatureSet(**fields)  # type: ignore[arg-type]


def test_round_trip(tmp_path: Path) -> None:
    original = make_feature_set()
    path = save_feature_set(original, tmp_path / "a" / "look.features.pt")
    loaded = load_feature_set(path)
    torch.testing.assert_close(loaded.features, original.features)
    assert torch.equal(loaded.labels, original.labels)
    assert loaded.coarse_labels is not None
    assert torch.equal(loaded.coarse_labels, original.coarse_labels)
    assert (loaded.name, loaded.fine_names, loaded.coarse_names) == (
        original.name,
        original.fine_names,
        original.coarse_names,
    )
    assert loaded.model == {"method": "look", "seed": 0} and loaded.dataset == "toy"


def test_plain_dict_file_with_nulls_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "ce.features.pt"
    torch.save(
        {
            "features": torch.randn(4, 3),
            "labels": torch.tensor([0, 1, 1, 0]),
            "coarse_labels": None,
            "fine_names": [],
            "coarse_names": None,
            "name": "",
        },
        path,
    )
    loaded = load_feature_set(path)
    assert loaded.name == "ce"  # from the file name when the file has none
    assert loaded.fine_class_names == ["class 0", "class 1"]
    assert loaded.coarse_class_names == [WHOLE_SET_GROUP]


def test_grouping_supplies_coarse_labels(tmp_path: Path) -> None:
    grouping = tmp_path / "grouping.json"
    grouping.write_text(
        json.dumps(
            {
                "name": "toy",
                "fine_to_coarse": {
                    n: COARSE_NAMES[c] for n, c in zip(FINE_NAMES, FINE_TO_COARSE, strict=True)
                },
            }
        )
    )
    grouped = make_feature_set(coarse_labels=None, coarse_names=()).with_grouping(grouping)
    assert grouped.coarse_names == tuple(COARSE_NAMES)
    assert grouped.coarse_labels is not None
    assert grouped.coarse_labels.tolist() == FINE_TO_COARSE[grouped.labels.numpy()].tolist()
    with pytest.raises(ValueError, match="no fine_names"):
        make_feature_set(fine_names=()).with_grouping(grouping)


def test_bad_feature_sets_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2-D"):
        make_feature_set(features=torch.randn(12))
    with pytest.raises(ValueError, match="length 12"):
        make_feature_set(labels=torch.zeros(11, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        make_feature_set(labels=torch.zeros(12))
    with pytest.raises(ValueError, match="exactly one coarse class"):
        make_feature_set(coarse_labels=torch.arange(12) % 5)
    with pytest.raises(ValueError, match="has no name"):
        make_feature_set(fine_names=("a",))
    with pytest.raises(ValueError, match="exactly one coarse class"):
        check_fine_to_coarse(torch.tensor([0, 0]), torch.tensor([0, 1]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_feature_set(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="at least 'features' and 'labels'"):
        load_feature_set(tmp_path / "bad.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not be read"):
        load_feature_set(tmp_path / "garbage.pt")


def test_collect_feature_sets_from_files_folders_and_results(tmp_path: Path) -> None:
    first = save_feature_set(make_feature_set(), tmp_path / "runs" / "a" / "x.features.pt")
    second = save_feature_set(make_feature_set(name="other"), tmp_path / "runs" / "b.features.pt")
    (tmp_path / "runs" / "ckpt.pt").write_bytes(b"")  # neither kind: ignored
    pairs = collect_feature_sets([tmp_path / "runs", first])
    assert [path for path, _ in pairs] == [first.resolve(), second.resolve()]
    assert [fs.name for _, fs in pairs] == ["look seed 0", "other"]
    with pytest.raises(FileNotFoundError, match="neither a feature file nor a directory"):
        collect_feature_sets([tmp_path / "none"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no feature files"):
        collect_feature_sets([tmp_path / "empty"])


def write_evaluation(folder: Path, cache: Path, *, seed: int, labels: str = "fine") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    content = evaluation_results(
        seed=seed, labels=labels, class_names=FASHION_NAMES, cache_path=str(cache)
    )
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def test_feature_sets_from_evaluation_results_and_cache(tmp_path: Path) -> None:
    # A cache file as `look evaluate` writes it: features, fine labels, meta; no names.
    cache = tmp_path / "cache" / "abc.pt"
    cache.parent.mkdir()
    fine = torch.arange(10).repeat(3)
    torch.save({"features": torch.randn(30, 8), "fine_labels": fine, "meta": {}}, cache)
    first = write_evaluation(tmp_path / "runs" / "look-0", cache, seed=0)
    # The same model evaluated again on coarse labels: same cache, one feature set.
    write_evaluation(tmp_path / "runs" / "look-0-coarse", cache, seed=0, labels="coarse")
    pairs = collect_feature_sets([tmp_path / "runs"])
    assert len(pairs) == 1
    path, feature_set = pairs[0]
    assert path == first.resolve()  # the fine-label evaluation, whatever the order
    assert feature_set.feature_file == str(cache.resolve())
    assert feature_set.name == "look [resnet18] (coarse) seed 0"
    assert feature_set.dataset == "fashion_mnist"
    assert feature_set.model is not None and feature_set.model["method"] == "look"
    assert feature_set.fine_names == tuple(FASHION_NAMES)
    # Fashion-MNIST ships a coarse grouping: Tops, Trousers and dresses, Footwear, Bags.
    assert feature_set.coarse_names[0] == "Tops"
    assert feature_set.coarse_labels is not None
    assert feature_set.coarse_labels[:10].tolist() == [0, 1, 0, 1, 0, 2, 0, 2, 3, 2]

    cache.unlink()
    with pytest.raises(FileNotFoundError, match="was not found; tried"):
        feature_sets_from_results([first])
    no_cache = tmp_path / "runs" / "look-0" / "results.json"
    no_cache.write_text(json.dumps(evaluation_results(cache_path=None)), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="records no feature cache"):
        feature_sets_from_results([no_cache])


def test_cache_rows_of_unreadable_images_are_left_out(tmp_path: Path) -> None:
    # A cache of `look evaluate --corrupt-images skip`: rows 1 and 4 hold a substitute's features.
    features, fine = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    cache = tmp_path / "abc.pt"
    torch.save(
        {"features": features, "fine_labels": fine, "unreadable": torch.tensor([1, 4]), "meta": {}},
        cache,
    )
    loaded = load_feature_set(cache)
    torch.testing.assert_close(loaded.features, features[[0, 2, 3, 5]])
    assert loaded.labels.tolist() == [0, 1, 1, 2]


def write_cache(path: Path, rows_per_class: int = 3) -> Path:
    """A cache file as `look evaluate` writes it: features, fine labels, meta; no names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fine = torch.arange(10).repeat(rows_per_class)
    torch.save({"features": torch.randn(len(fine), 8), "fine_labels": fine, "meta": {}}, path)
    return path


@pytest.mark.parametrize("coarse_first", [True, False])
def test_the_fine_label_evaluation_wins_over_a_coarse_one_sharing_its_cache(
    tmp_path: Path, coarse_first: bool
) -> None:
    # A coarse evaluation found first used to replace the fine one: no fine names, no grouping,
    # and the "intra-class" numbers silently covered the whole dataset.
    cache = write_cache(tmp_path / "cache" / "abc.pt")
    names = ("a-coarse", "b-fine") if coarse_first else ("a-fine", "b-coarse")
    coarse = write_evaluation(
        tmp_path / "runs" / names[0 if coarse_first else 1], cache, seed=0, labels="coarse"
    )
    fine = write_evaluation(tmp_path / "runs" / names[1 if coarse_first else 0], cache, seed=0)
    ordered = [coarse, fine] if coarse_first else [fine, coarse]
    pairs = feature_sets_from_results(ordered)
    assert len(pairs) == 1
    source, feature_set = pairs[0]
    assert source == fine.resolve()
    assert feature_set.fine_names == tuple(FASHION_NAMES)
    assert feature_set.has_coarse_grouping and feature_set.coarse_names[0] == "Tops"
    assert feature_set.grouping == "fashion_mnist_coarse"


def test_only_a_coarse_evaluation_warns_that_no_grouping_applies(tmp_path: Path) -> None:
    cache = write_cache(tmp_path / "cache" / "abc.pt")
    coarse = write_evaluation(tmp_path / "runs" / "c", cache, seed=0, labels="coarse")
    with pytest.warns(NoCoarseGroupingWarning, match="whole set"):
        ((_, feature_set),) = feature_sets_from_results([coarse])
    assert not feature_set.has_coarse_grouping
    assert feature_set.coarse_class_names == [WHOLE_SET_GROUP]


def test_a_relative_cache_path_is_found_from_the_results_folder_or_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `look evaluate --cache-dir cache` run in tmp_path/work recorded "cache/abc.pt" as typed;
    # look analyze runs from another folder.
    work = tmp_path / "work"
    write_cache(work / "cache" / "abc.pt")
    results = write_evaluation(work, Path("cache/abc.pt"), seed=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ((source, feature_set),) = feature_sets_from_results([results])
    assert source == results.resolve()  # the results file; the cache file is named apart
    assert feature_set.feature_file == str((work / "cache" / "abc.pt").resolve())
    # Moved away: the error lists every place tried and names the flag that helps.
    moved = tmp_path / "moved"
    (work / "cache").rename(moved)
    with pytest.raises(FileNotFoundError, match="was not found; tried") as error:
        feature_sets_from_results([results])
    message = str(error.value)
    assert str(elsewhere.resolve() / "cache" / "abc.pt") in message
    assert str(work.resolve() / "cache" / "abc.pt") in message
    assert "--cache-dir" in message and "another machine" not in message
    # --cache-dir finds it by name.
    ((_, feature_set),) = feature_sets_from_results([results], cache_dir=moved)
    assert feature_set.feature_file == str((moved / "abc.pt").resolve())
