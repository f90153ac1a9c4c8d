"""Crash-safe training checkpoints that are only ever read with ``torch.load(weights_only=True)``.

Layout of a checkpoint directory::

    ckpt-000001000.pt     one file per saved step (a nested dict of tensors and plain values)
    checkpoints.json      manifest: file, step, sha256, bytes and creation time of each checkpoint,
                          oldest first / newest last

Every file is written to a hidden temporary file in the same directory, flushed, ``fsync``-ed and
then renamed over its final name, so a crash leaves either the old or the new file, never a torn
one. The manifest's sha256 lets a later run detect a file that was truncated or modified afterwards;
:func:`load_latest_checkpoint` then warns and falls back to the next older good checkpoint.

Only rank 0 may call :func:`save_checkpoint` (the caller's job, e.g. via
``look.engine.distributed.is_main_process()``); every rank may load.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch

from look.atomic import atomic_write_path, fsync_directory
from look.engine.distributed import get_rank, get_world_size

__all__ = [
    "MANIFEST_NAME",
    "CheckpointCorruptError",
    "capture_rng_state",
    "checkpoint_path",
    "describe_torch_load_error",
    "discard_checkpoints",
    "find_checkpoint_files",
    "find_latest_checkpoint",
    "is_look_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "newest_checkpoint_file",
    "remove_leftover_temp_files",
    "require_look_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "verify_listed_checkpoint",
]

MANIFEST_NAME = "checkpoints.json"
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
# Temporary files are hidden (leading dot) so that the ``ckpt-*.pt`` scan can never pick one up.
_TEMP_PREFIXES = (".ckpt-", f".{MANIFEST_NAME}.")
_TEMP_SUFFIX = ".tmp"
_MANIFEST_FORMAT = 1
_HASH_CHUNK_BYTES = 1 << 20

# Leaf values that a weights_only unpickler can always rebuild. Exact types on purpose: subclasses
# such as numpy.float64 (a float subclass) or IntEnum would pickle through their own reducers.
_PLAIN_LEAF_TYPES = (bool, int, float, str, type(None))
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_DICT_TYPES = (dict, OrderedDict)
_SEQUENCE_TYPES = (list, tuple)


class CheckpointCorruptError(RuntimeError):
    """A checkpoint file cannot be trusted: checksum mismatch, truncation or unreadable content."""


# --------------------------------------------------------------------------------------------------
# Saving


def checkpoint_path(directory: Path | str, step: int) -> Path:
    """Path of the checkpoint of ``step`` inside ``directory`` (``ckpt-{step:09d}.pt``)."""
    return Path(directory) / f"ckpt-{step:09d}.pt"


def save_checkpoint(
    directory: Path | str, step: int, state: dict[str, Any], *, keep_last: int | None = 3
) -> Path:
    """Atomically write ``state`` as the checkpoint of ``step``, update the manifest, prune old ones.

    ``state`` must be a nested dict of tensors, numbers, strings, ``None``, lists/tuples and dicts
    with ``str``/``int`` keys (``model.state_dict()``, ``optimizer.state_dict()``,
    :func:`capture_rng_state`, ...). Anything else — an ``argparse.Namespace``, a dataclass, a numpy
    array — raises ``TypeError`` naming its key path *before* anything is written, because it could
    not be read back with ``weights_only=True``.

    After the write, only the newest ``keep_last`` checkpoints are kept (``None`` keeps all), the
    one just written always among them. Checkpoints of *later* steps than ``step`` are deleted
    first, with a warning: they come from an abandoned run (restarted from scratch or from an
    earlier checkpoint) and would otherwise be taken as the newest on the next resume.
    Call this on rank 0 only.

    Returns the path of the written checkpoint.
    """
    if type(step) is not int or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
        raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
    if not isinstance(state, _DICT_TYPES):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__qualname__}")
    _check_checkpointable(state, path="state")

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final_path = checkpoint_path(directory, step)
    existing = _manifest_entries_merged_with_disk(directory)

    # Checkpoints of later steps belong to an abandoned trajectory (a run restarted from scratch
    # or from an earlier checkpoint); left in place, the next resume would pick them as newest.
    # They go before the new file is written, so no crash can leave them newer than it.
    superseded = [e for e in existing if e["step"] > step]
    if superseded:
        warnings.warn(
            f"saving step {step} in {directory} removes checkpoints of later steps, which this "
            f"run did not resume from (unreadable, or of an abandoned run): "
            f"{', '.join(e['file'] for e in superseded)}",
            RuntimeWarning,
            stacklevel=2,
        )
        for stale in superseded:
            (directory / stale["file"]).unlink(missing_ok=True)

    with atomic_write_path(final_path, prefix=".ckpt-", suffix=_TEMP_SUFFIX, durable=True) as temp:
        try:
            torch.save(state, temp)
        except RuntimeError as error:
            if "unexpected pos" not in str(error) and "failed writing" not in str(error):
                raise
            # torch's writer reports a short write (a full disk, a file-size limit) in terms of
            # its zip stream: say what it means.
            free = shutil.disk_usage(directory).free
            raise OSError(
                f"writing {final_path.name} came up short ({error}): the disk is full "
                f"({free / 1e6:.0f} MB free in {directory}) or a file-size limit was reached"
            ) from error
    entry = {
        "file": final_path.name,
        "step": step,
        "sha256": _sha256_of_file(final_path),
        "bytes": final_path.stat().st_size,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    older = [e for e in existing if e["step"] < step]
    pruned = older[: max(0, len(older) - (keep_last - 1))] if keep_last is not None else []
    kept = [e for e in older if e not in pruned] + [entry]
    # Deleting before the manifest update is safe: entries whose file is gone are ignored.
    for stale in pruned:
        (directory / stale["file"]).unlink(missing_ok=True)
    _write_manifest(directory, kept)
    return final_path


def _check_checkpointable(value: Any, path: str) -> None:
    """Raise ``TypeError`` naming ``path`` for the first value a weights_only load could not rebuild."""
    if isinstance(value, _TENSOR_TYPES):
        if type(value) not in _TENSOR_TYPES:
            raise TypeError(
                f"checkpoint state at {path} is a tensor subclass {type(value).__qualname__}; "
                "save a plain tensor instead (e.g. value.as_subclass(torch.Tensor))"
            )
        return
    if type(value) in _PLAIN_LEAF_TYPES:
        return
    if type(value) in _DICT_TYPES:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(
                    f"checkpoint state at {path} has a key {key!r} of type "
                    f"{type(key).__qualname__}; only str and int keys can be saved"
                )
            _check_checkpointable(item, f"{path}[{key!r}]")
        return
    if type(value) in _SEQUENCE_TYPES:
        for index, item in enumerate(value):
            _check_checkpointable(item, f"{path}[{index}]")
        return
    raise TypeError(
        f"checkpoint state at {path} is a {type(value).__module__}.{type(value).__qualname__}, "
        "which cannot be loaded with torch.load(weights_only=True); only tensors, bool/int/float/"
        "str/None, lists/tuples and dicts can be saved — convert it first (e.g. vars(namespace), "
        "dataclasses.asdict(config), torch.from_numpy(array), float(numpy_scalar))"
    )


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Manifest


def _read_manifest(directory: Path) -> list[dict[str, Any]] | None:
    """Entries of the manifest, or ``None`` when it is missing; an unreadable one warns."""
    manifest_path = directory / MANIFEST_NAME
    try:
        raw = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        entries = data["checkpoints"]
        valid = [
            e
            for e in entries
            if isinstance(e, dict)
            and isinstance(e.get("file"), str)
            and _CHECKPOINT_NAME.match(e["file"])
            and type(e.get("step")) is int
        ]
    except (ValueError, KeyError, TypeError) as error:
        warnings.warn(
            f"checkpoint manifest {manifest_path} is unreadable ({error}); checkpoints in "
            f"{directory} are used without checksum verification",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return valid


def _write_manifest(directory: Path, entries: list[dict[str, Any]]) -> None:
    payload = json.dumps({"format": _MANIFEST_FORMAT, "checkpoints": entries}, indent=2) + "\n"
    manifest = directory / MANIFEST_NAME
    with atomic_write_path(
        manifest, prefix=f".{MANIFEST_NAME}.", suffix=_TEMP_SUFFIX, durable=True
    ) as temp:
        temp.write_text(payload, encoding="utf-8")


def newest_checkpoint_file(directory: Path | str) -> str | None:
    """The name of the ``ckpt-*.pt`` file of the latest step in ``directory`` (unverified), for
    a message saying what is kept; ``None`` when there is none."""
    found = find_checkpoint_files(directory)
    return max(found, key=found.__getitem__) if found else None


def find_checkpoint_files(directory: Path | str) -> dict[str, int]:
    """``{file name: step}`` of every ``ckpt-*.pt`` file present in ``directory``."""
    directory = Path(directory)
    found: dict[str, int] = {}
    if not directory.is_dir():
        return found
    for path in directory.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_file():
            found[path.name] = int(match.group(1))
    return found


def _manifest_entries_merged_with_disk(directory: Path) -> list[dict[str, Any]]:
    """Manifest entries whose files exist, plus unlisted files on disk (``sha256`` = ``None``).

    A stale or missing manifest (crash between a checkpoint's rename and the manifest update, or a
    manifest deleted by hand) therefore never hides a checkpoint.
    """
    on_disk = find_checkpoint_files(directory)
    listed = {e["file"]: e for e in (_read_manifest(directory) or []) if e["file"] in on_disk}
    for name, step in on_disk.items():
        if name not in listed:
            listed[name] = {"file": name, "step": step, "sha256": None, "bytes": None}
    return sorted(listed.values(), key=lambda e: e["step"])


def _manifest_entry_for(path: Path) -> dict[str, Any] | None:
    for entry in _read_manifest(path.parent) or []:
        if entry["file"] == path.name:
            return entry
    return None


def remove_leftover_temp_files(directory: Path | str) -> None:
    """Delete temp files of interrupted writes. Only the writer of ``directory`` may call it,
    holding its run lock: a reader (``look export``, ``look evaluate``, a dry run) that removed
    them would delete the checkpoint a live job is writing, and that job would fail."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.name.startswith(_TEMP_PREFIXES) and path.name.endswith(_TEMP_SUFFIX):
            with contextlib.suppress(OSError):  # already gone
                path.unlink()


