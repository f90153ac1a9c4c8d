"""Frozen-feature extraction: batched, sharded over ranks, gathered in order, cached on disk.

Features are extracted once per (weights, dataset, split, transform, image size, output) and
stored under a cache key that hashes all of these, with the name, size, modification and
status-change times of every file the images are read from (so replaced images miss the cache);
labels are not part of the key (the same features serve fine, coarse and any grouping), the
dataset's fine labels are stored with them as a check, and so are the indices of the images
whose file could not be decoded (``corrupt_images="skip"``), so that evaluation can leave those
rows out. Under ``torch.distributed`` every rank extracts one contiguous shard
(:class:`look.engine.sampler.EvalShardSampler`, no padded duplicates) and the shards are gathered
so that every rank ends with exactly the ``N`` features of the dataset, in dataset order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import look
from look.atomic import atomic_write_path
from look.data import DataSpec, ImageSource, normalization_stats
from look.data.datasets import paths_below
from look.data.sources import dataset_files, name_some
from look.data.spec import resolve_root
from look.engine.distributed import get_rank, get_world_size, is_distributed, is_main_process
from look.engine.sampler import EvalShardSampler
from look.engine.stop_signals import (
    EvaluationStopped,
    StopSignals,
    end_workers,
    start_workers,
)

__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_FEATURE_CACHE_DIR",
    "FeatureSet",
    "data_files_fingerprint",
    "extract_features",
    "feature_cache_key",
    "files_at",
    "gather_shards",
    "keep_readable",
    "load_or_extract_features",
    "trim_feature_cache",
    "unreadable_indices",
]

DEFAULT_FEATURE_CACHE_DIR = "~/.cache/look/features"
# Bump when the stored content or the key's meaning changes: old entries then simply miss.
CACHE_FORMAT = 3  # 3: images decoded upright by their EXIF orientation
# Rows per all_gather round: bounds the extra device memory of a gather to world × rows × d.
_GATHER_CHUNK_ROWS = 65536
# Unreadable files named in full in a warning; the rest are counted.
_NAMED_FILES_MAX = 20
# Without a size limit, a cache past this size is warned about (once per process): an ImageNet
# training split's features alone take ~10 GB per model (1.28M × 2048 floats).
FEATURE_CACHE_WARN_BYTES = 50 * 10**9
# The cache's own files (a key and .pt); anything else in the folder is never touched.
_CACHE_FILE = re.compile(r"[0-9a-f]{64}\.pt")
_warned_cache_size = False


@dataclass(eq=False)
class FeatureSet:
    """Features ``(N, d)`` float32 on CPU in dataset order, with the dataset's fine labels.

    ``from_cache`` says whether they were read from ``cache_path``; ``seconds`` is the wall time of
    the extraction (or the read) and ``images_per_second`` the extraction throughput (None on a hit).
    ``unreadable`` are the indices of the images whose file could not be decoded: with
    ``corrupt_images="skip"`` their rows hold the features of a substitute (see
    :func:`keep_readable`).
    """

    features: Tensor
    fine_labels: Tensor
    cache_key: str | None
    cache_path: Path | None
    from_cache: bool
    seconds: float
    images_per_second: float | None
    unreadable: tuple[int, ...] = ()


def _collective_device() -> torch.device:
    """Where tensors must live for collectives of the current process group (NCCL: the GPU)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def stop_requested_on_any_rank(stop: StopSignals) -> str | None:
    """The stop signal ``stop`` received, on this rank or (under ``torch.distributed``, as
    ``"a signal another rank received"``) on any other; ``None`` when none did. A collective
    under ``torch.distributed``: every rank must call it at the same point."""
    if _all_ranks_agree(stop.received is None):
        return None
    return stop.received or "a signal another rank received"


