"""The datasets the training loop and the evaluation protocols iterate over, and their builders."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from look.data.groupings import grouping_for_labels
from look.data.sources import (
    ImageSource,
    SubsetSource,
    class_members,
    load_source,
    name_some,
    warn_on_first_rank,
)
from look.data.spec import DataSpec, resolve_image_size, validate_spec
from look.data.synthetic import synthetic_coarse_grouping
from look.data.transforms import build_eval_transform, build_train_transform, resolve_augment

# A subset is a property of the data spec, not of the run: the same images for every seed and for
# both the training and the evaluation view of the training split.
SUBSET_SEED = 0


@dataclass(frozen=True, eq=False)
class DataInfo:
    """What methods and reports need to know about a dataset.

    ``labels``/``class_names``/``num_classes`` describe the labels the dataset yields (coarse ones
    when a grouping is applied); ``fine_class_names``/``fine_labels`` are the dataset's own classes
    of the same images, in the same order, so fine-label evaluation needs no second dataset.
    ``fine_to_coarse[f]`` is the training class of fine class ``f`` (``None`` for fine labels).
    """

    num_classes: int
    num_samples: int
    class_names: tuple[str, ...]
    image_size: int
    fine_class_names: tuple[str, ...]
    fine_labels: tuple[int, ...] | None
    labels: torch.Tensor
    dataset: str = ""
    grouping: str | None = None
    fine_to_coarse: tuple[int, ...] | None = None


_UINT64_MASK = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """The SplitMix64 finaliser: a bijection of 64-bit integers with strong avalanche."""
    value = (value + 0x9E3779B97F4A7C15) & _UINT64_MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64_MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _UINT64_MASK
    return value ^ (value >> 31)


def view_seed(seed: int, epoch: int, index: int, view: int) -> int:
    """A 64-bit seed that depends only on ``(seed, epoch, index, view)``.

    Chained SplitMix64 (each step a bijection of the new word), about 20× cheaper than numpy's
    SeedSequence, which matters at one call per view.
    """
    if min(seed, epoch, index, view) < 0:
        raise ValueError(
            f"seed, epoch, index and view must be non-negative, got {seed}, {epoch}, {index}, {view}"
        )
    mixed = _splitmix64(seed & _UINT64_MASK)
    for word in (epoch, index, view):
        mixed = _splitmix64(mixed ^ (word & _UINT64_MASK))
    return mixed


@contextlib.contextmanager
def _preserved_global_rngs() -> Iterator[None]:
    """Restore the CPU torch RNG and python's ``random`` afterwards, so seeding views leaks nothing."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)