def discard_checkpoints(directory: Path | str) -> int:
    """Delete every checkpoint of ``directory`` (and its manifest): a run that starts over in
    its folder (``--no-resume``) must not leave the old run's checkpoints, which a later plain
    re-run would resume from. Returns how many there were. The folder is first renamed (one
    atomic step), so a crash part-way leaves no old checkpoint where the run looks for them;
    a renamed folder left by such a crash is removed by the next call."""
    directory = Path(directory)
    for leftover in directory.parent.glob(f".{directory.name}-discarded-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    count = len(find_checkpoint_files(directory))
    if directory.is_dir():
        discarded = directory.with_name(f".{directory.name}-discarded-{os.getpid()}")
        directory.rename(discarded)
        fsync_directory(directory.parent)
        shutil.rmtree(discarded, ignore_errors=True)
    return count


# --------------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path: Path | str, map_location: Any = "cpu") -> dict[str, Any]:
    """Load one checkpoint with ``weights_only=True`` after checking it against the manifest.

    The sha256 (and size) are verified when the directory's manifest lists the file. Raises
    ``FileNotFoundError`` for a missing file and :class:`CheckpointCorruptError` naming the file for
    a checksum/size mismatch, a file ``torch.load`` cannot read, or content that is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    entry = _manifest_entry_for(path)
    if entry is not None:
        _verify_against_manifest(path, entry)
    return _torch_load(path, map_location)


def verify_listed_checkpoint(path: Path | str) -> bool:
    """Check ``path`` against its directory's manifest when the manifest lists it (raising
    :class:`CheckpointCorruptError` on a size or sha256 mismatch); ``False`` when unlisted."""
    path = Path(path)
    entry = _manifest_entry_for(path)
    if entry is None:
        return False
    _verify_against_manifest(path, entry)
    return True


def _verify_against_manifest(path: Path, entry: dict[str, Any]) -> None:
    expected_bytes = entry.get("bytes")
    actual_bytes = path.stat().st_size
    if type(expected_bytes) is int and expected_bytes != actual_bytes:
        raise CheckpointCorruptError(
            f"checkpoint {path} has {actual_bytes} bytes but the manifest recorded "
            f"{expected_bytes} (truncated or modified after it was written)"
        )
    expected_sha = entry.get("sha256")
    if isinstance(expected_sha, str):
        actual_sha = _sha256_of_file(path)
        if actual_sha != expected_sha:
            raise CheckpointCorruptError(
                f"checkpoint {path} has sha256 {actual_sha} but the manifest recorded "
                f"{expected_sha} (the file was modified after it was written)"
            )
        return
    # No checksum of ours (an unreadable manifest, or a file it does not list): the CRC-32 of
    # every record of torch's zip, which torch.load itself does not check.
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointCorruptError(f"checkpoint {path} is no whole zip file ({error})") from error
    if damaged is not None:
        raise CheckpointCorruptError(
            f"checkpoint {path} is damaged: its record {damaged!r} fails its CRC-32 check"
        )


def _torch_load(path: Path, map_location: Any, *, mmap: bool = False) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many types for torn zips and bad pickles
        # One line of torch's message, with what it refused: the rest advises weights_only=False,
        # which a file that is not this library's checkpoint (or a damaged one) must not be
        # loaded with.
        raise CheckpointCorruptError(
            f"checkpoint {path} cannot be read by torch.load(weights_only=True) "
            f"({describe_torch_load_error(error)}); is it a look checkpoint, and whole?"
        ) from error
    if not isinstance(state, dict):
        raise CheckpointCorruptError(
            f"checkpoint {path} holds a {type(state).__qualname__}, expected a dict"
        )
    return state


# What every `look pretrain` checkpoint holds (older ones too).
_LOOK_CHECKPOINT_KEYS = ("config", "model", "global_step")
# Terminal colour codes, which torch puts in its weights_only advice.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# What weights_only refused, in torch's message: "Unsupported global: GLOBAL argparse.Namespace".
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error: ([^\n]*)")


def describe_torch_load_error(error: BaseException) -> str:
    """One line for an error of ``torch.load``: its type and first sentence, without colour codes,
    plus what ``weights_only=True`` refused when torch says so, e.g. ``"UnpicklingError: Weights
    only load failed (unsupported global: argparse.Namespace)"``.

    torch's own message spans lines, advises ``weights_only=False`` (which runs the file's pickled
    code) and names the refused class only at its end, where a cut-off message loses it.
    """
    text = _ANSI_ESCAPE.sub("", str(error)).strip()
    first_line = (text.splitlines() or [""])[0]
    first = first_line.split(". ")[0].rstrip(". ")[:160]
    detail = ""
    unsupported = _UNSUPPORTED_GLOBAL.search(text)
    if unsupported is not None:
        detail = f" (unsupported global: {unsupported.group(1)})"
    elif (unpickler := _UNPICKLER_ERROR.search(text)) is not None:
        detail = f" ({unpickler.group(1).split('. ')[0].rstrip('. ')[:160]})"
    return f"{type(error).__name__}: {first}{detail}"


def is_look_checkpoint(loaded: object) -> TypeGuard[Mapping[str, Any]]:
    """Whether ``loaded`` (what ``torch.load`` read) is a `look pretrain` checkpoint: its
    config, method state (``model``) and step."""
    return (
        isinstance(loaded, Mapping)
        and all(key in loaded for key in _LOOK_CHECKPOINT_KEYS)
        and isinstance(loaded["model"], Mapping)
    )


def require_look_checkpoint(state: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """``state`` if it is a `look pretrain` checkpoint whose config names its model; else
    :class:`CheckpointCorruptError` naming the file and what it seems to be (a state dict, an
    export, another tool's file)."""
    missing = [key for key in _LOOK_CHECKPOINT_KEYS if key not in state]
    config = state.get("config")
    if is_look_checkpoint(state) and isinstance(config, Mapping) and "model" in config:
        return state
    if state and all(isinstance(value, torch.Tensor) for value in state.values()):
        what = "plain weights (a state dict or an exported backbone)"
    else:
        what = f"a dict without {', '.join(repr(key) for key in missing) or 'a config'}"
    raise CheckpointCorruptError(
        f"{path} is not a `look pretrain` checkpoint: it holds {what}; pass a run directory or "
        "one of its checkpoints/ckpt-*.pt files (plain weights go to `look evaluate --timm NAME "
        "--weights FILE` or model.pretrained_weights)"
    )


def _candidates_newest_first(directory: Path) -> Iterator[tuple[Path, dict[str, Any], bool]]:
    """``(path, manifest entry, whether an older one follows)``, newest first."""
    entries = list(reversed(_manifest_entries_merged_with_disk(directory)))
    for index, entry in enumerate(entries):
        yield directory / entry["file"], entry, index + 1 < len(entries)


def find_latest_checkpoint(directory: Path | str) -> Path | None:
    """Path of the newest checkpoint in ``directory`` that passes verification, or ``None``.

    A newest checkpoint that fails (checksum mismatch; for files the manifest does not list, a
    ``torch.load`` failure) is reported with ``warnings.warn`` and the next older one is tried.
    Temp files (an interrupted write, or one in progress) are ignored. Raises
    :class:`CheckpointCorruptError` when checkpoints exist but none is usable (starting from
    scratch silently would be worse).
    """
    directory = Path(directory)
    failures: list[str] = []
    for path, entry, older_follows in _candidates_newest_first(directory):
        try:
            _verify_against_manifest(path, entry)
            if not isinstance(entry.get("sha256"), str):
                # No checksum of ours: the load (memory-mapped, so cheap) is checked too.
                _torch_load(path, "cpu", mmap=True)
        except (CheckpointCorruptError, OSError) as error:
            _warn_skipped(path, error, older_follows)
            failures.append(str(error))
            continue
        return path
    _raise_if_all_failed(directory, failures)
    return None


def load_latest_checkpoint(
    directory: Path | str, map_location: Any = "cpu"
) -> tuple[dict[str, Any], Path] | None:
    """Load the newest good checkpoint of ``directory``: ``(state, path)``, or ``None`` if none.

    Corrupt, truncated or tampered checkpoints are skipped with a warning naming them, falling back
    to the next older one. Works without a manifest (unverified files are checked by loading them).
    Raises :class:`CheckpointCorruptError` when checkpoints exist but none can be loaded. Temp
    files are ignored (:func:`remove_leftover_temp_files` is the writer's to call).
    """
    directory = Path(directory)
    failures: list[str] = []
    for path, entry, older_follows in _candidates_newest_first(directory):
        try:
            _verify_against_manifest(path, entry)
            return _torch_load(path, map_location), path
        except (CheckpointCorruptError, OSError) as error:
            _warn_skipped(path, error, older_follows)
            failures.append(str(error))
    _raise_if_all_failed(directory, failures)
    return None


def _warn_skipped(path: Path, error: BaseException, older_follows: bool) -> None:
    then = "trying the next older checkpoint" if older_follows else "no older checkpoint is left"
    warnings.warn(
        f"skipping checkpoint {path}: {error}; {then}",
        RuntimeWarning,
        stacklevel=3,
    )


def _raise_if_all_failed(directory: Path, failures: list[str]) -> None:
    if failures:
        raise CheckpointCorruptError(
            f"none of the {len(failures)} checkpoints in {directory} can be loaded; delete or "
            f"repair them (a training run may also start over: --no-resume): " + "; ".join(failures)
        )


# --------------------------------------------------------------------------------------------------
# Random number generator state


def capture_rng_state() -> dict[str, Any]:
    """State of Python's ``random``, numpy's global and torch's CPU/CUDA generators of this process.

    Everything is converted to tensors and plain values, so it can go into :func:`save_checkpoint`
    and survive ``weights_only=True``. In DDP each rank has its own generators: checkpoints keep
    every rank's (:func:`capture_rng_state_of_every_rank`).
    """
    python_version, python_words, python_gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple):  # legacy=True always returns the MT19937 tuple
        raise RuntimeError("numpy's global generator is not MT19937; cannot capture its state")
    np_name, np_keys, np_pos, np_has_gauss, np_cached_gaussian = np_state
    state: dict[str, Any] = {
        "python": {
            "version": int(python_version),
            "state": torch.tensor(python_words, dtype=torch.int64),
            "gauss_next": None if python_gauss is None else float(python_gauss),
        },
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators from :func:`capture_rng_state` output (possibly after save/load).

    CUDA states are restored when the same number of devices is visible; otherwise a warning says
    they were skipped (e.g. resuming a GPU run on CPU).
    """
    missing = {"python", "numpy", "torch"} - set(state)
    if missing:
        raise ValueError(
            f"RNG state lacks {sorted(missing)}; pass the dict made by capture_rng_state()"
        )
    python_state = state["python"]
    python_words = tuple(int(word) for word in torch.as_tensor(python_state["state"]).tolist())
    random.setstate((int(python_state["version"]), python_words, python_state["gauss_next"]))

    np_state = state["numpy"]
    np.random.set_state(
        (
            str(np_state["bit_generator"]),
            torch.as_tensor(np_state["keys"]).cpu().numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    torch.set_rng_state(torch.as_tensor(state["torch"]).cpu().to(torch.uint8))

    cuda_states = state.get("cuda")
    if cuda_states:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
            torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in cuda_states])
        else:
            warnings.warn(
                f"checkpoint holds {len(cuda_states)} CUDA RNG states but "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA devices "
                "are visible; CUDA generators were not restored",
                RuntimeWarning,
                stacklevel=2,
            )


def capture_rng_state_of_every_rank() -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng_state`, indexed by rank (a collective: call on every rank).

    Rank 0's state alone is not enough: ranks draw different numbers (on GPUs each rank advances
    its own device's generator, which rank 0's process never touches; a caller may seed ranks
    apart), and restoring rank 0's on every rank would put them all on rank 0's stream: a resumed
    run's dropout would then repeat rank 0's masks or the start of its own stream.
    """
    own = capture_rng_state()
    if get_world_size() == 1:
        return [own]
    states: list[Any] = [None] * get_world_size()
    torch.distributed.all_gather_object(states, own)
    return states


def restore_rng_state_of_this_rank(saved: list[dict[str, Any]]) -> bool:
    """Restore this rank's generators from :func:`capture_rng_state_of_every_rank` output; with
    another number of ranks than wrote it, every rank takes rank 0's (the data order and the
    augmentation, seeded per image, do not depend on them) and False is returned."""
    if len(saved) == get_world_size():
        restore_rng_state(saved[get_rank()])
        return True
    restore_rng_state(saved[0])
    return False