def check_stop(stop: StopSignals | None, during: str) -> None:
    """Raise :class:`EvaluationStopped` when any rank received a signal of ``stop`` (a
    collective under ``torch.distributed`` when ``stop`` catches any signal)."""
    if stop is None or not stop.numbers:
        return
    received = stop_requested_on_any_rank(stop)
    if received is not None:
        raise EvaluationStopped(received, during)


def gather_shards(local: Tensor, num_samples: int) -> Tensor:
    """Concatenate every rank's :class:`EvalShardSampler` shard in rank order (on CPU).

    ``local`` is this rank's ``(shard_size, ...)`` result, with the same trailing shape and dtype
    on every rank (an empty shard included). Shards differ in size by at most one (or are empty
    when ``num_samples < world_size``); they are padded for ``all_gather`` and trimmed, so the
    result has exactly ``num_samples`` rows. Without ``torch.distributed`` it returns ``local``.
    """
    if not is_distributed():
        if len(local) != num_samples:
            raise ValueError(f"expected {num_samples} rows, got {len(local)}")
        return local.cpu()
    world, rank = get_world_size(), get_rank()
    sizes = [len(EvalShardSampler(num_samples, r, world)) for r in range(world)]
    if len(local) != sizes[rank]:
        raise ValueError(f"rank {rank} holds {len(local)} rows but its shard has {sizes[rank]}")
    device = _collective_device()
    trailing = tuple(local.shape[1:])
    output = torch.empty((num_samples, *trailing), dtype=local.dtype)
    offsets = [sum(sizes[:r]) for r in range(world)]
    largest = max(sizes)
    for start in range(0, largest, _GATHER_CHUNK_ROWS):
        stop = min(start + _GATHER_CHUNK_ROWS, largest)
        padded = torch.zeros((stop - start, *trailing), dtype=local.dtype, device=device)
        mine = local[start:stop]
        padded[: len(mine)] = mine.to(device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        for r, part in enumerate(parts):
            keep = max(0, min(stop, sizes[r]) - start)
            if keep:
                output[offsets[r] + start : offsets[r] + start + keep] = part[:keep].cpu()
    return output


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    description: str = "features",
    output_fn: Callable[[Tensor], Tensor] | None = None,
    worker_signals: Sequence[int] = (),
    stop: StopSignals | None = None,
) -> Tensor:
    """Run ``model`` in eval mode over ``dataset`` (items ``(image, label, ...)``), without grad.

    Returns the ``(N, ...)`` outputs in dataset order on CPU, float32 (floating outputs are cast
    up from autocast's bf16), or whatever ``output_fn`` makes of each batch (e.g. an argmax).
    Each rank runs its contiguous shard and the shards are gathered, so every rank returns all
    ``N`` rows. The model's train/eval mode is restored afterwards.

    With ``stop`` (a :class:`StopSignals` in force), a signal it catches on any rank raises
    :class:`EvaluationStopped` on every rank after the batch in progress (the workers leave
    its signals to this process). Under ``torch.distributed`` the ranks then agree after every
    batch, in as many rounds as the largest shard has batches.
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{description}: the dataset is empty; nothing to extract")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    device = torch.device(device)
    num_samples = len(dataset)  # type: ignore[arg-type]
    sampler = EvalShardSampler(num_samples, get_rank(), get_world_size())
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    was_training = model.training
    model.eval()
    chunks: list[Tensor] = []
    bar = tqdm(
        total=len(sampler),
        desc=description,
        unit="img",
        unit_scale=True,
        # (None: no bar where stderr is no terminal: a batch job's log)
        disable=None if progress and is_main_process() else True,
        leave=False,
    )
    stopping = stop is not None and bool(stop.numbers)
    if stopping:
        assert stop is not None
        worker_signals = tuple(dict.fromkeys((*worker_signals, *stop.numbers)))
    # Rank 0's shard is the largest: every rank agrees on a stop that many times.
    largest_shard = len(EvalShardSampler(num_samples, 0, get_world_size()))
    rounds = -(-largest_shard // batch_size) if stopping else len(loader)
    batches = None
    try:
        # Workers that leave these signals to this process (a training run's stop signals).
        batches = start_workers(loader, worker_signals)
        for round_index in range(rounds):
            if round_index < len(loader):
                images = next(batches)[0].to(device, non_blocking=True)
                with _autocast(device, autocast_dtype):
                    output = model(images)
                output = output.float() if output.is_floating_point() else output
                if output_fn is not None:
                    output = output_fn(output)
                chunks.append(output.cpu())
                bar.update(len(images))
            if stopping:
                check_stop(stop, f"{description} (batch {round_index + 1} of {rounds})")
    finally:
        # Now, not when the iterator is collected (its last batch was taken, not its end): a
        # worker stuck in a read must not hold a stopped command past the grace period.
        end_workers(batches)
        bar.close()
        model.train(was_training)
    if chunks:
        local = torch.cat(chunks)
    else:
        # An empty shard (fewer images than ranks) still needs the output's shape and dtype.
        with _autocast(device, autocast_dtype):
            probe = model.eval()(dataset[0][0].unsqueeze(0).to(device))
        model.train(was_training)
        probe = probe.float() if probe.is_floating_point() else probe
        if output_fn is not None:
            probe = output_fn(probe)
        local = probe.cpu()[:0]
    return gather_shards(local, num_samples)


def _data_files(spec: DataSpec, source: ImageSource) -> list[str]:
    """The files ``source``'s images are read from (none for data generated in memory)."""
    paths = source.file_paths  # (an image folder decodes them at each call: once here)
    if paths is not None:
        return list(paths)
    return [str(path) for path in dataset_files(spec)]


