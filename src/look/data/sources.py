"""Image sources: the raw, un-augmented images of one split of one dataset, with fine labels.

A source returns ``uint8`` tensors ``(C, H, W)`` with C = 1 or 3. Small datasets (Fashion-MNIST,
MNIST, CIFAR, digits, synthetic) are held in memory as one uint8 tensor and returned as views;
ImageFolder decodes files on demand and applies the corrupt-image policy.
"""

from __future__ import annotations

import abc
import contextlib
import os
import pickle
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as TF

from look.data.groupings import composed_name
from look.data.idx import read_idx
from look.data.spec import DEBIAN_FASHION_MNIST_ROOT, DataSpec, resolve_image_size, resolve_root
from look.data.synthetic import make_synthetic_images, synthetic_class_names

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Spelled as torchvision's MNIST.classes, so names agree with torchvision-based code.
MNIST_CLASSES: tuple[str, ...] = (
    "0 - zero",
    "1 - one",
    "2 - two",
    "3 - three",
    "4 - four",
    "5 - five",
    "6 - six",
    "7 - seven",
    "8 - eight",
    "9 - nine",
)
DIGITS_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
# digits has no test split of its own: a fixed stratified 70/30 split, the same for every run.
DIGITS_TEST_FRACTION = 0.3
DIGITS_SPLIT_SEED = 0

# Decoding failures that mean "this file is not a readable image".
DECODE_ERRORS = (OSError, ValueError, SyntaxError)


def class_members(labels: np.ndarray, num_classes: int | None = None) -> list[np.ndarray]:
    """The indices of each class's images, ascending, for classes ``0 .. num_classes - 1``
    (default: up to the largest label): one stable sort, where ``flatnonzero(labels == c)`` per
    class costs images × classes (minutes at 14M images in 21k classes)."""
    labels = np.asarray(labels, dtype=np.int64)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 0
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    return np.split(order, np.cumsum(counts)[:-1])


class CorruptImageError(ValueError):
    """An image file could not be decoded (and ``corrupt_images='fail'``, or no substitute exists)."""


class UnsupportedImageError(ValueError):
    """A readable image that look does not decode: pixels that cannot be mapped to 8 bits without
    guessing their range (a float image), or more pixels than Pillow decodes safely. An error
    even with ``corrupt_images='skip'``: the file is not damaged, and replacing it by another
    image of its class (every such file, for a folder of them) would train on other data."""


