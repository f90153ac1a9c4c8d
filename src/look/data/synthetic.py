"""A small, deterministic synthetic image dataset with coarse/fine/mode structure, for tests and demos.

Every image is ``0.5 + group pattern + class pattern + mode pattern + noise`` with smooth random
RGB patterns. Fine classes ``class_c`` come in coarse groups ``group_{c // 2}`` (pairs of classes
share a group pattern) and every class has :data:`MODES_PER_CLASS` modes, so a class is
multi-modal the way LOOK expects real classes to be. The patterns depend only on the seed and the
class count, so the train and test splits share them; the noise and the labels differ per split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from look.data.groupings import ClassGrouping

MODES_PER_CLASS = 2
CLASSES_PER_GROUP = 2
# The data is a property of the spec, not of the training run: one fixed seed for all runs.
SYNTHETIC_DATA_SEED = 0
_SPLIT_STREAMS = {"train": 1, "test": 2}
_GROUP_AMPLITUDE = 0.22
_CLASS_AMPLITUDE = 0.16
_MODE_AMPLITUDE = 0.14
_NOISE_STD = 0.06


def synthetic_class_names(num_classes: int) -> tuple[str, ...]:
    """``("class_0", "class_1", ...)``."""
    return tuple(f"class_{c}" for c in range(num_classes))


def synthetic_coarse_grouping(num_classes: int) -> ClassGrouping:
    """The grouping ``labels="coarse"`` uses for synthetic data: ``class_c -> group_{c // 2}``."""
    fine_to_coarse = {
        name: f"group_{c // CLASSES_PER_GROUP}"
        for c, name in enumerate(synthetic_class_names(num_classes))
    }
    coarse_names = tuple(dict.fromkeys(fine_to_coarse.values()))
    return ClassGrouping(
        name="synthetic_coarse", fine_to_coarse=fine_to_coarse, coarse_names=coarse_names
    )


def synthetic_split_size(num_train_samples: int, num_classes: int, split: str) -> int:
    """Number of images in a split: the configured count for train, a quarter (≥ 2 per class) for test."""
    if split == "train":
        return num_train_samples
    return max(num_train_samples // 4, 2 * num_classes)


def _smooth_patterns(count: int, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` smooth RGB fields of unit peak magnitude, shape ``(count, 3, S, S)``."""
    coarse = torch.randn(count, 3, 4, 4, generator=generator)
    fields = F.interpolate(
        coarse, size=(image_size, image_size), mode="bicubic", align_corners=False
    )
    peak = fields.flatten(1).abs().amax(dim=1).clamp_min(1e-6)
    return fields / peak.view(-1, 1, 1, 1)


def make_synthetic_images(
    *,
    num_samples: int,
    num_classes: int,
    image_size: int,
    split: str = "train",
    seed: int = SYNTHETIC_DATA_SEED,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate a split of the synthetic dataset.

    Returns ``images`` uint8 ``(N, 3, S, S)``, fine ``labels`` int64 ``(N,)`` (balanced: every class
    has ⌊N/C⌋ or ⌈N/C⌉ images) and ``modes`` int64 ``(N,)`` (which mode of its class each image
    shows). ``num_samples`` is the train size; the test split has :func:`synthetic_split_size`.
    Identical arguments give identical tensors.
    """
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"synthetic data has splits {sorted(_SPLIT_STREAMS)}, not {split!r}")
    if num_classes < 1 or num_samples < num_classes or image_size < 1:
        raise ValueError(
            f"synthetic data needs num_classes >= 1, num_samples >= num_classes and image_size >= 1, "
            f"got num_samples={num_samples}, num_classes={num_classes}, image_size={image_size}"
        )
    size = synthetic_split_size(num_samples, num_classes, split)
    num_groups = (num_classes + CLASSES_PER_GROUP - 1) // CLASSES_PER_GROUP

    pattern_rng = torch.Generator().manual_seed(seed)
    group_patterns = _smooth_patterns(num_groups, image_size, pattern_rng)
    class_patterns = _smooth_patterns(num_classes, image_size, pattern_rng)
    mode_patterns = _smooth_patterns(num_classes * MODES_PER_CLASS, image_size, pattern_rng)

    sample_rng = torch.Generator().manual_seed(seed * 1000 + _SPLIT_STREAMS[split])
    labels = torch.arange(size, dtype=torch.int64) % num_classes
    labels = labels[torch.randperm(size, generator=sample_rng)]
    modes = torch.randint(0, MODES_PER_CLASS, (size,), generator=sample_rng)
    noise = torch.randn(size, 3, image_size, image_size, generator=sample_rng)

    images = (
        0.5
        + _GROUP_AMPLITUDE * group_patterns[labels // CLASSES_PER_GROUP]
        + _CLASS_AMPLITUDE * class_patterns[labels]
        + _MODE_AMPLITUDE * mode_patterns[labels * MODES_PER_CLASS + modes]
        + _NOISE_STD * noise
    )
    images_uint8 = (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return images_uint8, labels, modes