def data_files_fingerprint(spec: DataSpec, source: ImageSource) -> str | None:
    """sha256 over the path (relative to the dataset root), size, modification time and status
    change time of every file ``source`` reads its images from; None for data without files
    (digits, synthetic).

    Only ``stat`` is called, no file is read, so it is cheap even for a large image folder, and
    an image overwritten under the same name changes it, also when its modification time is
    set back (``cp -p``, ``rsync -a``, ``touch -r``): no user tool sets the change time back.
    """
    files = _data_files(spec, source)
    if not files:
        return None
    digest = hashlib.sha256()
    for path, relative in zip(files, paths_below(files, str(resolve_root(spec))), strict=True):
        status = os.stat(path)
        digest.update(relative)
        digest.update(f"|{status.st_size}|{status.st_mtime_ns}|{status.st_ctime_ns}\n".encode())
    return digest.hexdigest()


def _code_versions() -> dict[str, str]:
    import timm
    import torchvision

    return {
        "look": look.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
    }


def feature_cache_key(
    *,
    weights_fingerprint: str,
    model_identity: dict[str, Any],
    output: str,
    dataset_spec: DataSpec,
    split: str,
    image_size: int,
    transform: object,
    fine_labels: Tensor,
    precision: str,
    files_fingerprint: str | None = None,
) -> str:
    """sha256 naming one feature file; any change of weights, data or transform changes it.

    Hashes the weights fingerprint, the architecture (``model_identity``'s backbone name, stem
    and constructor arguments: a ``global_pool`` changes the features, not the weights),
    which ``output`` (``"backbone"`` pooled features or ``"head"``), the dataset spec (without the
    label choice and the training-only fields), the split, the image size, ``repr(transform)`` and
    the normalisation constants, the number of images and their fine labels, the precision
    the network ran in (``"fp32"``/``"bf16"``) and ``files_fingerprint``
    (:func:`data_files_fingerprint`: the image files' names, sizes and modification times),
    and the versions of look, torch, torchvision and timm.
    """
    spec_fields = dataclasses.asdict(dataclasses.replace(dataset_spec, image_size=image_size))
    for irrelevant in ("labels", "download", "augment"):
        spec_fields.pop(irrelevant)
    if spec_fields.get("root") is not None:
        spec_fields["root"] = str(Path(spec_fields["root"]).expanduser().resolve())
    labels_digest = hashlib.sha256(
        fine_labels.to(torch.int64).contiguous().numpy().tobytes()
    ).hexdigest()
    description = {
        "format": CACHE_FORMAT,
        "weights": weights_fingerprint,
        "backbone": model_identity.get("backbone"),
        "small_stem": model_identity.get("small_stem"),
        "output": output,
        "dataset": spec_fields,
        "split": split,
        "image_size": image_size,
        "transform": repr(transform),
        "normalization": normalization_stats(dataset_spec.dataset),
        "num_samples": len(fine_labels),
        "fine_labels": labels_digest,
        "precision": precision,
        "files": files_fingerprint,
        # The code that computed them: a backbone's forward or a transform may change between
        # versions without changing a name or a repr above.
        "code": _code_versions(),
    }
    model_kwargs = model_identity.get("model_kwargs")
    if model_kwargs:  # (absent when empty: the keys of models built without any stay as they were)
        description["model_kwargs"] = model_kwargs
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path, fine_labels: Tensor) -> tuple[Tensor, tuple[int, ...]] | None:
    """Features and unreadable indices stored at ``path``, or None when absent, unreadable or
    for other labels."""
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        features, labels = stored["features"], stored["fine_labels"]
        unreadable = stored["unreadable"]
    except Exception:  # a torn or foreign file is a miss, never an error
        return None
    if (
        not isinstance(features, Tensor)
        or features.ndim != 2
        or len(features) != len(fine_labels)
        or not torch.equal(labels, fine_labels.to(labels.dtype))
        or not isinstance(unreadable, Tensor)
    ):
        return None
    return features, tuple(unreadable.tolist())


