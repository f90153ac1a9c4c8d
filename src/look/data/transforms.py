"""Training augmentation recipes and the evaluation transform (torchvision.transforms.v2).

Inputs are uint8 tensors ``(C, H, W)`` from a source; outputs are normalised float32 ``(3, S, S)``.
Recipes:

- ``crop``: pad-and-random-crop (padding ⌊S/8⌋, at least 2) — digits, where a flip changes meaning.
- ``crop_flip``: ``crop`` + horizontal flip — small grayscale images such as Fashion-MNIST.
- ``crop_flip_jitter``: ``crop_flip`` + light colour jitter — 32-px images such as CIFAR.
- ``resized_crop``: RandomResizedCrop(scale 0.2–1) + flip + colour jitter (p 0.8) + grayscale (p 0.2),
  the SupCon / MoCo v2 recipe for 224-px images (without MoCo's blur).
- ``resized_crop_blur``: ``resized_crop`` + Gaussian blur (p 0.5, σ 0.1–2, a kernel of ~10 % of
  the image side: 23 px at 224), MoCo v2's own recipe (SimCLR's augmentation), at any size.
- ``none``: the evaluation transform.

``auto`` picks by image size, the same for every method (a comparison of methods then changes
only the loss): below 32 px ``crop_flip``, below 96 px ``crop_flip_jitter``, else
``resized_crop``; MNIST-like digit datasets use ``crop`` below 96 px. The two-view methods'
papers (SupCon, MoCo v2) use the stronger ``resized_crop`` / ``resized_crop_blur`` at every size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from look.data.spec import AUGMENT_CHOICES

# Per-dataset channel mean/std of the [0, 1] pixels (grayscale values repeated for 3 channels).
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "fashion_mnist": ((0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530)),
    "mnist": ((0.1307, 0.1307, 0.1307), (0.3081, 0.3081, 0.3081)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # ImageNet statistics: the usual choice for natural images in a folder.
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Measured on the 70% training split upsampled to 32 px.
    "digits": ((0.3055, 0.3055, 0.3055), (0.3237, 0.3237, 0.3237)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
_NO_FLIP_DATASETS = frozenset({"mnist", "digits"})
_LARGE_IMAGE_SIZE = 96
# Eval for large images: resize the short side to S / 0.875, then centre-crop S (ImageNet protocol).
_EVAL_CROP_FRACTION = 0.875


def normalization_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel used to normalise images of ``dataset``."""
    if dataset not in NORMALIZATION:
        raise ValueError(
            f"no normalisation constants for dataset {dataset!r}; known: {sorted(NORMALIZATION)}"
        )
    return NORMALIZATION[dataset]


def resolve_augment(augment: str, image_size: int, dataset: str) -> str:
    """The concrete recipe name for ``augment`` (``"auto"`` picks one by image size and dataset)."""
    if augment != "auto":
        if augment not in AUGMENT_CHOICES:
            raise ValueError(
                f"augment={augment!r} is not a recipe; choose {', '.join(AUGMENT_CHOICES)}"
            )
        return augment
    if image_size >= _LARGE_IMAGE_SIZE:
        return "resized_crop"
    if dataset in _NO_FLIP_DATASETS:
        return "crop"
    return "crop_flip" if image_size < 32 else "crop_flip_jitter"


class ToThreeChannels(torch.nn.Module):
    """Repeat a 1-channel image to 3 channels; 3-channel images pass unchanged."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-3] == 1:
            return image.expand(*image.shape[:-3], 3, *image.shape[-2:])
        if image.shape[-3] != 3:
            raise ValueError(f"expected 1 or 3 channels, got image of shape {tuple(image.shape)}")
        return image


class ToNormalizedFloat(torch.nn.Module):
    """uint8 ``(C, H, W)`` → float32 ``(3, H, W)``: 3 channels, scaled to [0, 1], normalised.

    One fused step instead of ToDtype + Normalize: per-transform overhead dominates on 28-px images.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got mean={mean}, std={std}")
        std_tensor = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        mean_tensor = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        # x / 255 normalised = x * scale + shift
        self.scale = 1.0 / (255.0 * std_tensor)
        self.shift = -mean_tensor / std_tensor
        self.to_three_channels = ToThreeChannels()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 image, got {image.dtype}")
        return torch.addcmul(
            self.shift, self.to_three_channels(image).to(torch.float32), self.scale
        )


def _fit_to_size(image_size: int, native_size: int | None) -> list[v2.Transform]:
    """Resize + centre crop to ``image_size`` unless the source already has that square size."""
    if native_size == image_size:
        return []
    return [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]


def build_eval_transform(image_size: int, native_size: int | None, dataset: str) -> v2.Compose:
    """Deterministic transform: fit to ``image_size`` (resize/centre crop), 3 channels, normalise."""
    mean, std = normalization_stats(dataset)
    if image_size >= _LARGE_IMAGE_SIZE:
        fit: list[v2.Transform] = [
            v2.Resize(round(image_size / _EVAL_CROP_FRACTION), antialias=True),
            v2.CenterCrop(image_size),
        ]
    else:
        fit = _fit_to_size(image_size, native_size)
    return v2.Compose([*fit, ToNormalizedFloat(mean, std)])


def build_train_transform(
    recipe: str, image_size: int, native_size: int | None, dataset: str
) -> v2.Compose:
    """The random training transform of ``recipe`` (see module docstring) for ``dataset``."""
    if recipe == "none":
        return build_eval_transform(image_size, native_size, dataset)
    mean, std = normalization_stats(dataset)
    # Geometric and colour steps run on the source's channels (1 for grayscale: cheaper, and
    # ColorJitter/RandomGrayscale accept it); ToNormalizedFloat makes 3 channels at the end.
    steps: list[torch.nn.Module] = []
    if recipe in ("resized_crop", "resized_crop_blur"):
        steps += [
            v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        if recipe == "resized_crop_blur":
            kernel = max(3, int(0.1 * image_size) | 1)  # odd: 23 px at 224, 3 px at 28
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    elif recipe in ("crop", "crop_flip", "crop_flip_jitter"):
        padding = max(2, image_size // 8)
        steps += [
            *_fit_to_size(image_size, native_size),
            v2.RandomCrop(image_size, padding=padding),
        ]
        if recipe != "crop":
            steps.append(v2.RandomHorizontalFlip())
        if recipe == "crop_flip_jitter":
            steps.append(v2.RandomApply([v2.ColorJitter(0.2, 0.2, 0.2, 0.05)], p=0.5))
    else:
        raise ValueError(f"unknown augmentation recipe {recipe!r}")
    steps.append(ToNormalizedFloat(mean, std))
    return v2.Compose(steps)
