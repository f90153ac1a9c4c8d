from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from look.data import DataSpec, EvalDataset, build_eval_dataset
from look.evaluation import (
    FeatureModel,
    data_files_fingerprint,
    extract_features,
    feature_cache_key,
    load_or_extract_features,
    state_fingerprint,
)
from look.models import create_backbone

SPEC = DataSpec(
    dataset="synthetic", synthetic_num_samples=40, synthetic_num_classes=4, synthetic_image_size=16
)


class CountingModel(nn.Module):
    """Pooled mean colour per channel, counting its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images.mean(dim=(2, 3)) * self.scale


def dataset_and_labels(
    spec: DataSpec = SPEC, split: str = "train"
) -> tuple[EvalDataset, torch.Tensor]:
    dataset, _ = build_eval_dataset(spec, split)
    return dataset, torch.as_tensor(dataset.fine_labels)


def key_for(model: nn.Module, spec: DataSpec = SPEC, *, output: str = "backbone") -> str:
    dataset, fine_labels = dataset_and_labels(spec)
    return feature_cache_key(
        weights_fingerprint=state_fingerprint(model),
        model_identity={"backbone": "counting", "small_stem": False},
        output=output,
        dataset_spec=spec,
        split="train",
        image_size=spec.image_size or spec.synthetic_image_size,
        transform=dataset.transform,
        fine_labels=fine_labels,
        precision="fp32",
    )


def test_extraction_is_in_dataset_order_and_in_eval_mode() -> None:
    backbone, dim = create_backbone("look_cnn_small")
    backbone.train()
    dataset, _ = dataset_and_labels()
    features = extract_features(backbone, dataset, batch_size=7, progress=False)
    assert features.shape == (len(dataset), dim) and features.dtype == torch.float32
    assert backbone.training, "the caller's train/eval mode is restored"
    backbone.eval()
    with torch.no_grad():
        expected = backbone(torch.stack([dataset[i][0] for i in (0, 13, 39)]))
    assert torch.allclose(features[[0, 13, 39]], expected, atol=1e-5)


def test_second_call_hits_the_cache_without_running_the_model(tmp_path: Path) -> None:
    model = CountingModel()
    dataset, fine_labels = dataset_and_labels()
    key = key_for(model)
    kwargs = {"cache_key": key, "cache_dir": tmp_path, "batch_size": 16, "progress": False}
    first = load_or_extract_features(model, dataset, fine_labels, **kwargs)
    calls = model.calls
    assert not first.from_cache and calls == 3 and first.images_per_second is not None
    second = load_or_extract_features(model, dataset, fine_labels, **kwargs)
    assert second.from_cache and model.calls == calls
    assert torch.equal(first.features, second.features)
    stored = torch.load(tmp_path / f"{key}.pt", weights_only=True)
    assert stored["features"].dtype == torch.float32
    assert torch.equal(stored["fine_labels"], fine_labels)
    assert not list(tmp_path.glob("*.tmp")), "the temp file was renamed into place"


def test_a_torn_or_mismatched_cache_file_is_a_miss(tmp_path: Path) -> None:
    model = CountingModel()
    dataset, fine_labels = dataset_and_labels()
    key = key_for(model)
    (tmp_path / f"{key}.pt").write_bytes(b"not a torch file")
    result = load_or_extract_features(
        model, dataset, fine_labels, cache_key=key, cache_dir=tmp_path, progress=False
    )
    assert not result.from_cache and model.calls > 0
    # Same key but other labels on disk (e.g. an image folder that changed): a miss again.
    calls = model.calls
    result = load_or_extract_features(
        model, dataset, fine_labels.flip(0), cache_key=key, cache_dir=tmp_path, progress=False
    )
    assert not result.from_cache and model.calls > calls


def test_key_changes_with_weights_buffers_image_size_transform_and_output() -> None:
    model = CountingModel()
    base = key_for(model)
    assert key_for(model) == base
    with torch.no_grad():
        model.scale[0] += 1e-3
    assert key_for(model) != base
    with torch.no_grad():
        model.scale[0] -= 1e-3
    assert key_for(model) == base
    # A buffer (batch-norm statistics) counts as much as a parameter.
    backbone, _ = create_backbone("look_cnn_small")
    before = state_fingerprint(backbone)
    next(b for n, b in backbone.named_buffers() if n.endswith("running_mean")).add_(1.0)
    assert state_fingerprint(backbone) != before
    assert key_for(model, dataclasses.replace(SPEC, image_size=12)) != base
    assert key_for(model, output="head") != base
    assert key_for(model, dataclasses.replace(SPEC, labels="coarse")) == base, "labels-independent"


def test_feature_model_selects_backbone_or_head() -> None:
    backbone = nn.Flatten()
    head = nn.Linear(12, 2)
    images = torch.randn(4, 3, 2, 2)
    assert torch.equal(FeatureModel(backbone)(images), images.flatten(1))
    embedded = FeatureModel(backbone, head)(images)
    assert torch.allclose(embedded.norm(dim=1), torch.ones(4))


def test_empty_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="dataset is empty"):
        extract_features(CountingModel(), [], progress=False)


def test_files_fingerprint_follows_the_files_not_their_contents(tmp_path: Path) -> None:
    from tests.data.conftest import write_png, write_tiny_idx_dataset

    write_tiny_idx_dataset(tmp_path / "idx", compress=False)
    idx_spec = DataSpec(dataset="fashion_mnist", root=str(tmp_path / "idx"))
    idx_source = build_eval_dataset(idx_spec, "test")[0].source
    before = data_files_fingerprint(idx_spec, idx_source)
    assert before is not None and data_files_fingerprint(idx_spec, idx_source) == before
    write_tiny_idx_dataset(tmp_path / "idx", compress=False, seed=1)  # new images, same sizes
    images = tmp_path / "idx" / "t10k-images-idx3-ubyte"
    stat = images.stat()
    os.utime(images, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert data_files_fingerprint(idx_spec, idx_source) != before
    # New images of the same size with the old modification time put back (cp -p, rsync -a,
    # touch -r): the status change time still tells.
    before = data_files_fingerprint(idx_spec, idx_source)
    stat = images.stat()
    time.sleep(0.01)
    write_tiny_idx_dataset(tmp_path / "idx", compress=False, seed=2)
    os.utime(images, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert images.stat().st_size == stat.st_size
    assert data_files_fingerprint(idx_spec, idx_source) != before

    folder_spec = DataSpec(dataset="imagefolder", root=str(tmp_path / "images"))
    for name in ("cat", "dog"):
        write_png(tmp_path / "images" / "train" / name / "0.png", (0, 0, 0))
    folder_source = build_eval_dataset(folder_spec, "train")[0].source
    before = data_files_fingerprint(folder_spec, folder_source)
    write_png(tmp_path / "images" / "train" / "cat" / "0.png", (0, 0, 0), size=24)  # resized
    assert data_files_fingerprint(folder_spec, folder_source) != before
    assert data_files_fingerprint(SPEC, build_eval_dataset(SPEC, "train")[0].source) is None

    model = CountingModel()
    dataset, fine_labels = dataset_and_labels()
    common = {
        "weights_fingerprint": state_fingerprint(model),
        "model_identity": {"backbone": "counting", "small_stem": False},
        "output": "backbone",
        "dataset_spec": SPEC,
        "split": "train",
        "image_size": 16,
        "transform": dataset.transform,
        "fine_labels": fine_labels,
        "precision": "fp32",
    }
    assert feature_cache_key(**common, files_fingerprint="a") != feature_cache_key(
        **common, files_fingerprint="b"
    )
    # Another version of the code that computes the features: another key.
    import look

    before = feature_cache_key(**common)
    real_version = look.__version__
    try:
        look.__version__ = real_version + ".post1"
        assert feature_cache_key(**common) != before
    finally:
        look.__version__ = real_version


def test_a_relative_cache_dir_is_recorded_as_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # results.json records this path; look analyze run from another folder must still find it.
    monkeypatch.chdir(tmp_path)
    model = CountingModel()
    dataset, fine_labels = dataset_and_labels()
    key = key_for(model)
    result = load_or_extract_features(
        model, dataset, fine_labels, cache_key=key, cache_dir="cache", progress=False
    )
    assert result.cache_path is not None and result.cache_path.is_absolute()
    assert result.cache_path == (tmp_path / "cache" / f"{key}.pt").resolve()
    assert result.cache_path.is_file()


def _cache_file(folder: Path, name: str, size: int, age_s: float) -> Path:
    path = folder / name
    path.write_bytes(b"x" * size)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def test_trimming_the_cache_deletes_its_least_recently_used_files_only(tmp_path: Path) -> None:
    from look.evaluation.features import trim_feature_cache

    oldest, old, kept, newest = (
        _cache_file(tmp_path, f"{c * 64}.pt", 1000, age)
        for c, age in (("a", 400), ("b", 300), ("c", 200), ("d", 100))
    )
    foreign = _cache_file(tmp_path, "notes.pt", 5000, 900)  # not a key's name: never touched
    assert trim_feature_cache(tmp_path, 4000) == []  # 4 × 1000 bytes: within the limit
    # Oldest first; a file to keep is passed over, so a newer one goes instead.
    assert trim_feature_cache(tmp_path, 1500, keep=[kept]) == [oldest, old, newest]
    assert kept.exists() and foreign.exists()
    assert trim_feature_cache(tmp_path, 500, keep=[kept]) == []  # nothing else left to delete


def test_a_size_limit_trims_after_a_write_and_keeps_what_the_evaluation_uses(
    tmp_path: Path,
) -> None:
    model = CountingModel()
    dataset, fine_labels = dataset_and_labels()
    key = key_for(model)
    stale = [_cache_file(tmp_path, f"{c * 64}.pt", 50_000, 1000) for c in "ab"]
    in_use: set[Path] = set()
    kwargs = {"cache_key": key, "cache_dir": tmp_path, "progress": False, "cache_in_use": in_use}
    # A hit touches its file: it becomes the most recently used.
    first = load_or_extract_features(model, dataset, fine_labels, **kwargs)
    written = tmp_path / f"{key}.pt"
    os.utime(written, (time.time() - 5000, time.time() - 5000))
    assert load_or_extract_features(model, dataset, fine_labels, **kwargs).from_cache
    assert written.stat().st_mtime > time.time() - 60 and in_use == {written}
    # Another model's features written under a limit below the whole cache: the stale files
    # go, both files of this evaluation stay (the first is older than the stale ones' limit).
    other = CountingModel()
    with torch.no_grad():
        other.scale.mul_(2)
    limit = written.stat().st_size * 2 + 10
    second = load_or_extract_features(
        other, dataset, fine_labels, cache_key=key_for(other), cache_dir=tmp_path,
        progress=False, cache_max_bytes=limit, cache_in_use=in_use,
    )  # fmt: skip
    assert not first.from_cache and not second.from_cache
    assert not any(path.exists() for path in stale)
    assert written.exists() and (tmp_path / f"{key_for(other)}.pt").exists()
    # Outside that evaluation, under a limit of one file: the least recently used goes; and
    # when the files in use alone are over the limit, a warning says so.
    third = CountingModel()
    with torch.no_grad():
        third.scale.mul_(3)
    with pytest.warns(UserWarning, match=r"over its limit of 1e-08 GB"):
        load_or_extract_features(
            third, dataset, fine_labels, cache_key=key_for(third), cache_dir=tmp_path,
            progress=False, cache_max_bytes=10,
        )  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [f"{key_for(third)}.pt"]


def test_an_unlimited_cache_past_its_warning_size_is_warned_about_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from look.evaluation import features

    monkeypatch.setattr(features, "FEATURE_CACHE_WARN_BYTES", 10_000)
    monkeypatch.setattr(features, "_warned_cache_size", False)
    _cache_file(tmp_path, f"{'a' * 64}.pt", 20_000, 100)
    model = CountingModel()
    dataset, fine_labels = dataset_and_labels()
    with pytest.warns(UserWarning, match=r"feature cache .* holds 0 GB in 2 files.*--cache-max-gb"):
        load_or_extract_features(
            model, dataset, fine_labels, cache_key=key_for(model), cache_dir=tmp_path,
            progress=False,
        )  # fmt: skip
    with torch.no_grad():
        model.scale.mul_(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        load_or_extract_features(
            model, dataset, fine_labels, cache_key=key_for(model), cache_dir=tmp_path,
            progress=False,
        )  # fmt: skip