def _write_cache(
    path: Path,
    features: Tensor,
    fine_labels: Tensor,
    unreadable: tuple[int, ...],
    meta: dict[str, str],
) -> None:
    """Write atomically, readable by everyone: a feature cache may be shared."""
    with atomic_write_path(path, prefix=f".{path.stem}.", file_mode=0o644) as temp:
        torch.save(
            {
                "features": features.float().contiguous(),
                "fine_labels": fine_labels.to(torch.int64),
                "unreadable": torch.tensor(unreadable, dtype=torch.int64),
                "meta": meta,
            },
            temp,
        )


def _cache_files(cache_dir: Path) -> list[tuple[Path, os.stat_result]]:
    """The cache's files in ``cache_dir`` (names of a key and ``.pt``) with their status."""
    files = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(cache_dir):
            if _CACHE_FILE.fullmatch(entry.name):
                with contextlib.suppress(OSError):  # (removed meanwhile by another process)
                    files.append((Path(entry.path), entry.stat()))
    return files


def _gigabytes(size: float) -> str:
    """A byte count in GB with the digits a small limit needs (0.0001 GB is not "0.0 GB")."""
    return f"{size / 1e9:.3g} GB"


def trim_feature_cache(
    cache_dir: str | Path, max_bytes: int, *, keep: Sequence[Path] = ()
) -> list[Path]:
    """Delete the least recently used feature files of ``cache_dir`` (by modification time: a
    cache hit touches its file) until the cache's files take at most ``max_bytes``; the files
    in ``keep`` stay. Only the cache's own files (a key's name and ``.pt``) are counted or
    deleted. Returns the deleted files; one that cannot be deleted (a shared cache of another
    user) is passed over."""
    return _trim(Path(cache_dir), max_bytes, keep)[0]


