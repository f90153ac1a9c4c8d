"""What a data pipeline needs to know: :class:`DataSpec`, its validation and its derived values.

The lead's ``DataConfig`` builds a :class:`DataSpec`; everything in :mod:`look.data` reads only
this object, so the data package does not depend on the configuration system.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATASET_NAMES: tuple[str, ...] = (
    "fashion_mnist",
    "mnist",
    "cifar10",
    "cifar100",
    "imagefolder",
    "digits",
    "synthetic",
)
AUGMENT_CHOICES: tuple[str, ...] = (
    "auto",
    "none",
    "crop",
    "crop_flip",
    "crop_flip_jitter",
    "resized_crop",
    "resized_crop_blur",
)
CORRUPT_IMAGE_POLICIES: tuple[str, ...] = ("fail", "skip")

# The Debian package ``dataset-fashion-mnist`` installs the four IDX files here.
DEBIAN_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
# Where downloads go (only with ``download=True``) and where CIFAR/MNIST are looked for by default.
DEFAULT_CACHE_ROOT = "~/.cache/look/datasets"

_DEFAULT_IMAGE_SIZE: dict[str, int] = {
    "fashion_mnist": 28,
    "mnist": 28,
    "cifar10": 32,
    "cifar100": 32,
    "digits": 32,
    "imagefolder": 224,
}


@dataclass(frozen=True)
class DataSpec:
    """Which images to read, how to label them and how to augment them.

    ``labels`` is ``"fine"``, ``"coarse"`` (the dataset's shipped grouping), the name of a shipped
    grouping or a path to a grouping JSON. ``image_size=None`` means the dataset's own size (28 for
    (Fashion-)MNIST, 32 for CIFAR and digits, 224 for ImageFolder, ``synthetic_image_size`` for
    synthetic data). ``subset`` keeps a stratified subset of that many training images.
    """

    dataset: str
    root: str | None = None
    split_train: str = "train"
    labels: str = "fine"
    download: bool = False
    image_size: int | None = None
    subset: int | None = None
    augment: str = "auto"
    corrupt_images: str = "fail"
    synthetic_num_samples: int = 512
    synthetic_num_classes: int = 8
    synthetic_image_size: int = 32


def validate_spec(spec: DataSpec) -> None:
    """Raise ``ValueError`` naming the first field of ``spec`` that no reader can use."""
    if spec.dataset not in DATASET_NAMES:
        raise ValueError(
            f"data.dataset={spec.dataset!r} is not supported; choose one of {', '.join(DATASET_NAMES)}"
        )
    if spec.augment not in AUGMENT_CHOICES:
        raise ValueError(
            f"data.augment={spec.augment!r} is not supported; choose one of {', '.join(AUGMENT_CHOICES)}"
        )
    if spec.corrupt_images not in CORRUPT_IMAGE_POLICIES:
        raise ValueError(
            f"data.corrupt_images={spec.corrupt_images!r} is not supported; choose 'fail' or 'skip'"
        )
    if spec.image_size is not None and spec.image_size < 8:
        raise ValueError(
            f"data.image_size={spec.image_size} is too small; use 8 or more (or null: the dataset's own)"
        )
    if spec.subset is not None and spec.subset < 1:
        raise ValueError(
            f"data.subset={spec.subset} must be a positive number of images (or null: all)"
        )
    if not spec.labels:
        raise ValueError("data.labels is empty; use 'fine', 'coarse' or a path to a grouping JSON")
    if spec.dataset == "synthetic":
        if spec.synthetic_num_classes < 1:
            raise ValueError(
                f"data.synthetic_num_classes={spec.synthetic_num_classes} must be at least 1"
            )
        if spec.synthetic_num_samples < spec.synthetic_num_classes:
            raise ValueError(
                f"data.synthetic_num_samples={spec.synthetic_num_samples} must be at least "
                f"data.synthetic_num_classes={spec.synthetic_num_classes}"
            )
        if spec.synthetic_image_size < 8:
            raise ValueError(
                f"data.synthetic_image_size={spec.synthetic_image_size} is too small; use 8 or more"
            )


def resolve_image_size(spec: DataSpec) -> int:
    """The side length of the square images the pipeline produces for ``spec``."""
    if spec.image_size is not None:
        return spec.image_size
    if spec.dataset == "synthetic":
        return spec.synthetic_image_size
    return _DEFAULT_IMAGE_SIZE[spec.dataset]


def infer_default_root(dataset: str) -> str | None:
    """The folder a dataset is read from when ``data.root`` is not set (``None``: no folder needed).

    Fashion-MNIST defaults to the Debian package's folder when it exists; MNIST and CIFAR default to
    ``~/.cache/look/datasets`` (torchvision's layouts below it). ImageFolder has no default.
    """
    if dataset not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
    if dataset in ("digits", "synthetic", "imagefolder"):
        return None
    if dataset == "fashion_mnist" and Path(DEBIAN_FASHION_MNIST_ROOT).is_dir():
        return DEBIAN_FASHION_MNIST_ROOT
    return os.path.expanduser(DEFAULT_CACHE_ROOT)


def resolve_root(spec: DataSpec) -> Path:
    """``spec.root`` (with ``~`` expanded) or the dataset's default root."""
    if spec.root is not None:
        return Path(spec.root).expanduser()
    default = infer_default_root(spec.dataset)
    if default is None:
        raise ValueError(
            f"data.root is required for data.dataset={spec.dataset!r}: pass --set data.root=DIR "
            "(a folder with one sub-folder per class, or with train/ and val/ or test/ sub-folders)"
        )
    return Path(default)


def describe(spec: DataSpec) -> str:
    """A one-line summary of ``spec`` for logs."""
    known = spec.dataset in DATASET_NAMES
    parts = [f"dataset={spec.dataset}"]
    if spec.dataset not in ("digits", "synthetic"):
        default_root = infer_default_root(spec.dataset) if known else None
        parts.append(f"root={spec.root if spec.root is not None else default_root}")
    if spec.dataset == "synthetic":
        parts.append(
            f"samples={spec.synthetic_num_samples} classes={spec.synthetic_num_classes} "
            f"native_size={spec.synthetic_image_size}"
        )
    parts += [
        f"split={spec.split_train}",
        f"labels={spec.labels}",
        f"image_size={resolve_image_size(spec) if known else spec.image_size}",
        f"augment={spec.augment}",
        f"subset={spec.subset if spec.subset is not None else 'all'}",
    ]
    if spec.dataset == "imagefolder":
        parts.append(f"corrupt_images={spec.corrupt_images}")
    if spec.download:
        parts.append("download=yes")
    return "data: " + " ".join(parts)