# Pillow's modes of one 16-bit channel (little-, big- and native-endian).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _sixteen_bit_to_rgb(image: Image.Image, path: str) -> torch.Tensor:
    """A 16-bit grey image (a PNG or TIFF from a microscope or a scanner) as 8-bit RGB, scaled
    over the whole 16-bit range. ``convert("RGB")`` would clip every value above 255 to white."""
    values = np.asarray(image).astype(np.int64)  # forces the full decode
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise UnsupportedImageError(
            f"image file {path} has 32-bit integer pixels ({values.min()} to {values.max()}), "
            "beyond 16 bits: convert it to an 8- or 16-bit PNG"
        )
    grey = torch.from_numpy(((values * 255 + 32767) // 65535).astype(np.uint8))
    return grey.unsqueeze(0).expand(3, *grey.shape).clone()


def decode_image_file(path: str) -> torch.Tensor:
    """The image file at ``path`` as a uint8 RGB tensor ``(3, H, W)``; raises one of
    ``DECODE_ERRORS`` when the file is not a readable image, :class:`UnsupportedImageError` for a
    float image. 16-bit grey images are scaled to 8 bits over their whole range (0 and 65535 give
    0 and 255). An EXIF orientation tag is applied (a phone's photo comes out upright); an alpha
    channel is dropped (transparent pixels keep their colour values)."""
    try:
        with Image.open(path) as image:
            # "I": 32-bit integers, as Pillow opens some 16-bit PNGs and TIFFs.
            if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
                return _sixteen_bit_to_rgb(image, path)
            if image.mode == "F":
                raise UnsupportedImageError(
                    f"image file {path} has floating-point pixels (mode F), whose range look "
                    "cannot know (0 to 1? 0 to 255?): convert the images to 8- or 16-bit PNGs"
                )
            # A phone's photo is stored sideways with an EXIF orientation tag that every viewer
            # applies: upright, as the labeller saw it.
            rgb = ImageOps.exif_transpose(image).convert("RGB")  # forces the full decode
    except Image.DecompressionBombError as error:
        raise UnsupportedImageError(
            f"image file {path} is not decoded: {error} (Pillow's guard, at "
            f"{2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels). It is no damaged file: resize it "
            "(look resizes every image to data.image_size anyway), e.g. with Pillow's "
            "Image.thumbnail"
        ) from error
    return TF.pil_to_tensor(rgb)


class PackedPaths(Sequence[str]):
    """File paths kept as one buffer (NUL-separated; ``surrogateescape`` keeps a name that is
    not UTF-8 as it is on disk) with each one's start in an array.

    Why: a tuple of strings is one object per path, and a forked DataLoader worker writes the
    reference count of every string it reads: each worker ends up with its own copy of every
    page holding them (~90 MB per million paths, times the workers of every rank;
    ``benchmarks/loader_memory.py``). Here a worker reads the buffer and the array without
    writing them."""

    def __init__(self, paths: Iterable[str] | bytes) -> None:
        names = None if isinstance(paths, bytes) else list(paths)
        encoded = (
            paths if names is None
            else "\0".join(names).encode("utf-8", "surrogateescape")
        )  # fmt: skip
        self.encoded: bytes = encoded  # type: ignore[assignment]
        separators = np.flatnonzero(np.frombuffer(encoded, dtype=np.uint8) == 0)
        # Path i runs from starts[i] to starts[i + 1] - 1 (its NUL, or one past the end).
        self._starts = np.concatenate(([0], separators + 1, [len(encoded) + 1]))
        if not encoded:  # no path at all (an empty one cannot be told from none)
            self._starts = np.zeros(1, dtype=np.int64)
        if names is not None and len(self) != len(names):
            raise ValueError(
                f"{len(names)} paths read back as {len(self)}: a path is empty or holds a NUL "
                "character"
            )

    def __len__(self) -> int:
        return len(self._starts) - 1

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        if not -len(self) <= index < len(self):
            raise IndexError(f"path {index} of {len(self)}")
        index %= len(self)
        start, end = self._starts[index], self._starts[index + 1] - 1
        return self.encoded[start:end].decode("utf-8", "surrogateescape")

    def as_tuple(self) -> tuple[str, ...]:
        """Every path, decoded at once (faster than one by one)."""
        if not len(self):
            return ()
        return tuple(self.encoded.decode("utf-8", "surrogateescape").split("\0"))


class ImageSource(abc.ABC):
    """Raw images of one split with their fine labels (``labels``, int64) and ``class_names``."""

    class_names: tuple[str, ...]
    labels: torch.Tensor
    # Side length when every image is square of one size (lets transforms skip a resize); else None.
    native_size: int | None
    description: str

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def load(self, index: int) -> torch.Tensor:
        """The image at ``index`` as a uint8 tensor ``(C, H, W)``, C in {1, 3}."""

    def load_for_evaluation(self, index: int) -> torch.Tensor:
        """:meth:`load`, for an evaluation that leaves unreadable images out: a file source marks
        one unreadable (``corrupt_images='skip'``) and returns a stand-in, whose output the
        caller drops (``look.evaluation.features.keep_readable``), instead of decoding another
        image of the class in its place."""
        return self.load(index)

    @property
    def num_skipped_files(self) -> int:
        """How many unreadable files are known: replaced so far, or found by a check of the whole
        source (only ImageFolder with 'skip')."""
        return 0

    @property
    def skipped_files(self) -> tuple[str, ...]:
        """Paths of the unreadable files known so far (see :attr:`num_skipped_files`)."""
        return ()

    @property
    def file_paths(self) -> tuple[str, ...] | None:
        """The file each image is decoded from, in index order; None for in-memory images."""
        return None

    def record_unreadable(self, paths: Sequence[str]) -> None:
        """Note files already found unreadable (and reported) by a check of the whole source,
        so that meeting them later neither warns again nor differs from a skip found then."""
        if paths:
            raise ValueError(f"{self.description} holds its images in memory: it has no files")


class TensorImageSource(ImageSource):
    """Images kept in memory as one uint8 tensor ``(N, C, H, W)``."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        class_names: Sequence[str],
        *,
        description: str,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"images must be uint8 (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{description}: {len(images)} images but {len(labels)} labels")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(
                f"{description}: labels must lie in [0, {len(class_names)}), "
                f"found [{int(labels.min())}, {int(labels.max())}]"
            )
        self.images = images.contiguous()
        self.labels = labels
        self.class_names = tuple(class_names)
        height, width = images.shape[2], images.shape[3]
        self.native_size = int(height) if height == width else None
        self.description = description

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]


class SubsetSource(ImageSource):
    """The images of ``base`` at ``indices`` (in that order)."""

    def __init__(self, base: ImageSource, indices: torch.Tensor) -> None:
        self.base = base
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.labels = base.labels[self.indices]
        self.class_names = base.class_names
        self.native_size = base.native_size
        self.description = f"{base.description}, subset of {len(self.indices)}"

    def load(self, index: int) -> torch.Tensor:
        return self.base.load(int(self.indices[index]))

    def load_for_evaluation(self, index: int) -> torch.Tensor:
        return self.base.load_for_evaluation(int(self.indices[index]))

    @property
    def num_skipped_files(self) -> int:
        return self.base.num_skipped_files

    @property
    def skipped_files(self) -> tuple[str, ...]:
        return self.base.skipped_files

    @property
    def file_paths(self) -> tuple[str, ...] | None:
        paths = self.base.file_paths
        return None if paths is None else tuple(paths[i] for i in self.indices.tolist())

    def record_unreadable(self, paths: Sequence[str]) -> None:
        self.base.record_unreadable(paths)


class ImageFolderSource(ImageSource):
    """Image files in one folder per class, decoded on demand.

    With ``corrupt_images="fail"`` an unreadable file raises :class:`CorruptImageError` naming it.
    With ``"skip"`` it is replaced by the next readable file of the same class (cyclically, in file
    order), so the label and the dataset index stay right and the choice does not depend on which
    worker saw the file first. Unreadable files are recorded in a shared-memory mask, so the count
    seen from the main process includes those found in DataLoader workers.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        class_names: Sequence[str],
        *,
        corrupt_images: str,
        description: str,
    ) -> None:
        self._setup(
            PackedPaths(path for path, _ in samples),
            torch.tensor([label for _, label in samples], dtype=torch.int64),
            class_names,
            corrupt_images=corrupt_images,
            description=description,
        )

    @classmethod
    def from_encoded_paths(
        cls,
        encoded_paths: bytes,
        labels: torch.Tensor,
        class_names: Sequence[str],
        *,
        corrupt_images: str,
        description: str,
    ) -> ImageFolderSource:
        """The source of paths already in one buffer (:attr:`encoded_paths`: what rank 0
        sends of its listing) and their labels."""
        source = cls.__new__(cls)
        source._setup(
            PackedPaths(encoded_paths), labels, class_names, corrupt_images=corrupt_images,
            description=description,
        )  # fmt: skip
        return source

    def _setup(
        self,
        paths: PackedPaths,
        labels: torch.Tensor,
        class_names: Sequence[str],
        *,
        corrupt_images: str,
        description: str,
    ) -> None:
        if corrupt_images not in ("fail", "skip"):
            raise ValueError(f"corrupt_images={corrupt_images!r}; choose 'fail' or 'skip'")
        self._paths = paths
        self.labels = labels
        if len(self.labels) != len(self._paths):
            raise ValueError(f"{len(self.labels)} labels for {len(self._paths)} image paths")
        self.class_names = tuple(class_names)
        self.native_size = None
        self.description = description
        self.corrupt_images = corrupt_images
        self._class_members = class_members(self.labels.numpy(), len(self.class_names))
        # Shared memory: DataLoader workers mark files here and the main process can count them.
        self._unreadable = torch.zeros(len(self.labels), dtype=torch.bool).share_memory_()

    def path(self, index: int) -> str:
        """The file of image ``index``."""
        return self._paths[index]

    @property
    def paths(self) -> tuple[str, ...]:
        """Every image's file, in index order (decoded from one buffer at each call: the
        source keeps them as :class:`PackedPaths`)."""
        return self._paths.as_tuple()

    @property
    def encoded_paths(self) -> bytes:
        """The paths as the one NUL-separated buffer they are kept in."""
        return self._paths.encoded

    def _decode(self, index: int) -> torch.Tensor:
        return decode_image_file(self.path(index))

    def load(self, index: int) -> torch.Tensor:
        try:
            return self._decode(index)
        except UnsupportedImageError:
            raise  # not a damaged file: a substitute would be one of the same kind
        except DECODE_ERRORS as error:
            if self.corrupt_images == "fail":
                raise self._corrupt_error(index, error) from error
            self._mark_unreadable(index, error)
        members = self._class_members[int(self.labels[index])]
        start = int(np.searchsorted(members, index))
        for offset in range(1, len(members)):
            candidate = int(members[(start + offset) % len(members)])
            if self._unreadable[candidate]:
                continue
            try:
                return self._decode(candidate)
            except UnsupportedImageError:
                raise
            except DECODE_ERRORS as error:
                self._mark_unreadable(candidate, error)
        class_name = self.class_names[int(self.labels[index])]
        raise CorruptImageError(
            f"no readable image left in class {class_name!r} (last tried: {self.path(index)}); "
            "every file of that class failed to decode"
        )

    def load_for_evaluation(self, index: int) -> torch.Tensor:
        if not self._unreadable[index]:
            try:
                return self._decode(index)
            except UnsupportedImageError:
                raise
            except DECODE_ERRORS as error:
                if self.corrupt_images == "fail":
                    raise self._corrupt_error(index, error) from error
                self._unreadable[index] = True  # (left out: the caller's warning names it)
        return torch.zeros(3, 8, 8, dtype=torch.uint8)  # the stand-in the caller drops

    def _corrupt_error(self, index: int, error: BaseException) -> CorruptImageError:
        """The error for file ``index`` that failed to decode under ``corrupt_images='fail'``:
        the file and each command's way on."""
        return CorruptImageError(
            f"cannot decode image file {self.path(index)} ({type(error).__name__}: {error}); "
            "replace it by a readable image of the same name; or, in pre-training, have "
            "unreadable files replaced by another image of their class (`look pretrain "
            "--set data.corrupt_images=skip`: a run in progress stays resumable, which "
            "removing the file would not allow, the image list changing), and in "
            "evaluation left out (`look evaluate --corrupt-images skip`)"
        )

    def _mark_unreadable(self, index: int, error: BaseException) -> None:
        if not self._unreadable[index]:
            self._unreadable[index] = True
            warnings.warn(
                f"unreadable image {self.path(index)} ({type(error).__name__}: {error}): "
                "another image of its class takes its place",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def num_skipped_files(self) -> int:
        return int(self._unreadable.sum())

    @property
    def file_paths(self) -> tuple[str, ...] | None:
        return self.paths

    def record_unreadable(self, paths: Sequence[str]) -> None:
        position = {path: index for index, path in enumerate(self.paths)}
        for path in paths:
            self._unreadable[position[path]] = True

    @property
    def skipped_files(self) -> tuple[str, ...]:
        return tuple(self.path(i) for i in torch.nonzero(self._unreadable).flatten().tolist())


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------

_IDX_FILE_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION_IDX_FOLDER = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}


def _check_split(dataset: str, split: str, available: Sequence[str]) -> None:
    if split not in available:
        raise ValueError(
            f"{dataset} has splits {', '.join(available)}; split {split!r} does not exist "
            "(check data.split_train or the evaluation split)"
        )


def _reject_file_root(dataset: str, root: Path) -> None:
    """A root that is a file would otherwise read as "not found" or "does not exist"."""
    if root.exists() and not root.is_dir():
        raise ValueError(
            f"{dataset} root {root} is a file, not a folder; pass --set data.root=DIR (or "
            f"--dataset {dataset}:DIR) with the folder that holds the data"
        )


def warn_on_first_rank(message: str) -> None:
    """``warnings.warn`` once per job: under DDP every rank builds the same data."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        return
    warnings.warn(message, UserWarning, stacklevel=3)


def name_some(names: Sequence[str], limit: int = 10, *, quote: bool = True) -> str:
    """``names`` comma-separated (quoted unless ``quote`` is False), at most ``limit`` of them,
    then "and N more"."""
    shown = ", ".join(repr(name) if quote else str(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def dataset_files(spec: DataSpec) -> list[Path]:
    """The files (Fashion-)MNIST's or CIFAR's images are read from (both splits, those that
    exist); none for other datasets (an image folder's are its source's ``file_paths``)."""
    if spec.dataset in _TORCHVISION_IDX_FOLDER:
        stems = [stem for pair in _IDX_FILE_STEMS.values() for stem in pair]
        found = (find_idx_file(spec.dataset, resolve_root(spec), stem) for stem in stems)
        return [path for path in found if path is not None]
    if spec.dataset in ("cifar10", "cifar100"):
        from torchvision import datasets

        dataset_class = datasets.CIFAR10 if spec.dataset == "cifar10" else datasets.CIFAR100
        folder = resolve_root(spec) / dataset_class.base_folder
        return (
            sorted(path for path in folder.iterdir() if path.is_file()) if folder.is_dir() else []
        )
    return []


def idx_search_folders(dataset: str, root: Path) -> tuple[Path, ...]:
    """Where IDX files of ``dataset`` are looked for: ``root`` itself, then torchvision's layout."""
    return (root, root / _TORCHVISION_IDX_FOLDER[dataset] / "raw")


def find_idx_file(dataset: str, root: Path, stem: str) -> Path | None:
    """The first of ``stem`` / ``stem.gz`` in :func:`idx_search_folders`, or ``None``."""
    for folder in idx_search_folders(dataset, root):
        for name in (stem, f"{stem}.gz"):
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def _missing_idx_error(dataset: str, root: Path, stem: str) -> FileNotFoundError:
    folders = ", ".join(str(f) for f in idx_search_folders(dataset, root))
    fixes = []
    if dataset == "fashion_mnist":
        fixes.append(
            f"`apt-get install dataset-fashion-mnist` (installs to {DEBIAN_FASHION_MNIST_ROOT})"
        )
    fixes.append("pass --set data.root=DIR with a folder holding the four IDX files (.gz or not)")
    fixes.append("pass --set data.download=true to download them with torchvision")
    return FileNotFoundError(
        f"{dataset}: file {stem} (or {stem}.gz) not found; looked in {folders}. Fix: "
        + ", or ".join(fixes)
    )


def one_rank_at_a_time(work: Callable[[], object]) -> None:
    """Run ``work`` (a download) on each rank in turn under ``torch.distributed``, else once.

    Ranks that share a file system find what the first one fetched (torchvision skips files
    already there) and no two write one file at once; ranks of other nodes fetch their own
    copy. An error is raised after every rank's turn, so that no rank waits for it forever.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        work()
        return
    failure: Exception | None = None
    for turn in range(dist.get_world_size()):
        if dist.get_rank() == turn:
            try:
                work()
            except Exception as error:  # raised below, once every rank has had its turn
                failure = error
        dist.barrier()
    if failure is not None:
        raise failure


def _download_idx(dataset: str, root: Path, stems: Sequence[str]) -> None:
    """Download ``dataset`` into ``root`` on each rank in turn where a file of ``stems`` is
    missing (a rank finds those another rank of its file system fetched)."""
    from torchvision import datasets

    download_class = datasets.FashionMNIST if dataset == "fashion_mnist" else datasets.MNIST

    def download() -> None:
        if all(find_idx_file(dataset, root, stem) is not None for stem in stems):
            return
        for train in (True, False):
            download_class(str(root), train=train, download=True)

    one_rank_at_a_time(download)


# Mean pixel intensity (0-1) of the official files: MNIST's digits are mostly black background,
# Fashion-MNIST's garments fill more of the frame. Their file names are the same, so a
# data.root of one read as the other would train on the wrong images under the wrong names.
_IDX_MEAN_INTENSITY = {"mnist": 0.131, "fashion_mnist": 0.286}
_OFFICIAL_IDX_SIZES = (60_000, 10_000)


def _warn_if_the_other_dataset(dataset: str, images: np.ndarray, path: Path) -> None:
    """Warn when official-size IDX images read as ``dataset`` look like the other one's."""
    if len(images) not in _OFFICIAL_IDX_SIZES or dataset not in _IDX_MEAN_INTENSITY:
        return  # a custom dataset in IDX files: nothing to compare with
    mean = float(images[:5000].mean()) / 255.0
    other = "fashion_mnist" if dataset == "mnist" else "mnist"
    if abs(mean - _IDX_MEAN_INTENSITY[other]) < abs(mean - _IDX_MEAN_INTENSITY[dataset]):
        warnings.warn(
            f"{path} is read as {dataset}, but its images look like {other}'s (mean intensity "
            f"{mean:.3f}; {dataset}'s is {_IDX_MEAN_INTENSITY[dataset]:.3f}, {other}'s "
            f"{_IDX_MEAN_INTENSITY[other]:.3f}): check data.root / the dataset SPEC",
            RuntimeWarning,
            stacklevel=3,
        )


def read_idx_dataset(
    dataset: str, root: Path, split: str, *, download: bool = False
) -> TensorImageSource:
    """Fashion-MNIST or MNIST from IDX files in ``root`` or ``root/<FashionMNIST|MNIST>/raw``."""
    _check_split(dataset, split, tuple(_IDX_FILE_STEMS))
    _reject_file_root(dataset, root)
    image_stem, label_stem = _IDX_FILE_STEMS[split]
    paths = [find_idx_file(dataset, root, stem) for stem in (image_stem, label_stem)]
    if download:  # (on every rank, whether or not its files are there: a collective)
        _download_idx(dataset, root, (image_stem, label_stem))
        paths = [find_idx_file(dataset, root, stem) for stem in (image_stem, label_stem)]
    for path, stem in zip(paths, (image_stem, label_stem), strict=True):
        if path is None:
            raise _missing_idx_error(dataset, root, stem)
    image_path, label_path = paths
    assert image_path is not None and label_path is not None
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{image_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{label_path}: expected {len(images)} labels, got shape {labels.shape}")
    _warn_if_the_other_dataset(dataset, images, image_path)
    class_names = FASHION_MNIST_CLASSES if dataset == "fashion_mnist" else MNIST_CLASSES
    return TensorImageSource(
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        class_names,
        description=f"{dataset} {split} from {image_path.parent}",
    )


def read_cifar(
    dataset: str, root: Path, split: str, *, download: bool = False
) -> TensorImageSource:
    """CIFAR-10 or CIFAR-100 (fine labels) through torchvision, in torchvision's layout under ``root``."""
    from torchvision import datasets

    _check_split(dataset, split, ("train", "test"))
    _reject_file_root(dataset, root)
    dataset_class = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    folder = root / dataset_class.base_folder
    try:
        if download:  # each rank in turn: under torchrun they would write one folder at once
            one_rank_at_a_time(
                lambda: dataset_class(str(root), train=split == "train", download=True)
            )
        cifar = dataset_class(str(root), train=split == "train", download=False)
    except RuntimeError as error:
        if "not found" not in str(error).lower():
            raise
        raise FileNotFoundError(
            f"{dataset}: no readable copy at {folder} ({error}). Fix: pass --set data.root=DIR where "
            f"DIR/{dataset_class.base_folder} holds the python-version batches, or pass "
            "--set data.download=true to download it with torchvision"
        ) from error
    images = torch.from_numpy(np.ascontiguousarray(cifar.data)).permute(0, 3, 1, 2)
    labels = torch.tensor(cifar.targets, dtype=torch.int64)
    return TensorImageSource(
        images, labels, cifar.classes, description=f"{dataset} {split} from {folder}"
    )


def read_digits(split: str, image_size: int) -> TensorImageSource:
    """scikit-learn's 8×8 digits, bilinearly upsampled to ``image_size``, split 70/30 (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_split("digits", split, ("train", "test"))
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_indices, test_indices = train_test_split(
        indices,
        test_size=DIGITS_TEST_FRACTION,
        stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    chosen = np.sort(train_indices if split == "train" else test_indices)
    pixels = torch.tensor(digits.images[chosen], dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != pixels.shape[-1]:
        pixels = F.interpolate(
            pixels, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    images = (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    labels = torch.tensor(digits.target[chosen], dtype=torch.int64)
    return TensorImageSource(
        images, labels, DIGITS_CLASSES, description=f"digits {split} (scikit-learn)"
    )


def read_synthetic(spec: DataSpec, split: str) -> TensorImageSource:
    """The synthetic dataset of :mod:`look.data.synthetic` for ``spec``'s synthetic options."""
    _check_split("synthetic", split, ("train", "test"))
    images, labels, _ = make_synthetic_images(
        num_samples=spec.synthetic_num_samples,
        num_classes=spec.synthetic_num_classes,
        image_size=spec.synthetic_image_size,
        split=split,
    )
    return TensorImageSource(
        images,
        labels,
        synthetic_class_names(spec.synthetic_num_classes),
        description=f"synthetic {split}",
    )


# Folder names that mean a split, not a class (compared in lower case).
_SPLIT_FOLDER_NAMES = frozenset(
    {"train", "training", "val", "valid", "validation", "test", "testing", "eval"}
)


def _image_folder_layout(root: Path, split_train: str, split: str) -> tuple[Path, Path]:
    """(folder defining the classes, folder holding ``split``) for an ImageFolder root."""
    _reject_file_root("imagefolder", root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"imagefolder root {root} does not exist; pass --set data.root=DIR with one sub-folder "
            "per class, or with train/ and val/ (or test/) sub-folders of that form"
        )
    split_folders = [root / name for name in (split_train, "val", "test") if (root / name).is_dir()]
    if not (root / split_train).is_dir():
        # No split sub-folders: the root itself is the (training) dataset.
        looking_like_splits = [
            name for name in class_folder_names(root) if name.lower() in _SPLIT_FOLDER_NAMES
        ]
        if looking_like_splits:
            # Train/ and Val/, Training/ and Testing/, or cat/ dog/ val/: taken as classes, the
            # split folders would mix the splits' images into one training set.
            raise ValueError(
                f"imagefolder root {root} has no {split_train}/ folder, so its sub-folders would "
                f"be the classes, but {', '.join(f'{n}/' for n in looking_like_splits)} look like "
                f"splits: name the training split {split_train}/ and the test split val/ (or "
                f"test/), each with one sub-folder per class"
            )
        if split != split_train:
            raise FileNotFoundError(
                f"imagefolder root {root} has no {split_train}/ folder, so it is used as the training "
                f"split itself and has no {split!r} split; add {root / split_train} and {root / split} "
                "sub-folders, or evaluate on the training split"
            )
        return root, root
    train_folder = root / split_train
    if split == split_train:
        return train_folder, train_folder
    fallbacks = {"test": ("test", "val"), "val": ("val", "test")}.get(split, (split,))
    for name in fallbacks:
        if (root / name).is_dir():
            return train_folder, root / name
    raise FileNotFoundError(
        f"imagefolder split {split!r} not found: looked for {', '.join(str(root / n) for n in fallbacks)} "
        f"(existing split folders: {', '.join(str(f) for f in split_folders)})"
    )


# Image formats of phones and cameras that Pillow reads only with a plug-in: counted in the
# warning about left-out extensions, not dropped without a word.
_CAMERA_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".dng", ".cr2", ".nef", ".arw"})