def _trim(cache_dir: Path, max_bytes: int, keep: Sequence[Path]) -> tuple[list[Path], int]:
    """:func:`trim_feature_cache`'s deleted files, and the bytes the cache's files take after."""
    files = sorted(_cache_files(cache_dir), key=lambda item: item[1].st_mtime_ns)
    total = sum(status.st_size for _, status in files)
    kept = {Path(path).resolve() for path in keep}
    removed = []
    for path, status in files:
        if total <= max_bytes:
            break
        if path.resolve() in kept:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            continue
        total -= status.st_size
        removed.append(path)
    return removed, total


def _mind_cache_size(cache_path: Path, max_bytes: int | None, in_use: set[Path]) -> None:
    """After a write: keep the cache under ``max_bytes`` (the files in ``in_use`` stay), and
    warn if they alone are over it; without a limit, warn (once per process) when the cache has
    grown past :data:`FEATURE_CACHE_WARN_BYTES`."""
    global _warned_cache_size
    if max_bytes is not None:
        total = _trim(cache_path.parent, max_bytes, tuple(in_use))[1]
        if total > max_bytes:
            warnings.warn(
                f"the feature cache {cache_path.parent} holds {_gigabytes(total)}, over its "
                f"limit of {_gigabytes(max_bytes)}: the features this evaluation uses take "
                "that much (or another user's files could not be deleted); raise the limit "
                "(`--cache-max-gb`) to keep them all",
                UserWarning,
                stacklevel=3,
            )
        return
    if _warned_cache_size:
        return
    files = _cache_files(cache_path.parent)
    total = sum(status.st_size for _, status in files)
    if total > FEATURE_CACHE_WARN_BYTES:
        _warned_cache_size = True
        warnings.warn(
            f"the feature cache {cache_path.parent} holds {total / 1e9:.0f} GB in {len(files)} "
            "files; keep it smaller with `look evaluate --cache-max-gb GB` (its least recently "
            "used files are deleted), or delete files there",
            UserWarning,
            stacklevel=3,
        )


def files_at(source: ImageSource, indices: Sequence[int]) -> list[str]:
    """The files of ``source``'s images at ``indices`` (none for images held in memory); the
    paths are read only when some are asked for (an image folder decodes them all at each
    read)."""
    if not indices:
        return []
    paths = source.file_paths or ()
    return [paths[i] for i in indices] if paths else []


def unreadable_indices(dataset: Dataset) -> tuple[int, ...]:
    """Indices of the images of ``dataset`` (an :class:`look.data.EvalDataset`) whose file could
    not be decoded so far, on any rank: with ``corrupt_images="skip"`` a substitute was used.

    A collective under ``torch.distributed``: every rank must call it (each rank only decodes its
    own shard). Datasets without files give ``()``.
    """
    source = getattr(dataset, "source", None)
    marked = torch.zeros(len(dataset), dtype=torch.int64)  # type: ignore[arg-type]
    # (the skip count first: an image folder decodes its paths from one buffer at each call)
    paths = (
        source.file_paths if isinstance(source, ImageSource) and source.num_skipped_files else None
    )
    if paths:
        position = {path: index for index, path in enumerate(paths)}
        for path in source.skipped_files:
            # A substitute tried from outside a subset is marked in the full source only.
            if path in position:
                marked[position[path]] = 1
    if is_distributed():
        marked = marked.to(_collective_device())
        dist.all_reduce(marked, op=dist.ReduceOp.MAX)
    return tuple(torch.nonzero(marked.cpu()).flatten().tolist())


def keep_readable(unreadable: tuple[int, ...], dataset: Dataset, description: str) -> Tensor:
    """Boolean mask of the rows of ``dataset`` to evaluate: all but the ``unreadable`` ones.

    An evaluation split leaves unreadable images out rather than counting a substitute twice,
    which would bias the accuracy towards the substitute's class. Warns (on the main process)
    with the count and the files left out.
    """
    keep = torch.ones(len(dataset), dtype=torch.bool)  # type: ignore[arg-type]
    if not unreadable:
        return keep
    keep[list(unreadable)] = False
    if is_main_process():
        paths = getattr(getattr(dataset, "source", None), "file_paths", None)
        names = [paths[i] if paths is not None else f"#{i}" for i in unreadable]
        listed = name_some(names, _NAMED_FILES_MAX, quote=False)
        warnings.warn(
            f"{description}: left out {len(unreadable)} unreadable image(s) of {len(keep)}, "
            f"evaluating {int(keep.sum())}: {listed}",
            RuntimeWarning,
            stacklevel=2,
        )
    return keep