class TrainDataset(Dataset):
    """Yields ``(views, label, index)``: ``num_views`` augmented views of image ``index``.

    View ``v`` of image ``i`` in epoch ``e`` is drawn from an RNG seeded with
    ``view_seed(seed, e, i, v)``, so the views do not depend on worker count, worker RNG, resume
    point or number of ranks. The epoch lives in shared memory, so :meth:`set_epoch` in the main
    process also reaches persistent DataLoader workers (call it before iterating the loader).
    """

    def __init__(
        self,
        source: ImageSource,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor],
        *,
        num_views: int,
        seed: int,
    ) -> None:
        if num_views < 1:
            raise ValueError(f"num_views={num_views} must be at least 1")
        if seed < 0:
            raise ValueError(f"seed={seed} must be non-negative")
        if len(labels) != len(source):
            raise ValueError(f"{len(labels)} labels for {len(source)} images")
        self.source = source
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.fine_labels = source.labels
        self.transform = transform
        self.num_views = num_views
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` draws."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be non-negative")
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, ...], int, int]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        image = self.source.load(index)
        epoch = self.epoch
        views = []
        with _preserved_global_rngs():
            for view in range(self.num_views):
                seed = view_seed(self.seed, epoch, index, view)
                # Only the CPU generator: torch.manual_seed would also reseed every CUDA device.
                torch.default_generator.manual_seed(seed)
                random.seed(seed)
                views.append(self.transform(image))
        return tuple(views), int(self.labels[index]), index

    @property
    def num_skipped_files(self) -> int:
        """Unreadable image files replaced so far (ImageFolder with ``corrupt_images='skip'``)."""
        return self.source.num_skipped_files

    @property
    def skipped_files(self) -> tuple[str, ...]:
        return self.source.skipped_files


class EvalDataset(Dataset):
    """Yields ``(image, label)`` with a deterministic transform; ``fine_labels`` of the same images."""

    def __init__(
        self,
        source: ImageSource,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        if len(labels) != len(source):
            raise ValueError(f"{len(labels)} labels for {len(source)} images")
        self.source = source
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.fine_labels = source.labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        # Unreadable images are left out of an evaluation, not replaced (keep_readable).
        return self.transform(self.source.load_for_evaluation(index)), int(self.labels[index])

    @property
    def num_skipped_files(self) -> int:
        """Unreadable image files found so far (ImageFolder with ``corrupt_images='skip'``)."""
        return self.source.num_skipped_files

    @property
    def skipped_files(self) -> tuple[str, ...]:
        return self.source.skipped_files


def stratified_subset(labels: torch.Tensor, size: int, *, seed: int = SUBSET_SEED) -> torch.Tensor:
    """Sorted indices of ``size`` samples keeping the class proportions of ``labels``.

    Each class gets its proportional share (largest remainder rounding) and at least one sample;
    which samples is drawn from a numpy generator seeded with ``seed``.
    """
    label_array = np.asarray(labels, dtype=np.int64)
    total = len(label_array)
    classes, counts = np.unique(label_array, return_counts=True)
    if not len(classes) <= size <= total:
        raise ValueError(
            f"a training subset of {size} images (data.subset; look evaluate --train-subset) "
            f"must lie between the number of classes ({len(classes)}) and the number of training "
            f"images ({total})"
        )
    exact = counts * size / total
    quota = np.floor(exact).astype(np.int64)
    # Largest remainder; ties broken by class order so the result is deterministic.
    remainder_order = np.lexsort((classes, -(exact - quota)))
    quota[remainder_order[: size - int(quota.sum())]] += 1
    # Every class keeps at least one sample, taken from the classes with the most.
    while (quota == 0).any():
        quota[int(np.argmax(quota))] -= 1
        quota[int(np.flatnonzero(quota == 0)[0])] += 1
    rng = np.random.default_rng(seed)
    members = class_members(label_array)
    chosen = [
        rng.choice(members[c], size=int(q), replace=False)
        for c, q in zip(classes, quota, strict=True)
    ]
    return torch.from_numpy(np.sort(np.concatenate(chosen)))


def _check_two_classes(
    spec: DataSpec, split: str, labels: str, class_names: tuple[str, ...]
) -> None:
    """One class leaves nothing to tell apart: every accuracy would be 100 %, so evaluation
    refuses it rather than report it. (Pre-training only warns: MoCo v2 ignores the labels.)"""
    if len(class_names) < 2:
        raise ValueError(
            f"the {split} split of {spec.dataset} has {len(class_names)} class with labels "
            f"{labels!r} ({', '.join(class_names) or 'none'}): evaluation needs at least two "
            "classes; check the dataset's class folders or the grouping"
        )


def _labelled_source(
    spec: DataSpec, split: str, labels: str
) -> tuple[ImageSource, tuple[str, ...], torch.Tensor, str | None, tuple[int, ...] | None]:
    """Source of ``split`` (subset applied to the training split) and the labels it is used with."""
    validate_spec(spec)
    source = load_source(spec, split)
    if spec.subset is not None and split == spec.split_train:
        source = SubsetSource(source, stratified_subset(source.labels, spec.subset))
    if spec.dataset == "synthetic" and labels == "coarse":
        grouping = synthetic_coarse_grouping(spec.synthetic_num_classes)
    else:
        grouping = grouping_for_labels(spec.dataset, labels)
    if grouping is None:
        return source, source.class_names, source.labels, None, None
    coarse_names, fine_to_coarse = grouping.apply(source.class_names)
    return (
        source,
        coarse_names,
        fine_to_coarse[source.labels],
        grouping.name,
        tuple(fine_to_coarse.tolist()),
    )


def _data_info(
    spec: DataSpec,
    source: ImageSource,
    class_names: tuple[str, ...],
    targets: torch.Tensor,
    grouping: str | None,
    fine_to_coarse: tuple[int, ...] | None,
) -> DataInfo:
    return DataInfo(
        num_classes=len(class_names),
        num_samples=len(source),
        class_names=class_names,
        image_size=resolve_image_size(spec),
        fine_class_names=source.class_names,
        fine_labels=tuple(source.labels.tolist()),
        labels=targets,
        dataset=spec.dataset,
        grouping=grouping,
        fine_to_coarse=fine_to_coarse,
    )


def warn_about_risky_labels(
    class_names: tuple[str, ...], targets: torch.Tensor, description: str
) -> None:
    """Warn (not fail: a self-supervised method ignores labels) about training labels that a
    supervised method cannot learn from well."""
    counts = torch.bincount(targets, minlength=len(class_names)).tolist()
    populated = [name for name, count in zip(class_names, counts, strict=True) if count > 0]
    if len(populated) == 1:
        warn_on_first_rank(
            f"{description}: every training image has the same label {populated[0]!r}; a "
            "supervised method (ce, sl_mlp, supcon, nca, look) has nothing to learn from it"
        )
    single = [name for name, count in zip(class_names, counts, strict=True) if count == 1]
    if single:
        warn_on_first_rank(
            f"{description}: {len(single)} training class(es) hold a single image: "
            f"{name_some(single)}; under leave-one-out (look, nca) such an image never has a "
            "neighbour of its class, so it has no positive"
        )


def build_train_dataset(
    spec: DataSpec, *, num_views: int, seed: int
) -> tuple[TrainDataset, DataInfo]:
    """The training split ``spec.split_train`` with ``spec.labels`` and ``num_views`` seeded views.

    Raises ``FileNotFoundError`` (naming the path and the fix) when the data is missing and
    ``ValueError`` for an unusable spec or grouping.
    """
    source, class_names, targets, grouping, fine_to_coarse = _labelled_source(
        spec, spec.split_train, spec.labels
    )
    warn_about_risky_labels(class_names, targets, f"{source.description} (labels {spec.labels})")
    image_size = resolve_image_size(spec)
    recipe = resolve_augment(spec.augment, image_size, spec.dataset)
    transform = build_train_transform(recipe, image_size, source.native_size, spec.dataset)
    dataset = TrainDataset(source, targets, transform, num_views=num_views, seed=seed)
    return dataset, _data_info(spec, source, class_names, targets, grouping, fine_to_coarse)


def build_eval_dataset(
    spec: DataSpec, split: str, labels: str = "fine"
) -> tuple[EvalDataset, DataInfo]:
    """``split`` of ``spec``'s dataset with the evaluation transform, labelled by ``labels``.

    ``labels`` overrides ``spec.labels`` (``"fine"``, ``"coarse"``, a shipped grouping name or a
    grouping JSON path). The training split gets the same ``spec.subset`` as the training dataset.
    """
    source, class_names, targets, grouping, fine_to_coarse = _labelled_source(spec, split, labels)
    _check_two_classes(spec, split, labels, class_names)
    transform = build_eval_transform(resolve_image_size(spec), source.native_size, spec.dataset)
    dataset = EvalDataset(source, targets, transform)
    return dataset, _data_info(spec, source, class_names, targets, grouping, fine_to_coarse)


def paths_below(paths: Sequence[str], base: str | None = None) -> Iterator[bytes]:
    """Each of ``paths`` relative to ``base`` (default: the deepest folder they all share), as
    the bytes of its name (``os.fsencode``: a name that is no valid UTF-8, as copied from an old
    share, stays as it is on disk).

    A string slice where a path lies below ``base`` as written, ``os.path.relpath`` otherwise:
    the same for normalised paths, and ~50 × faster (a million paths: under a second, where
    ``commonpath`` of them all and ``relpath`` of each took ~10 s and ~600 MB).
    """
    if base is None:
        # The deepest folder shared by the lexicographically first and last paths is shared
        # by every path between them.
        if len(paths) > 1:
            base = os.path.commonpath([min(paths), max(paths)])
        else:
            base = os.path.dirname(paths[0])
    prefix = base if base.endswith(os.sep) else base + os.sep
    cut = len(prefix)
    for path in paths:
        relative = path[cut:] if path.startswith(prefix) else os.path.relpath(path, base)
        yield os.fsencode(relative)


def training_data_identity(dataset: TrainDataset, info: DataInfo) -> dict[str, Any]:
    """What makes two runs' training data the same, whatever folder it is read from: the image
    count, the class names, every image's label and, for data read from files, every file's
    path below its dataset root (no file is opened or stat-ed: cheap for a million images).

    A resumed run compares it with its checkpoint's: its memory rows and sampler positions are
    indices into this exact list of images. The data may move (``data.root``, a grouping file's
    path) as long as this stays the same.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([info.class_names, info.fine_class_names]).encode())
    digest.update(info.labels.to(torch.int64).numpy().tobytes())
    paths = dataset.source.file_paths
    if paths is not None:
        # Relative to the deepest folder all paths share (the root, or its split folder).
        for relative in paths_below(paths):
            digest.update(relative + b"\n")
    return {
        "images": info.num_samples,
        "classes": len(info.class_names),
        "sha256": digest.hexdigest(),
    }