def _list_images(split_folder: Path, class_to_index: dict[str, int]) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image below ``split_folder``'s class folders, in
    torchvision's ImageFolder order (folders walked in sorted order, files sorted in each).

    Unlike torchvision's listing: hidden files and folders at any depth (``._0.png`` from macOS,
    ``.ipynb_checkpoints/``) are tools' litter and left out; a linked folder that leads into
    another class, to a folder already listed or above the split (``cat/up -> ..`` listed every
    class's images as cats) is left out with a warning, as is a class folder that is a broken
    link; and files
    Pillow could read but whose extension is not an image extension torchvision lists (``.gif``,
    ``.jfif``), or a camera format Pillow needs a plug-in for (``.heic``), and images lying in the
    split folder beside the class folders, are counted in a warning rather than dropped without
    a word.
    """
    split_real = split_folder.resolve()
    seen_folders: set[Path] = set()
    looping: list[str] = []
    other_extensions: dict[str, int] = {}
    readable_by_pillow = {e.lower() for e in Image.registered_extensions()}
    samples: list[tuple[str, int]] = []
    loose: list[str] = []  # images beside the class folders: in no class
    for entry in sorted(split_folder.iterdir()):
        if entry.is_symlink() and not entry.exists() and not entry.name.startswith("."):
            warn_on_first_rank(f"imagefolder: {entry} is a link to nothing; left out")
        elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMG_EXTENSIONS:
            loose.append(entry.name)
    if loose:
        warn_on_first_rank(
            f"imagefolder: left out {len(loose)} image(s) lying in {split_folder} itself, "
            f"outside every class folder: {name_some(loose)}; move each into its class's folder"
        )
    class_reals = {
        name: (split_folder / name).resolve()
        for name in class_to_index
        if (split_folder / name).is_dir()
    }
    # Real folder → the classes there: a linked folder is looked up with its ancestors (depth
    # lookups), not compared with every other class (classes² for 21k classes).
    classes_at: dict[Path, set[str]] = {}
    for name, real in class_reals.items():
        classes_at.setdefault(real, set()).add(name)

    def inside_another_class(real: Path, name: str) -> bool:
        return any(classes_at.get(folder, set()) - {name} for folder in (real, *real.parents))

    for name in sorted(class_to_index):
        class_folder = split_folder / name
        if name not in class_reals:
            continue
        walked = []
        for folder, subfolders, files in os.walk(class_folder, followlinks=True):
            real = Path(folder).resolve()
            # Only a link can lead elsewhere: into another class, above the split, in a loop.
            linked = os.path.islink(folder)
            if (
                real in seen_folders
                or real == split_real
                or real in split_real.parents
                or (linked and inside_another_class(real, name))
            ):
                looping.append(folder)
                subfolders[:] = []
                continue
            seen_folders.add(real)
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            walked.append((folder, [f for f in files if not f.startswith(".")]))
        for folder, files in sorted(walked):
            for file in sorted(files):
                extension = os.path.splitext(file)[1].lower()
                if extension in IMG_EXTENSIONS:
                    samples.append((os.path.join(folder, file), class_to_index[name]))
                elif extension in readable_by_pillow or extension in _CAMERA_EXTENSIONS:
                    other_extensions[extension] = other_extensions.get(extension, 0) + 1
    if looping:
        warn_on_first_rank(
            f"imagefolder: left out {len(looping)} linked folder(s) of {split_folder} that lead "
            f"to another class, to a folder already listed or above the split (a link loop): "
            f"{name_some(looping)}"
        )
    if other_extensions:
        counts = ", ".join(f"{ext}: {n}" for ext, n in sorted(other_extensions.items()))
        warn_on_first_rank(
            f"imagefolder: left out {sum(other_extensions.values())} file(s) of {split_folder} "
            f"whose extension is not one look reads ({counts}); convert them to one of "
            f"{', '.join(IMG_EXTENSIONS)} to use them"
        )
    return samples


def class_folder_names(folder: Path) -> list[str]:
    """Sorted names of the class sub-folders of ``folder``.

    Hidden folders (``.ipynb_checkpoints``, ``.git``, ``.Trash-1000``, …) are tools' litter, not
    classes, so names starting with "." are skipped.
    """
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.is_dir() and not entry.name.startswith(".")
    )


# Inside each_folder_listed_once(): the splits listed so far, by (root, training split, split).
_listings: dict[tuple[str, str, str], ImageFolderSource] | None = None


@contextlib.contextmanager
def each_folder_listed_once() -> Iterator[None]:
    """Within it each image folder split is listed once (:func:`read_image_folder`), for one
    command's data building (its folders are taken not to change meanwhile):

    - read again (the kNN monitor's training split, fine-tuning's splits after the frozen
      protocols'), a split reuses its listing, as a source of its own (its unreadable files
      are its own);
    - under a process group of several ranks, rank 0 alone lists it and sends it to the other
      ranks: one walk of the folder per job instead of one per rank, which on a shared file
      system is every rank of every node reading a million files' metadata at once. A listing
      error on rank 0 is raised on every rank, with its message.

    Each split listed inside it under several ranks is one collective: every rank must read the
    same splits in the same order, as every rank of a training job or of ``look evaluate``
    builds the same datasets. Outside it (code that one rank runs alone) each process lists for
    itself, at each read. Also a decorator."""
    global _listings
    outer = _listings
    _listings = {} if outer is None else outer  # (nested: the outer scope's listings)
    try:
        yield
    finally:
        _listings = outer


def _sendable(error: BaseException) -> Exception:
    """``error``, or a RuntimeError with its type and message where it does not pickle or is
    no ``Exception`` (a KeyboardInterrupt): the other ranks must get an error, not hang."""
    if not isinstance(error, Exception):
        return RuntimeError(f"rank 0 stopped listing the image folder: {type(error).__name__}")
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


# While rank 0 lists, it tells the other ranks so this often: each waits in one collective at a
# time, well within the process group's timeout (train.ddp_timeout_s, 600 s by default), however
# long the walk of a large folder on a shared file system takes.
_LISTING_HEARTBEAT_S = 10.0


def _image_folder_from_first_rank(
    root: Path, split_train: str, split: str, *, corrupt_images: str
) -> ImageFolderSource:
    """:func:`read_image_folder` listed by rank 0 and broadcast (:func:`each_folder_listed_once`).

    Rank 0 walks the folder in a thread and, every :data:`_LISTING_HEARTBEAT_S` until it is
    done, broadcasts that it is still listing; then the listing, or the error every rank then
    raises (the same one on rank 0, so that callers catching by type agree)."""
    import torch.distributed as dist

    def send(message: tuple[str, object]) -> None:
        dist.broadcast_object_list([message], src=0)

    if dist.get_rank() == 0:
        outcome: dict[str, object] = {}

        def list_folder() -> None:
            try:
                outcome["source"] = _list_image_folder(
                    root, split_train, split, corrupt_images=corrupt_images
                )
            except BaseException as error:  # handed to the main thread, and sent
                outcome["error"] = error

        walker = threading.Thread(target=list_folder, name="look-listing", daemon=True)
        walker.start()
        try:
            walker.join(_LISTING_HEARTBEAT_S)
            while walker.is_alive():
                send(("listing", None))
                walker.join(_LISTING_HEARTBEAT_S)
        except BaseException as error:  # (a KeyboardInterrupt while waiting)
            send(("error", _sendable(error)))
            raise
        if "error" in outcome:
            error = outcome["error"]
            sent = _sendable(error)  # type: ignore[arg-type]
            send(("error", sent))
            if sent is error or not isinstance(error, Exception):
                raise error  # type: ignore[misc]
            raise sent from error  # type: ignore[misc]
        source = outcome["source"]
        send(("listed", (str(root), listing_payload(source))))  # type: ignore[arg-type]
        return source  # type: ignore[return-value]
    while True:
        received: list[object] = [None]
        dist.broadcast_object_list(received, src=0)
        kind, payload = received[0]  # type: ignore[misc]
        if kind == "error":
            raise payload
        if kind == "listed":
            listed_root, listing = payload  # type: ignore[misc]
            listing = rerooted_listing(listing, str(listed_root), str(root))
            return source_from_listing(listing, corrupt_images=corrupt_images)


def rerooted_listing(
    payload: tuple[object, ...], listed_root: str, own_root: str
) -> tuple[object, ...]:
    """A :func:`listing_payload` of the folder ``listed_root`` (as rank 0 spelt its
    ``data.root``), its paths moved below ``own_root`` (this rank's): a node may read its own
    copy of the data (a node-local disk) from another path. Every listed path starts with the
    listed root, so one replacement in the NUL-separated buffer moves them all."""
    if own_root == listed_root:
        return payload
    class_names, paths, labels, description = payload
    old, new = (
        (root.rstrip(os.sep) + os.sep).encode("utf-8", "surrogateescape")
        for root in (listed_root, own_root)
    )
    moved = (b"\0" + paths).replace(b"\0" + old, b"\0" + new)[1:]  # type: ignore[operator]
    return class_names, moved, labels, str(description).replace(listed_root, own_root, 1)


def listing_payload(source: ImageFolderSource) -> tuple[object, ...]:
    """What rank 0 sends of an image folder's listing: the class names, the paths in the one
    buffer the source keeps them in, the labels as one array and the description: no pickled
    object per image."""
    return source.class_names, source.encoded_paths, source.labels.numpy(), source.description


def source_from_listing(payload: tuple[object, ...], *, corrupt_images: str) -> ImageFolderSource:
    """The :class:`ImageFolderSource` of a :func:`listing_payload`."""
    class_names, paths, labels, description = payload
    return ImageFolderSource.from_encoded_paths(
        paths, torch.from_numpy(labels), class_names,  # type: ignore[arg-type]
        corrupt_images=corrupt_images, description=str(description),
    )  # fmt: skip


def read_image_folder(
    root: Path, split_train: str, split: str, *, corrupt_images: str
) -> ImageFolderSource:
    """An ImageFolder split; class names (and their indices) always come from the training
    folder. Inside :func:`each_folder_listed_once` a split is listed once, by rank 0 under
    several ranks."""
    if _listings is None:
        return _list_image_folder(root, split_train, split, corrupt_images=corrupt_images)
    # (the root as spelt, made absolute: a link to it is listed again, under its own spelling)
    key = (os.path.abspath(root), split_train, split)
    listed = _listings.get(key)
    if listed is not None:
        return ImageFolderSource.from_encoded_paths(
            listed.encoded_paths, listed.labels.clone(), listed.class_names,
            corrupt_images=corrupt_images, description=listed.description,
        )  # fmt: skip
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        listed = _image_folder_from_first_rank(
            root, split_train, split, corrupt_images=corrupt_images
        )
    else:
        listed = _list_image_folder(root, split_train, split, corrupt_images=corrupt_images)
    _listings[key] = listed
    return listed


def _list_image_folder(
    root: Path, split_train: str, split: str, *, corrupt_images: str
) -> ImageFolderSource:
    class_folder, split_folder = _image_folder_layout(root, split_train, split)
    class_names = class_folder_names(class_folder)
    if not class_names:
        raise FileNotFoundError(
            f"imagefolder: no class sub-folders in {class_folder}; it needs one sub-folder per class "
            "holding that class's images"
        )
    class_to_index = {name: index for index, name in enumerate(class_names)}
    # Folder names compared in Unicode's composed form (NFC): a split copied through macOS may
    # spell a class decomposed (NFD); the same-looking names are the same class.
    index_of_form = {composed_name(n): i for n, i in class_to_index.items()}
    if len(index_of_form) < len(class_to_index):
        # Two folders whose names differ only in that form: one class or two? Merged, the one
        # would be an empty class under a duplicated name.
        spellings: dict[str, list[str]] = {}
        for name in class_names:
            spellings.setdefault(composed_name(name), []).append(name)
        clashes = [names for names in spellings.values() if len(names) > 1]
        shown = "; ".join(" and ".join(ascii(name) for name in names) for names in clashes)
        raise ValueError(
            f"imagefolder: class folders of {class_folder} whose names differ only in their "
            f"Unicode form (composed or decomposed accents, as a copy through macOS leaves): "
            f"{shown}; merge each pair into one folder, or rename one"
        )
    present = class_folder_names(split_folder)
    present_to_index = {
        name: index_of_form[composed_name(name)]
        for name in present
        if composed_name(name) in index_of_form
    }
    unknown = [name for name in present if name not in present_to_index]
    if unknown:
        raise ValueError(
            f"imagefolder: {split_folder} has class folders {name_some(unknown)} that the training "
            f"folder {class_folder} lacks; the splits must use the same class folder names"
        )
    found = set(present_to_index.values())
    absent = [name for name in class_names if class_to_index[name] not in found]
    if absent:
        # Legal (a small test set may miss a class), but its per-class figures are then
        # computed without those classes, which is easy to miss.
        warn_on_first_rank(
            f"imagefolder: {split_folder} lacks {len(absent)} of the {len(class_names)} class "
            f"folders of {class_folder}: {name_some(absent)}"
        )
    samples = _list_images(split_folder, present_to_index)
    counts = np.bincount([label for _, label in samples], minlength=len(class_names))
    empty = [str(split_folder / name) for name in present if counts[present_to_index[name]] == 0]
    if empty and split_folder == class_folder:
        # The training folder defines the classes: a class without an image cannot be learnt.
        raise FileNotFoundError(
            f"imagefolder: empty class folder(s) {', '.join(empty)}: no file with an image extension "
            f"({', '.join(IMG_EXTENSIONS)}); add images or remove the folder"
        )
    if empty:  # another split: as legal as a missing class folder, and said alike
        warn_on_first_rank(
            f"imagefolder: {split_folder} has {len(empty)} empty class folder(s), so its figures "
            f"are computed without those classes: {name_some(empty)}"
        )
    return ImageFolderSource(
        samples,
        class_names,
        corrupt_images=corrupt_images,
        description=f"imagefolder {split} from {split_folder}",
    )


def load_source(spec: DataSpec, split: str) -> ImageSource:
    """The raw images and fine labels of ``split`` of the dataset ``spec`` names."""
    if spec.dataset in ("fashion_mnist", "mnist"):
        return read_idx_dataset(spec.dataset, resolve_root(spec), split, download=spec.download)
    if spec.dataset in ("cifar10", "cifar100"):
        return read_cifar(spec.dataset, resolve_root(spec), split, download=spec.download)
    if spec.dataset == "digits":
        return read_digits(split, resolve_image_size(spec))
    if spec.dataset == "synthetic":
        return read_synthetic(spec, split)
    if spec.dataset == "imagefolder":
        return read_image_folder(
            resolve_root(spec), spec.split_train, split, corrupt_images=spec.corrupt_images
        )
    raise ValueError(f"unknown dataset {spec.dataset!r}")