def _all_ranks_agree(flag: bool) -> bool:
    """True when ``flag`` holds on every rank (so all ranks take the same branch)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def load_or_extract_features(
    model: nn.Module,
    dataset: Dataset,
    fine_labels: Tensor,
    *,
    cache_key: str | None,
    cache_dir: str | Path | None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    description: str = "features",
    meta: dict[str, str] | None = None,
    cache_max_bytes: int | None = None,
    cache_in_use: set[Path] | None = None,
    stop: StopSignals | None = None,
) -> FeatureSet:
    """Features of ``dataset`` from the cache when ``cache_dir/<cache_key>.pt`` matches, else extracted.

    ``fine_labels`` are the dataset's fine labels (stored with the features and checked on a hit),
    and the indices of unreadable images are stored with them (:func:`unreadable_indices`).
    ``cache_dir=None`` or ``cache_key=None`` disables the cache. A fresh extraction is written by
    rank 0 only, atomically. Every rank takes the same branch (a hit needs a hit on every rank).
    A hit touches its file (the cache's recency); after a write, ``cache_max_bytes`` keeps the
    cache under that size (:func:`trim_feature_cache`), and without it a cache past
    :data:`FEATURE_CACHE_WARN_BYTES` is warned about. The file read or written is added to
    ``cache_in_use`` (one evaluation's files: a limit never deletes them, so that its test
    split's features do not push out its training split's); the file written always stays.
    ``stop``: see :func:`extract_features` (a stopped extraction writes nothing).
    """
    cache_path = None
    if cache_dir is not None and cache_key is not None:
        # Absolute: results.json records this path, and look analyze may run from elsewhere.
        cache_path = Path(cache_dir).expanduser().resolve() / f"{cache_key}.pt"
    started = time.perf_counter()
    cached = _read_cache(cache_path, fine_labels) if cache_path is not None else None
    if _all_ranks_agree(cached is not None):
        assert cached is not None
        features, unreadable = cached
        if is_main_process() and cache_path is not None:
            if cache_in_use is not None:
                cache_in_use.add(cache_path)
            with contextlib.suppress(OSError):  # (a read-only shared cache keeps its times)
                os.utime(cache_path)
        return FeatureSet(
            features=features,
            fine_labels=fine_labels,
            cache_key=cache_key,
            cache_path=cache_path,
            from_cache=True,
            seconds=time.perf_counter() - started,
            images_per_second=None,
            unreadable=unreadable,
        )
    features = extract_features(
        model,
        dataset,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        autocast_dtype=autocast_dtype,
        progress=progress,
        description=description,
        stop=stop,
    )
    if features.ndim != 2:
        raise ValueError(
            f"{description}: the model returned features of shape {tuple(features.shape)}; "
            "expected (N, d) pooled features"
        )
    unreadable = unreadable_indices(dataset)
    seconds = time.perf_counter() - started
    if cache_path is not None and is_main_process():
        _write_cache(cache_path, features, fine_labels, unreadable, dict(meta or {}))
        in_use = cache_in_use if cache_in_use is not None else set()
        in_use.add(cache_path)
        _mind_cache_size(cache_path, cache_max_bytes, in_use)
    return FeatureSet(
        features=features,
        fine_labels=fine_labels,
        cache_key=cache_key,
        cache_path=cache_path,
        from_cache=False,
        seconds=seconds,
        images_per_second=len(features) / seconds if seconds > 0 else None,
        unreadable=unreadable,
    )
