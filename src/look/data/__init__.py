"""Datasets, class groupings, transforms and the seeded multi-view training dataset.

Entry points: :func:`build_train_dataset` and :func:`build_eval_dataset`, driven by a
:class:`DataSpec` (built by the configuration from ``DataConfig``).
"""

from look.data.datasets import (
    SUBSET_SEED,
    DataInfo,
    EvalDataset,
    TrainDataset,
    build_eval_dataset,
    build_train_dataset,
    stratified_subset,
    training_data_identity,
    view_seed,
)
from look.data.groupings import (
    DATASET_COARSE_GROUPING,
    ClassGrouping,
    builtin_grouping_names,
    load_grouping,
)
from look.data.idx import read_idx, write_idx
from look.data.sources import (
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    CorruptImageError,
    ImageSource,
    each_folder_listed_once,
    load_source,
)
from look.data.spec import (
    AUGMENT_CHOICES,
    CORRUPT_IMAGE_POLICIES,
    DATASET_NAMES,
    DataSpec,
    describe,
    infer_default_root,
    resolve_image_size,
    validate_spec,
)
from look.data.synthetic import make_synthetic_images, synthetic_coarse_grouping
from look.data.transforms import (
    build_eval_transform,
    build_train_transform,
    normalization_stats,
    resolve_augment,
)
from look.data.verify import UnreadableImage, find_unreadable_images

__all__ = [
    "AUGMENT_CHOICES",
    "CORRUPT_IMAGE_POLICIES",
    "DATASET_COARSE_GROUPING",
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "SUBSET_SEED",
    "ClassGrouping",
    "CorruptImageError",
    "DataInfo",
    "DataSpec",
    "EvalDataset",
    "ImageSource",
    "TrainDataset",
    "UnreadableImage",
    "build_eval_dataset",
    "build_eval_transform",
    "build_train_dataset",
    "build_train_transform",
    "builtin_grouping_names",
    "describe",
    "each_folder_listed_once",
    "find_unreadable_images",
    "infer_default_root",
    "load_grouping",
    "load_source",
    "make_synthetic_images",
    "normalization_stats",
    "read_idx",
    "resolve_augment",
    "resolve_image_size",
    "stratified_subset",
    "synthetic_coarse_grouping",
    "training_data_identity",
    "validate_spec",
    "view_seed",
    "write_idx",
]
