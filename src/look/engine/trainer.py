"""The training loop. It does not know which method it runs: it calls ``Method.forward`` and
``Method.after_optimizer_step`` and handles everything else (devices, DDP, precision, schedules,
logging, checkpoints that resume exactly, export)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import look
from look.atomic import atomic_write_text
from look.config import ConfigError, RunConfig, data_spec_from_config, save_yaml, to_dict
from look.data import (
    CorruptImageError,
    UnreadableImage,
    build_train_dataset,
    describe,
    each_folder_listed_once,
    find_unreadable_images,
    training_data_identity,
)
from look.engine.checkpoint import (
    CheckpointCorruptError,
    capture_rng_state_of_every_rank,
    discard_checkpoints,
    find_checkpoint_files,
    load_checkpoint,
    load_latest_checkpoint,
    newest_checkpoint_file,
    remove_leftover_temp_files,
    restore_rng_state_of_this_rank,
    save_checkpoint,
)
from look.engine.distributed import (
    all_reduce_sum,
    barrier,
    broadcast_buffers_from_rank_0,
    gather_no_grad,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
    rank_seed,
    synchronise_batchnorm,
    wrap_ddp,
)
from look.engine.errors import error_message
from look.engine.export import export_metadata
from look.engine.metrics_log import MetricsLogger
from look.engine.monitor import KnnMonitor, build_knn_monitor
from look.engine.optim import build_lr_scheduler, build_optimizer
from look.engine.run_lock import RunDirectoryBusyError, RunDirectoryLock
from look.engine.sampler import GlobalBatchSampler
from look.engine.stop_signals import (
    StopSignals,
    TrainingStopped,
    end_workers,
    signal_numbers,
    start_workers,
)
from look.memory import FeatureMemory
from look.methods import (
    Batch,
    Method,
    MethodContext,
    StepOutput,
    build_method,
    get_method_class,
)
from look.methods.base import step_output_problem
from look.models import create_backbone, export_backbone

# Sections of the config that define the optimisation problem: a resumed run must match them.
_RESUME_MUST_MATCH = ("seed", "data", "model", "method", "optim")
# Settings of speed or memory only (same results up to float rounding), which a resumed run may
# change, e.g. on other hardware; also keeps runs saved before an option existed resumable.
# Gradient accumulation keeps the global batch; only batch norm sees other micro-batches.
_RESUME_MAY_DIFFER = {
    ("data", "num_workers"),
    ("method", "search_backend"),
    ("method", "search_prefilter"),
    ("method", "chunk_size"),
    ("optim", "grad_accum_steps"),
    # Used before the first step only: the checkpoint holds what the initial weights became
    # (the file may have moved, or been a checkpoint since rotated away), and whether a missing
    # dataset could be downloaded (the data's identity is checked on its own).
    ("model", "pretrained_weights"),
    ("data", "download"),
    # What happens at the next unreadable image (stop, or substitute one of its class): the
    # mid-run corrupt-image error advises switching to skip, which must keep the run.
    ("data", "corrupt_images"),
}

# Train settings that change what a step computes (precision, batch-norm statistics): a resumed
# run may change them (other hardware may need another precision), with a warning that its
# curve then leaves the uninterrupted run's. Other train settings (logging, checkpoints, the
# monitor, stop signals, layout, compile, max_steps) change nothing that is learnt.
_RESUME_WARN_IF_CHANGED = (("train", "amp"), ("train", "sync_batchnorm"))

# Settings whose values may be swapped on resume within one group: a sharded bank is the same
# bank spread over the ranks, and its checkpoint holds the whole bank under a bank's keys.
_RESUME_INTERCHANGEABLE: dict[tuple[str, str], frozenset[Any]] = {
    ("method", "memory"): frozenset({"bank", "sharded_bank"}),
}

# Where the training data is read from: may change on resume when the data itself is the same
# (checked by its identity, :func:`look.data.training_data_identity`).
_DATA_LOCATION = frozenset({("data", "root"), ("data", "labels")})

# Settings the ranks of one job may be given differently: where a node reads its own copy of
# the data, initial weights or grouping file from (the data's identity is compared on its
# own), how many loader workers its CPUs allow, and what only rank 0 shows.
_RANKS_MAY_DIFFER = frozenset(
    {
        *_DATA_LOCATION,
        ("data", "num_workers"),
        ("model", "pretrained_weights"),
        ("train", "progress"),
    }
)


def _flat_settings(resolved: dict[str, Any]) -> dict[str, Any]:
    """``{"section.key": value}`` of a resolved config (a top-level value under its own name)."""
    flat: dict[str, Any] = {}
    for section, values in resolved.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if (section, key) not in _RANKS_MAY_DIFFER:
                    flat[f"{section}.{key}"] = value
        else:
            flat[section] = values
    return flat


def check_every_rank_agrees(what: str, value: Any, advice: str) -> None:
    """Raise a ConfigError on every rank unless every rank holds the same ``value`` (a dict of
    settings is compared key by key, and the differing keys are named with each rank's value).
    A collective under torch.distributed; nothing otherwise."""
    if not is_distributed():
        return
    gathered: list[Any] = [None] * get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    differences: list[str] = []
    for rank, other in enumerate(gathered[1:], start=1):
        if isinstance(value, dict) and isinstance(other, dict):
            first = gathered[0]
            for key in sorted(set(first) | set(other)):
                if first.get(key) != other.get(key):
                    differences.append(
                        f"{key}: rank 0 {first.get(key)!r} vs rank {rank} {other.get(key)!r}"
                    )
        elif other != gathered[0]:
            differences.append(f"rank 0 {gathered[0]!r} vs rank {rank} {other!r}")
    if differences:
        shown = "; ".join(differences[:10])
        more = f"; and {len(differences) - 10} more" if len(differences) > 10 else ""
        raise ConfigError(f"the ranks of this job differ in {what}: {shown}{more}. {advice}")


def _describe_identity(identity: dict[str, Any]) -> str:
    return (
        f"{identity['images']} images in {identity['classes']} classes, "
        f"sha256 {str(identity['sha256'])[:12]}"
    )


class TrainingStepError(RuntimeError):
    """A training step failed (non-finite loss, bad values); the message says where."""


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    epochs_completed: int
    epoch_seconds: list[float] = field(default_factory=list)
    backbone_path: Path | None = None
    skipped_steps: int = 0


def resolve_device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use cpu or auto")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"train.device={name!r} must be auto, cpu, cuda or mps")
    return name


def resolve_amp_dtype(amp: str, device_type: str) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device_type == "cuda" else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _collate(items: list[tuple[tuple[torch.Tensor, ...], int, int]]) -> Batch:
    num_views = len(items[0][0])
    views = [torch.stack([item[0][v] for item in items]) for v in range(num_views)]
    labels = torch.tensor([item[1] for item in items], dtype=torch.long)
    indices = torch.tensor([item[2] for item in items], dtype=torch.long)
    return Batch(views=views, labels=labels, indices=indices)


def _method_defaults(method: Any) -> dict[str, Any]:
    """Every option of the method a saved ``method`` section names, at its default (empty for
    an unknown method: its keys are then compared as saved)."""
    if not isinstance(method, dict) or not isinstance(method.get("name"), str):
        return {}
    try:
        return get_method_class(method["name"]).resolved_options({"name": method["name"]})
    except ConfigError:
        return {}


def _config_differences(
    saved: dict[str, Any],
    current: dict[str, Any],
    *,
    may_differ: frozenset[tuple[str, str]] = frozenset(),
) -> list[str]:
    diffs: list[str] = []
    # A key a checkpoint lacks came later: its run had the default (e.g. model.backbone_kwargs,
    # or a method option added since: the saved method's own defaults).
    defaults = asdict(RunConfig())
    defaults["method"] = _method_defaults(saved.get("method"))
    for section in _RESUME_MUST_MATCH:
        old, new = saved.get(section), current.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            section_defaults = defaults.get(section)
            section_defaults = section_defaults if isinstance(section_defaults, dict) else {}
            for key in sorted(set(old) | set(new)):
                if (section, key) in _RESUME_MAY_DIFFER or (section, key) in may_differ:
                    continue
                was = old.get(key, section_defaults.get(key))
                now = new.get(key, section_defaults.get(key))
                group = _RESUME_INTERCHANGEABLE.get((section, key))
                if group is not None and was in group and now in group:
                    continue
                if was != now:
                    diffs.append(f"{section}.{key}: checkpoint {was!r} vs now {now!r}")
        elif old != new:
            diffs.append(f"{section}: checkpoint {old!r} vs now {new!r}")
    return diffs


class StepVerdict(NamedTuple):
    """What every rank agrees on about a step, from one all-reduce of its flags."""

    non_finite: bool  # some loss was NaN or infinite: the step is skipped (or the run stops)
    inexact: bool  # LOOK's fused search overflowed somewhere: the step is redone exactly
    without_items: bool  # the losses counted no item at all (nothing to learn from)
    stop: bool  # some rank received one of train.stop_signals: all stop after this step


def step_flags(out: StepOutput) -> torch.Tensor:
    """``[loss is non-finite, search was inexact, valid items]`` of a step's output, as a float
    tensor on its device (summed over micro-batches and ranks, then read once). The first two
    veto the step; the third is 0 only when every item of the step was left out of the loss
    (LOOK without a neighbour of the query's class: loss 0, no gradient), and is 1 for a loss
    that does not count its items."""
    non_finite = torch.isfinite(out.loss.detach()).logical_not().float()
    inexact = torch.zeros_like(non_finite) if out.inexact is None else out.inexact.float()
    items = (
        torch.ones_like(non_finite)
        if out.anchors is None
        else out.anchors.count.to(non_finite.device, non_finite.dtype)
    )
    return torch.stack([non_finite, inexact, items])


def write_memory_if_step_stands(method: Method, flag_totals: torch.Tensor) -> None:
    """Do the memory writes ``method``'s forward passes queued, on the condition, decided on the
    device, that no flag of :func:`step_flags` is set in ``flag_totals`` (summed over
    micro-batches and ranks): called once the backward pass is queued and before the flags are
    read, the write's small kernels are launched while the GPU runs the backward pass, not after
    the read on an idle GPU (2.7 ms of a 70 ms ResNet-50 step on an H100, docs/results.md), and
    a step that is then skipped or redone has written nothing. A method with nothing queued
    (CE) costs nothing."""
    if method.has_pending_memory_writes:
        method.write_pending_memory(enabled=flag_totals[:2].sum() == 0)


# Buffers a training forward pass changes in place: normalisation layers' running statistics.
_RUNNING_STATISTICS = {"running_mean", "running_var", "num_batches_tracked"}


class RunningStatistics:
    """A copy of a module's running statistics (batch norm and the like), taken before each step,
    so that a skipped (non-finite) or redone (inexact) step leaves them as if its batch had never
    been seen: a NaN batch would otherwise poison them for good, though its gradients are dropped.

    Found by buffer name, which covers torch's and timm's normalisation layers and no memory
    buffer. Copied with one multi-tensor copy per dtype (a few kernels on a GPU, not one per
    buffer).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.live = [
            buffer
            for name, buffer in module.named_buffers()
            if name.rsplit(".", 1)[-1] in _RUNNING_STATISTICS
        ]
        self.saved = [buffer.clone() for buffer in self.live]

    def save(self) -> None:
        if self.live:
            torch._foreach_copy_(self.saved, self.live)

    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.saved)


@dataclass
class _PendingTrainLog:
    """A logged step's metrics, averaged over ranks on the device and on their way to the host:
    written by the next step, whose own host read has waited for the GPU long past them, so that
    logging never makes the host wait (the GPU would then idle while the host logs and launches
    the next step's first kernels)."""

    step: int
    host_values: dict[str, float]  # what is known on the host: lr, epoch
    images_per_s: float  # for the progress bar
    names: list[str]
    values: torch.Tensor  # on the host (pinned on CUDA), complete once `ready` has completed
    ready: torch.cuda.Event | None


class _ProgressLines:
    """Progress as whole lines on stderr, for a log that is no terminal: the first logged step,
    then one every :attr:`interval_s` seconds, and the last step."""

    interval_s = 30.0

    def __init__(self, start_step: int, total_steps: int) -> None:
        self.total_steps = total_steps
        self.start_step, self.started = start_step, time.perf_counter()
        self.last_shown: float | None = None

    def show(self, step: int, loss: float, images_per_s: float) -> None:
        now = time.perf_counter()
        due = self.last_shown is None or now - self.last_shown >= self.interval_s
        if not (due or step >= self.total_steps):
            return
        self.last_shown = now
        done = step - self.start_step
        remaining = (now - self.started) / done * (self.total_steps - step) if done else 0.0
        print(
            f"look: step {step}/{self.total_steps} ({100 * step / self.total_steps:.1f} %), "
            f"loss {loss:.4f}, {images_per_s:.0f} img/s, about "
            f"{datetime.timedelta(seconds=round(remaining))} left",
            file=sys.stderr,
            flush=True,
        )


class Trainer:
    """One pre-training run in ``output_dir``; re-running it resumes from the last good checkpoint."""

    def __init__(self, cfg: RunConfig, output_dir: str | Path, *, resume: bool = True) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.device_type = resolve_device_type(cfg.train.device)
        self.device = init_distributed(self.device_type, cfg.train.ddp_timeout_s)
        self.amp_dtype = resolve_amp_dtype(cfg.train.amp, self.device_type)
        self.channels_last = cfg.train.channels_last == "true" or (
            cfg.train.channels_last == "auto" and self.device_type == "cuda"
        )
        method_cls = get_method_class(str(cfg.method.get("name")))
        self.resolved = to_dict(cfg)
        self.resolved["method"] = method_cls.resolved_options(cfg.method)
        self._progress_lines: _ProgressLines | None = None  # (fit's, in a log that is no terminal)
        # A node started with other settings (its own --set) would train another problem, or
        # hang in a collective its peers never enter: every rank stops instead, naming them.
        check_every_rank_agrees(
            "their configuration",
            _flat_settings(self.resolved),
            "Every rank of a job must get the same --config and --set (only where a node "
            "reads its data, grouping file and initial weights from, data.num_workers and "
            "train.progress may differ).",
        )

        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            if self.device_type == "cuda":
                torch.backends.cudnn.benchmark = False
        elif self.device_type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_everything(cfg.seed)

        # Every rank builds the same data and kNN monitor: each image folder split is listed
        # once (by rank 0 under torchrun), and the monitor's training split reuses the listing.
        with each_folder_listed_once():
            self.dataset, self.data_info = build_train_dataset(
                data_spec_from_config(cfg.data), num_views=method_cls.num_views, seed=cfg.seed
            )
            self.data_identity = training_data_identity(self.dataset, self.data_info)
            check_every_rank_agrees(
                "their training data (image count, classes, labels and file names)",
                self.data_identity,
                "Each node's copy of the data (data.root) and grouping file (data.labels) "
                "must hold the same images and labels.",
            )
            self.global_batch = cfg.optim.batch_size
            world = get_world_size()
            if self.global_batch > self.data_info.num_samples:
                raise ConfigError(
                    f"optim.batch_size={self.global_batch} is larger than the training set "
                    f"({self.data_info.num_samples} images); lower the batch size."
                )
            if self.global_batch % world:
                raise ConfigError(
                    f"optim.batch_size={self.global_batch} (global) is not divisible by the "
                    f"{world} ranks; pick a multiple of {world}."
                )
            self.accumulation = cfg.optim.grad_accum_steps
            if self.global_batch % (world * self.accumulation):
                raise ConfigError(
                    f"optim.batch_size={self.global_batch} (global) over {world} rank(s) is not "
                    f"divisible into optim.grad_accum_steps={self.accumulation} micro-batches; pick "
                    f"a multiple of {world * self.accumulation}."
                )
            # Images one rank passes through the model at a time.
            self.micro_batch = self.global_batch // (world * self.accumulation)
            self.knn_monitor: KnnMonitor | None = None
            if cfg.train.knn_monitor is not None:  # built now: a bad spec fails before training
                try:
                    self.knn_monitor = build_knn_monitor(
                        cfg.train.knn_monitor,
                        labels=cfg.train.knn_monitor_labels,
                        k=cfg.train.knn_monitor_k,
                        images=cfg.train.knn_monitor_images,
                        image_size=self.data_info.image_size,
                        training_data=(cfg.data.dataset, cfg.data.root),
                        corrupt_images=cfg.data.corrupt_images,
                    )
                except (ValueError, FileNotFoundError) as error:
                    raise ConfigError(
                        f"train.knn_monitor={cfg.train.knn_monitor!r}: {error}"
                    ) from error
        # A run that will resume takes its weights from the checkpoint: the initial weights'
        # file is not read (it may have moved since step 0).
        self.checkpoint_dir = self.output_dir / "checkpoints"
        resuming = resume and bool(find_checkpoint_files(self.checkpoint_dir))
        backbone, feature_dim = create_backbone(
            cfg.model.backbone,
            small_stem=cfg.model.small_stem,
            pretrained_weights=None if resuming else cfg.model.pretrained_weights,
            model_kwargs=cfg.model.backbone_kwargs,
            # Images too small for the backbone: one clear error now, before any data is read.
            image_size=self.data_info.image_size,
        )
        ctx = MethodContext(
            num_classes=self.data_info.num_classes,
            num_samples=self.data_info.num_samples,
            local_batch_size=self.micro_batch,
        )
        with warnings.catch_warnings():
            if get_rank() > 0:  # every rank builds the same method: its warnings are said once
                warnings.simplefilter("ignore")
            self.method: Method = build_method(cfg.method, backbone, feature_dim, ctx)
        self.method.to(self.device)
        self.synchronised_norms = self._synchronise_batchnorm()
        if get_rank() > 0:
            # Model and memory are built alike on every rank (one seed); from here each rank
            # draws its own dropout and drop-path masks, as it trains on its own images.
            seed_everything(rank_seed(cfg.seed, get_rank()))
        self.method.defer_exactness_check = True  # _step reads StepOutput.inexact and redoes
        self.method.caller_checks_loss = True  # _step's flags, then train.nan_policy
        # Memory writes wait for the step's verdict (_forward_backward does them after the last
        # backward, on the condition that the step stands): every micro-batch of a step then
        # sees the memory as it was before the step, and a skipped step writes none of its rows.
        self.method.defer_memory_writes = self.accumulation > 1 or cfg.train.nan_policy == "skip"
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
        self.running_statistics = RunningStatistics(self.method)
        self._lock: RunDirectoryLock | None = None  # fit's, on rank 0
        self.optimizer = build_optimizer(
            ((n, p) for n, p in self.method.named_parameters() if p.requires_grad),
            name=cfg.optim.name,
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            momentum=cfg.optim.momentum,
            exclude_bias_and_norm_from_wd=cfg.optim.exclude_bias_and_norm_from_wd,
            lars_trust_coefficient=cfg.optim.lars_trust_coefficient,
        )
        self.sampler = GlobalBatchSampler(
            self.data_info.num_samples,
            self.global_batch,
            rank=get_rank(),
            world_size=world,
            seed=cfg.seed,
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        schedule_steps = cfg.optim.epochs * self.steps_per_epoch
        self.total_steps = schedule_steps
        if cfg.train.max_steps is not None:
            self.total_steps = min(schedule_steps, cfg.train.max_steps)
        self.scheduler = build_lr_scheduler(
            self.optimizer,
            total_steps=schedule_steps,
            warmup_steps=round(cfg.optim.warmup_epochs * self.steps_per_epoch),
            min_lr_ratio=cfg.optim.min_lr_ratio,
        )
        self.scaler = torch.amp.GradScaler(
            self.device_type, enabled=self.amp_dtype == torch.float16
        )
        self.global_step = 0
        # The checkpoint a dry run's plan found (its rehearsed step runs on that model).
        self._planned_resume: tuple[dict[str, Any], Path] | None = None
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.inexact_steps_redone = 0  # this session's steps recomputed with the exact search
        # Steps whose loss counted no item (all of LOOK's queries dropped): reported per epoch.
        self.steps_without_items = 0
        self.epoch_steps_without_items = 0
        # Stopped by a signal at an epoch's end, the run saved before the kNN monitor's
        # measurement of that epoch, which the resumed run then takes first.
        self.monitor_pending = False
        self._diverging_buffers_reported: set[str] = set()
        self.logger: MetricsLogger | None = None
        # Catching nothing until fit() installs the handlers (a dry run's step included).
        self.stop_signals = StopSignals([])
        # Every loader's workers (training, warm-up, kNN monitor) leave the stop signals to this
        # process: a job scheduler signals all of a job's processes.
        self.worker_signals = signal_numbers(cfg.train.stop_signals)
        self._batch_iterator: Iterator[Batch] | None = None
        self._pending_log: _PendingTrainLog | None = None
        self.model: torch.nn.Module = self.method

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            # May be collective (a sharded memory gathers its rows): call on every rank.
            "model": self.method.checkpoint_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_per_rank": capture_rng_state_of_every_rank(),  # (a collective)
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            # (train.nan_max_consecutive_skips counts across a resume too)
            "consecutive_skips": self.consecutive_skips,
            "steps_without_items": self.steps_without_items,
            "epoch_steps_without_items": self.epoch_steps_without_items,
            "monitor_pending": self.monitor_pending,
            "epoch": self.global_step // self.steps_per_epoch,
            "step_in_epoch": self.global_step % self.steps_per_epoch,
            "global_batch_size": self.global_batch,
            "world_size": get_world_size(),
            "config": self.resolved,
            "data_identity": self.data_identity,
            "look_version": look.__version__,
        }

    @contextlib.contextmanager
    def _step_errors(
        self, stage: str, *, step: int | None = None, also: tuple[type[Exception], ...] = ()
    ) -> Iterator[None]:
        """A method's error (e.g. a memory write refused for NaN rows, reported late on an
        accelerator), or one of ``also``, as a step error that names the step (default: the
        last one counted) and the kept checkpoint."""
        try:
            yield
        except TrainingStepError:
            raise  # (already one: said once)
        except (ValueError, RuntimeError, *also) as exc:
            raise TrainingStepError(
                f"step {self.global_step if step is None else step} failed {stage}: "
                f"{error_message(exc).rstrip('.')}. {self._kept_checkpoint()}"
            ) from exc

    def _kept_checkpoint(self) -> str:
        """What a failed step leaves to resume from, for its error message."""
        newest = newest_checkpoint_file(self.checkpoint_dir)
        if newest is not None:
            return f"The last good checkpoint, {newest} in {self.checkpoint_dir}, is kept."
        return "No checkpoint had been written yet."

    def rehearse_step(self) -> dict[str, Any]:
        """One forward and backward pass of the first batch, without an optimizer step (its
        gradients and batch norm's statistics are dropped; a memory it wrote is this trainer's
        only, which a dry run then throws away): what a dry run checks beyond building, i.e.
        errors that only a step meets (an input size the backbone refuses, a batch a method
        cannot split, a search backend this machine lacks, running out of memory). After
        :meth:`plan` found a checkpoint to resume from, the step runs on that checkpoint's model
        and memory, so its loss is the resumed run's scale. Returns its loss, seconds (a first
        step: compiling and warm-up included) and the model it ran on."""
        model = "initial"
        if self._planned_resume is not None:
            state, path = self._planned_resume
            self.method.load_checkpoint_state(state["model"])
            model = f"{path.name} (step {int(state['global_step'])})"
        self.method.train()
        # (before the step, which writes its batch's rows)
        empty = [
            name
            for name, module in self.method.named_modules()
            if isinstance(module, FeatureMemory) and not bool(module.valid.any())
        ]
        batch = next(iter(self._loader(epoch=0, start_step=0)))
        batch = batch.to(self.device, channels_last=self.channels_last)
        self.running_statistics.save()
        started = time.perf_counter()
        try:
            metrics, _ = self._forward_backward(0, batch)
            loss = float(metrics["loss"])
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.running_statistics.restore()
            self.method.discard_step()
        rehearsed = {
            "loss": loss, "seconds": round(time.perf_counter() - started, 3), "model": model
        }  # fmt: skip
        if empty:
            # A fresh run's first step meets a memory without a written row: its loss (0 for
            # LOOK and NCA, which find no neighbour) is not the scale of later steps.
            rehearsed["note"] = (
                f"the step's {', '.join(empty)} held no written row yet (a fresh start), so "
                "its loss is not that of later steps"
            )
        return rehearsed

    def _warn_about_buffers_that_differ_between_ranks(self) -> None:
        """A checkpoint holds rank 0's method state: a buffer that differs between ranks (a
        method updating state from its own rank's batch alone) would resume differently on the
        other ranks. One float64 sum per buffer, gathered at checkpoint time only. Batch norm's
        running statistics (per rank without SyncBatchNorm; used only in eval mode) and a
        sharded bank's shards (different by design) are left out."""
        from look.sharded import ShardedMemoryBank

        sharded = {
            name
            for name, module in self.method.named_modules()
            if isinstance(module, ShardedMemoryBank)
        }
        names, sums = [], []
        for name, buffer in self.method.named_buffers():
            owner, _, leaf = name.rpartition(".")
            if leaf in _RUNNING_STATISTICS or owner in sharded:
                continue
            names.append(name)
            sums.append(buffer.sum(dtype=torch.float64))
        if not names:
            return
        every_rank = gather_no_grad(torch.stack(sums)[None]).cpu()  # (world, buffers)
        differing = [
            n for i, n in enumerate(names) if not bool((every_rank[:, i] == every_rank[0, i]).all())
        ]
        new = [n for n in differing if n not in self._diverging_buffers_reported]
        self._diverging_buffers_reported.update(new)
        if new and is_main_process():
            warnings.warn(
                f"method {self.method.name!r} holds buffers that differ between ranks at step "
                f"{self.global_step}: {', '.join(new)}. A checkpoint keeps rank 0's, so a resumed "
                "run will not continue as this one. Keep method state identical on every rank "
                "(update it from the batch gathered over ranks).",
                RuntimeWarning,
                stacklevel=2,
            )

    def save(self) -> None:
        # The log reaches the checkpoint's step first: a resume truncates it after that step.
        self._write_train_log()
        if is_distributed():
            self._warn_about_buffers_that_differ_between_ranks()
        # Every rank builds the state (it may be a collective); rank 0 alone writes it.
        state = self.state_dict()
        if is_main_process():
            lock = self._lock
            if lock is not None and not lock.held():
                # Removed or replaced since the job locked it: another job may be training there
                # now, and the two would write one run. (Nothing is saved over its files.)
                raise TrainingStepError(
                    f"step {self.global_step}: the run folder {self.output_dir} was removed or "
                    f"replaced while this job trained (its {lock.path.name} is not the file "
                    "this job locked), so another job may now be training there; stopped "
                    "without saving. Re-run into a folder of its own."
                )
            # A full disk or a lost mount: one line that names the step and what is kept.
            with self._step_errors("saving its checkpoint", also=(OSError,)):
                save_checkpoint(
                    self.checkpoint_dir,
                    self.global_step,
                    state,
                    keep_last=self.cfg.train.keep_checkpoints,
                )
            if self.logger is not None:
                # The CSV files and TensorBoard follow the log at every checkpoint, not only at
                # the end: a long job's curves can be watched, and a killed job keeps them.
                self.logger.flush()
        barrier()

    def _resumable_checkpoint(self) -> tuple[dict[str, Any], Path] | None:
        """The newest good checkpoint to resume from (None: a fresh start), after checking that
        it was written for this configuration."""
        if not self.resume:
            return None
        loaded = self._load_newest_checkpoint()
        if loaded is None:
            return None
        state, path = loaded
        saved_identity = state.get("data_identity")  # (checkpoints before it existed: None)
        if saved_identity is not None and saved_identity != self.data_identity:
            raise ConfigError(
                f"{self.output_dir} holds a run trained on other data (checkpoint {path.name}: "
                f"{_describe_identity(saved_identity)}; now {_describe_identity(self.data_identity)}"
                "): images were added, removed, renamed or relabelled, and the checkpoint's memory "
                "and sampler positions index the old list. Restore the data, or use a new "
                "--output directory (--no-resume starts over there)."
            )
        # The same data read from elsewhere (a copy on a node's local disk, a grouping file at
        # another path) may resume: the identity above vouches for it.
        diffs = _config_differences(
            state["config"],
            self.resolved,
            may_differ=_DATA_LOCATION if saved_identity is not None else frozenset(),
        )
        if diffs:
            raise ConfigError(
                f"{self.output_dir} holds a run with a different configuration (checkpoint "
                f"{path.name}): " + "; ".join(diffs) + ". Use a new --output directory, or "
                "--no-resume to start over there."
            )
        changed = []
        warn_if_changed = list(_RESUME_WARN_IF_CHANGED)
        if type(self.method).loss_couples_batch_items:  # then micro-batches change the loss
            warn_if_changed.append(("optim", "grad_accum_steps"))
        for section, key in warn_if_changed:
            was = (state["config"].get(section) or {}).get(key)  # None: saved before the key
            now = self.resolved[section][key]
            if was is not None and was != now:
                changed.append(f"{section}.{key}: checkpoint {was!r} vs now {now!r}")
        if changed and is_main_process():
            warnings.warn(
                f"resuming {self.output_dir} with " + "; ".join(changed) + ": from here on the "
                "run computes its steps differently, so its curve is not the uninterrupted "
                "run's",
                RuntimeWarning,
                stacklevel=2,
            )
        if state["global_batch_size"] != self.global_batch:
            raise ConfigError("the global batch size changed since the checkpoint")
        self._check_state_layout(state["model"], path)
        return state, path

    def _load_newest_checkpoint(self) -> tuple[dict[str, Any], Path] | None:
        """The newest good checkpoint, the same file on every rank: rank 0 picks it and every
        other rank loads that file (a rank with a stale view of a shared file system would
        otherwise resume from another step, and the ranks would train on mismatched states
        until a collective timed out). A rank that cannot read it stops every rank, named."""
        if not is_distributed():
            return load_latest_checkpoint(self.checkpoint_dir, map_location=self.device)
        loaded = None
        choice: list[Any] = [None]  # rank 0's: ("file", name), ("none",) or ("error", message)
        if is_main_process():
            try:
                loaded = load_latest_checkpoint(self.checkpoint_dir, map_location=self.device)
                choice = [("none",) if loaded is None else ("file", loaded[1].name)]
            except CheckpointCorruptError as error:
                choice = [("error", str(error))]
        torch.distributed.broadcast_object_list(choice, src=0)
        kind, *detail = choice[0]
        if kind == "error":
            raise CheckpointCorruptError(detail[0])
        problem = None
        if kind == "file" and not is_main_process():
            path = self.checkpoint_dir / detail[0]
            try:
                loaded = load_checkpoint(path, map_location=self.device), path
            except (CheckpointCorruptError, OSError) as error:
                problem = (
                    f"rank {get_rank()} cannot read {path}, which rank 0 resumes from: {error}"
                )
        problems: list[Any] = [None] * get_world_size()
        torch.distributed.all_gather_object(problems, problem)
        failed = [message for message in problems if message is not None]
        if failed:
            raise CheckpointCorruptError("; ".join(failed))
        return loaded

    def _check_state_layout(self, saved: dict[str, Any], path: Path) -> None:
        """Refuse, before anything is loaded (and in a dry run), a checkpoint whose method state
        has other entries or shapes than this method's: its code changed since the run began.
        The memory's rows are checked by the memory itself (a sharded bank stores them whole)."""
        own = {
            k: tuple(v.shape)
            for k, v in self.method.state_dict().items()
            if not k.startswith("memory.")
        }
        theirs = {
            k: tuple(v.shape)
            for k, v in saved.items()
            if isinstance(v, torch.Tensor) and not k.startswith("memory.")
        }
        problems = [f"missing {k}" for k in own if k not in theirs]
        problems += [f"unexpected {k}" for k in theirs if k not in own]
        problems += [
            f"{k} has shape {theirs[k]}, the method's is {shape}"
            for k, shape in own.items()
            if k in theirs and theirs[k] != shape
        ]
        if problems:
            shown = "; ".join(problems[:5]) + (
                f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            )
            raise ConfigError(
                f"{self.output_dir}'s checkpoint {path.name} does not fit method "
                f"{self.method.name!r} as its code is now ({shown}): was the method changed "
                "since the run began? Restore that code, or use a new --output directory "
                "(--no-resume starts over there)."
            )

    def _synchronise_batchnorm(self) -> int:
        """With ``train.sync_batchnorm`` under several ranks, every batch-norm layer of the
        method (backbone, head, momentum encoder) becomes a ``SyncBatchNorm`` sharing its
        parameters and buffers; returns how many. One process already normalises over its whole
        batch, so nothing changes there."""
        if not self.cfg.train.sync_batchnorm or get_world_size() == 1:
            return 0
        conflict = self.method.sync_batchnorm_conflict()
        if conflict is not None:
            raise ConfigError(f"train.sync_batchnorm=true: {conflict}")
        if self.device.type != "cuda":
            raise ConfigError(
                f"train.sync_batchnorm=true needs CUDA devices: torch's SyncBatchNorm has no "
                f"{self.device.type} implementation. Set train.sync_batchnorm=false (each rank "
                "then normalises its own share of the batch)"
            )
        return synchronise_batchnorm(self.method)

    def plan(self) -> dict[str, Any]:
        """What :meth:`fit` would do, for a dry run: data, model, method, memory, schedule and
        where it would start. Everything is built and checked; nothing is trained or written."""
        resumable = self._planned_resume = self._resumable_checkpoint()
        parameters = sum(p.numel() for p in self.method.parameters() if p.requires_grad)
        memory = getattr(self.method, "memory", None)
        return {
            "data": describe(data_spec_from_config(self.cfg.data)).removeprefix("data: "),
            "train_images": self.data_info.num_samples,
            "classes": self.data_info.num_classes,
            "backbone": self.cfg.model.backbone,
            "pretrained_weights": self._pretrained_weights()
            or ("held by the checkpoint" if resumable else "none (random initialisation)"),
            "trainable_parameters": parameters,
            # The options the method runs with (LOOK's k as derived from k_fraction, say).
            "method": {"name": self.resolved["method"]["name"], **asdict(self.method.options)},
            "memory": None if memory is None else repr(memory),
            "device": str(self.device),
            "amp": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "none",
            "world_size": get_world_size(),
            "global_batch": self.global_batch,
            "micro_batches_per_step": self.accumulation,
            "batch_norm": (
                f"synchronised over the ranks ({self.synchronised_norms} layers)"
                if self.synchronised_norms
                else "per rank"
                if get_world_size() > 1
                else "per process"
            ),
            "images_per_forward_per_rank": self.micro_batch,
            "knn_monitor": None if self.knn_monitor is None else self.knn_monitor.description,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "starts_at": (
                "step 0 (fresh run)"
                if resumable is None
                else f"step {int(resumable[0]['global_step'])} ({resumable[1].name})"
                + (
                    ": finished, nothing to train"
                    if int(resumable[0]["global_step"]) >= self.total_steps
                    else ""
                )
            ),
        }

    def check_images(self) -> tuple[int, list[UnreadableImage]]:
        """Decode every training image once, each rank a share, before training.

        Returns (files decoded, the unreadable files), the same on every rank. With
        ``data.corrupt_images='fail'`` any unreadable file raises :class:`CorruptImageError`
        naming them all, so a run (or a dry run) stops before its first step, not hours into it.
        """
        share = (get_rank(), get_world_size())
        roots: list[Any] = [self.cfg.data.root]
        if is_distributed():
            roots = [None] * get_world_size()
            torch.distributed.all_gather_object(roots, self.cfg.data.root)
        own_copies = len({str(root) for root in roots}) > 1
        if own_copies:  # a node reads its own copy: its ranks check every file of it
            local = (
                int(os.environ.get("LOCAL_RANK", "0")),
                int(os.environ.get("LOCAL_WORLD_SIZE", "0")),
            )
            # (without torchrun's LOCAL_WORLD_SIZE, every rank checks every file)
            share = local if 0 <= local[0] < local[1] else (0, 1)
        checked, unreadable = find_unreadable_images(
            self.dataset.source,
            num_workers=self.cfg.data.num_workers,
            progress=self._show_progress(),
            share=share,
        )
        paths = self.dataset.source.file_paths or ()
        # By image index: each node's paths start with its own data.root.
        found = {image.index: image for image in unreadable}
        if is_distributed():
            shares: list[Any] = [None] * get_world_size()
            torch.distributed.all_gather_object(shares, (checked, found))
            checked = len(paths) if own_copies else sum(count for count, _ in shares)
            found = {}
            for _, images in shares:
                for index, image in images.items():
                    found.setdefault(index, image)
        # The same order for any number of ranks; reported here once, the loader then
        # replaces them without warning again.
        unreadable = [found[index] for index in sorted(found)]
        self.dataset.source.record_unreadable([paths[index] for index in sorted(found)])
        if len(unreadable) > 10 and is_main_process():  # the messages below name 10
            for image in unreadable:
                print(
                    f"look: unreadable training image {image.path} ({image.error})", file=sys.stderr
                )
        if found:  # whatever the policy: skip would have no image to put in their place
            labels = self.dataset.source.labels
            marked = torch.zeros(len(labels), dtype=torch.bool)
            marked[sorted(found)] = True
            total = torch.bincount(labels, minlength=len(self.dataset.source.class_names))
            lost = torch.bincount(labels[marked], minlength=len(total))
            dead = [
                self.dataset.source.class_names[c]
                for c in range(len(total))
                if total[c] > 0 and lost[c] == total[c]
            ]
            if dead:
                raise CorruptImageError(
                    f"no training image of class(es) {', '.join(map(repr, dead))} can be "
                    f"decoded ({len(unreadable)} unreadable files in all, e.g. "
                    f"{unreadable[0].path}: {unreadable[0].error}); the run could not train on "
                    "them, even with data.corrupt_images=skip. Replace the files (Git LFS "
                    "pointers instead of images?) or remove the class folders."
                )
        if unreadable and self.cfg.data.corrupt_images == "fail":
            shown = "; ".join(f"{image.path} ({image.error})" for image in unreadable[:10])
            more = (
                f" and {len(unreadable) - 10} more (every one is listed above)"
                if len(unreadable) > 10
                else ""
            )
            raise CorruptImageError(
                f"{len(unreadable)} of {checked} training images cannot be decoded: {shown}{more}. "
                "Remove or replace them, or set data.corrupt_images=skip to replace each by "
                "another image of its class."
            )
        return checked, unreadable

    def _try_resume(self) -> bool:
        resumable = self._resumable_checkpoint()
        if resumable is None:
            return False
        state, path = resumable
        self.method.load_checkpoint_state(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        # Each rank its own generators; with another number of ranks (or a checkpoint from
        # before per-rank states), rank 0's: that run's per-rank batches differ anyway.
        restore_rng_state_of_this_rank(state.get("rng_per_rank") or [state["rng"]])
        self.global_step = int(state["global_step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_skips = int(state.get("consecutive_skips", 0))
        self.steps_without_items = int(state.get("steps_without_items", 0))
        self.epoch_steps_without_items = int(state.get("epoch_steps_without_items", 0))
        self.monitor_pending = bool(state.get("monitor_pending", False))
        if is_main_process():
            print(f"look: resuming {self.output_dir} from {path.name} (step {self.global_step})")
        return True

    # -- loop --------------------------------------------------------------------------------
    def _loader(self, epoch: int, start_step: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.sampler.set_start_step(start_step)
        self.dataset.set_epoch(epoch)
        workers = self.cfg.data.num_workers
        # Its own generator: an iterator without one draws its workers' base seed from torch's
        # global generator, and a run resumed mid-epoch creates one iterator more than an
        # uninterrupted run, shifting every later global draw (MoCo's shuffled batch norm,
        # dropout). The workers' seeds matter to nothing: augmentations are seeded per image.
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device_type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
            generator=generator,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)

    def _warmup_memory(self) -> None:
        """One no-grad pass that writes every row, for methods configured to start from a full
        memory (LOOK's ``memory_init: warmup``). It runs in training mode, as the steps that
        read the rows will, and leaves no other trace: batch norm's running statistics are put
        back as they were (the kNN monitor's starting point is the initial model's)."""
        self.method.train()
        statistics = RunningStatistics(self.method)
        # Kept where fit's exit ends it: a stopped warm-up must not leave its workers behind.
        self._batch_iterator = start_workers(
            self._loader(epoch=0, start_step=0), self.worker_signals
        )
        warmup = tqdm(  # (disable=None: on a terminal only)
            self._batch_iterator,
            desc="memory warm-up",
            disable=None if self._show_progress() else True,
        )
        for batch in warmup:
            for micro_batch in batch.split(self.micro_batch):  # the memory's rows per rank
                with self._autocast():
                    self.method.warmup_step(
                        micro_batch.to(self.device, channels_last=self.channels_last)
                    )
            # A whole pass over the data (ImageNet: 1.28M forwards) outlasts a scheduler's
            # grace period: a stop signal ends it after the batch in progress, on every rank
            # (nothing is saved: the re-run warms up again).
            stop = torch.ones(1) if self.stop_signals.received else torch.zeros(1)
            if is_distributed():
                stop = all_reduce_sum(stop.to(self.device)).cpu()
            if stop.item() > 0:
                warmup.close()
                self._end_loader_workers()
                raise self._stopped()
        self._batch_iterator = None
        statistics.restore()

    def _measure_transfer(self, epochs_trained: int) -> None:
        """The kNN monitor's accuracy of the current backbone, logged as the ``monitor`` split
        (a collective under DDP: every rank extracts a shard)."""
        if self.knn_monitor is None:
            return
        start = time.perf_counter()
        # The model a checkpoint holds: rank 0's running statistics (without sync_batchnorm the
        # other ranks' follow their own images; training itself never reads them).
        broadcast_buffers_from_rank_0(self.method.backbone)
        with self._step_errors("measuring the kNN monitor"):
            values: dict[str, Any] = self.knn_monitor.measure(
                self.method.backbone,
                device=self.device,
                autocast_dtype=self.amp_dtype,
                batch_size=max(self.micro_batch, 64),
                num_workers=self.cfg.data.num_workers,
                worker_signals=self.worker_signals,
            )
        values.update(epochs_trained=epochs_trained, knn_seconds=time.perf_counter() - start)
        assert self.logger is not None
        self.logger.log(self.global_step, values, split="monitor")

    def _show_progress(self) -> bool:
        return self.cfg.train.progress and is_main_process()

    def _batches(self) -> Iterator[tuple[int, Batch]]:
        while self.global_step < self.total_steps:
            epoch = self.global_step // self.steps_per_epoch
            self._batch_iterator = start_workers(
                self._loader(epoch, self.global_step % self.steps_per_epoch), self.worker_signals
            )
            for batch in self._batch_iterator:
                yield epoch, batch
                if self.global_step >= self.total_steps:
                    return

    def _stopped(self) -> TrainingStopped:
        """The stop every rank agreed on (from this rank's signal or another's), at this step."""
        return TrainingStopped(
            self.stop_signals.received or "a signal another rank received",
            self.global_step,
            self.total_steps,
            str(self.checkpoint_dir),
        )

    def _end_loader_workers(self) -> None:
        """Shut the training loader's workers down now (:func:`end_workers`)."""
        iterator, self._batch_iterator = self._batch_iterator, None
        end_workers(iterator)

    def _logs_step(self, step: int) -> bool:
        """Whether the metrics of step ``step`` (counted from 1) are logged."""
        return step % self.cfg.train.log_every_steps == 0 or step == self.total_steps

    def _queue_train_log(
        self, metrics: dict[str, torch.Tensor], epoch: int, images_per_s: float, lr: float
    ) -> None:
        """Average the step's metrics over ranks (a collective) and start copying them to the
        host; :meth:`_write_train_log` logs them."""
        names = sorted(metrics)
        stacked = torch.stack([metrics[n].detach().float().reshape(()) for n in names])
        stacked = all_reduce_sum(stacked) / get_world_size()
        ready = None
        if stacked.device.type == "cuda":
            values = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            values.copy_(stacked, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(stacked.device))
        else:
            values = stacked.to("cpu")
        host_values = {"lr": lr, "epoch": epoch}
        self._pending_log = _PendingTrainLog(
            self.global_step, host_values, images_per_s, names, values, ready
        )

    def _write_train_log(self, progress: tqdm | None = None) -> None:
        """Log the queued step's metrics, if any (before the next step's, an epoch's line and
        every checkpoint, so that the log stays in step order and a resume finds it complete)."""
        pending, self._pending_log = self._pending_log, None
        if pending is None:
            return
        if pending.ready is not None:
            pending.ready.synchronize()  # normally long done: no wait
        values: dict[str, Any] = dict(zip(pending.names, pending.values.tolist(), strict=True))
        values.update(pending.host_values)
        assert self.logger is not None
        self.logger.log(pending.step, values)
        if progress is not None:
            progress.set_postfix(
                loss=f"{values['loss']:.4f}", img_s=f"{pending.images_per_s:.0f}", refresh=False
            )
        if self._progress_lines is not None:
            self._progress_lines.show(pending.step, values["loss"], pending.images_per_s)

    def _forward(self, epoch: int, batch: Batch) -> StepOutput:
        try:
            with self._autocast():
                out = self.model(batch)
        # (AssertionError: a backbone's own input checks, e.g. a ViT given another image size)
        except (ValueError, RuntimeError, AssertionError) as exc:
            hint = ""
            if "finished reduction in the prior iteration" in str(exc):
                # DDP waited for gradients of parameters the previous step's loss did not use.
                hint = (
                    f" Method {self.method.name!r} left parameters without a gradient; set "
                    "its class attribute ddp_find_unused_parameters = True."
                )
            elif "Expected more than 1 value per channel when training" in str(exc):
                # torch's batch norm given one image: say which settings gave it one.
                hint = (
                    f" Each forward pass gets {self.micro_batch} image(s) per rank "
                    f"(optim.batch_size={self.cfg.optim.batch_size} over {get_world_size()} "
                    f"rank(s) and optim.grad_accum_steps={self.accumulation}), and batch norm "
                    "needs 2 or more in training: use a larger batch, fewer micro-batches, or a "
                    "model without it (e.g. method.head_batch_norm=false)."
                )
            raise TrainingStepError(
                f"step {self.global_step + 1} (epoch {epoch}, first dataset indices "
                f"{batch.indices[:8].tolist()}) failed: {str(exc).rstrip('.')}.{hint} "
                + self._kept_checkpoint()
            ) from exc
        problem = step_output_problem(out)
        if problem is not None:
            raise TrainingStepError(
                f"method {self.method.name!r} {problem}. Its forward must return "
                "StepOutput(loss=<0-d float tensor with grad>, metrics={'loss': ..., <tensors>})."
            )
        return out

    def _forward_backward(
        self, epoch: int, batch: Batch
    ) -> tuple[dict[str, torch.Tensor], StepVerdict]:
        """Forward and backward of every micro-batch (gradients summed), then one host read,
        agreed over ranks so that every rank acts alike, of whether any loss was non-finite,
        whether any step was inexact, whether the losses counted no item at all and whether any
        rank was asked to stop. Read after the backward is queued, the wait keeps the GPU busy
        instead of leaving it idle while the host launches the backward's first, small kernels.
        Returns the metrics, averaged over the micro-batches, and the verdict.

        Micro-batches' losses that report their :class:`StepOutput.anchors` are weighted by
        them: the step's gradient and logged loss are those of the mean over all of its valid
        items, as in one batch (LOOK drops queries without a neighbour of their class, so its
        micro-batches average over different numbers). Other losses weigh the same."""
        self.optimizer.zero_grad(set_to_none=True)
        micro_batches = batch.split(self.micro_batch)
        outputs: list[StepOutput] = []
        weights: list[torch.Tensor] = []
        flags = []
        # DDP all-reduces the gradients once, in the last micro-batch's backward.
        no_sync = getattr(self.model, "no_sync", None)
        for position, micro_batch in enumerate(micro_batches):
            last = position == len(micro_batches) - 1
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                out = self._forward(epoch, micro_batch)
                if len(micro_batches) == 1:
                    scaled = out.loss
                elif out.anchors is not None:
                    # The share of valid items (1 with none dropped): the gradients are divided
                    # by the shares' sum once all micro-batches are done.
                    weights.append(out.anchors.count.to(out.loss.dtype) / out.anchors.total)
                    scaled = out.loss * weights[-1]
                else:
                    scaled = out.loss / len(micro_batches)
                self.scaler.scale(scaled).backward()
            flags.append(step_flags(out))
            outputs.append(out)
        metrics = outputs[0].metrics
        if len(outputs) > 1:
            metrics = {
                name: torch.stack([out.metrics[name].detach().float() for out in outputs]).mean()
                for name in metrics
            }
        if weights:
            if len(weights) != len(outputs):
                raise RuntimeError(
                    "a method reported StepOutput.anchors for some micro-batches only"
                )
            shares = torch.stack(weights)
            total_weight = shares.sum()
            # With no valid item in the whole step every loss and gradient is an exact zero.
            divisor = torch.where(total_weight > 0, total_weight, 1.0)
            gradients = [p.grad for p in self.method.parameters() if p.grad is not None]
            torch._foreach_div_(gradients, divisor)
            losses = torch.stack([out.loss.detach().float() for out in outputs])
            metrics["loss"] = (losses * shares.float()).sum() / divisor
            # The metrics that are means over the same items, as in one batch too.
            for name in outputs[0].anchor_metrics:
                if name in metrics:
                    means = torch.stack([out.metrics[name].detach().float() for out in outputs])
                    metrics[name] = (means * shares.float()).sum() / divisor
        local = torch.stack(flags).sum(dim=0)
        # A fill, not a copy from the host: a step without a signal costs no transfer.
        stop = local.new_ones(1) if self.stop_signals.received else local.new_zeros(1)
        flag_totals = all_reduce_sum(torch.cat([local, stop]))
        with self._step_errors("writing the memory", step=self.global_step + 1):
            write_memory_if_step_stands(self.method, flag_totals)
        totals = flag_totals.tolist()
        return metrics, StepVerdict(totals[0] > 0, totals[1] > 0, totals[2] == 0, totals[3] > 0)

    def _step(self, epoch: int, batch: Batch) -> tuple[dict[str, torch.Tensor] | None, bool]:
        """One optimizer step (or a skipped one: None for its metrics) and whether every rank is
        to stop after it (a stop signal)."""
        batch = batch.to(self.device, channels_last=self.channels_last)
        self.running_statistics.save()
        metrics, verdict = self._forward_backward(epoch, batch)
        if verdict.inexact:
            # Rare: LOOK's fused search overflowed (many near-identical memory rows). The step is
            # recomputed with the exact search on every rank (its gradients replace these).
            self.running_statistics.restore()
            with self.method.exact_redo():
                metrics, redone = self._forward_backward(epoch, batch)
            verdict = redone._replace(stop=verdict.stop or redone.stop)
            self.inexact_steps_redone += 1
        non_finite, without_items = verdict.non_finite, verdict.without_items
        if non_finite:
            message = (
                f"non-finite loss at step {self.global_step + 1} (epoch {epoch}, first dataset "
                f"indices {batch.indices[:8].tolist()})"
            )
            self.consecutive_skips += 1
            limit = self.cfg.train.nan_max_consecutive_skips
            if self.cfg.train.nan_policy == "stop" or self.consecutive_skips > limit:
                reason = (
                    ""
                    if self.cfg.train.nan_policy == "stop"
                    else f" ({self.consecutive_skips} in a row, more than train.nan_max_consecutive_skips={limit})"
                )
                advice = (
                    "Lower optim.lr or enable optim.grad_clip"
                    if self.cfg.train.nan_policy == "skip"
                    else "Lower optim.lr, enable optim.grad_clip, or set train.nan_policy=skip"
                )
                raise TrainingStepError(
                    message + f"{reason}; stopping. {self._kept_checkpoint()} {advice}."
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.running_statistics.restore()
            self.skipped_steps += 1
            return None, verdict.stop
        self.consecutive_skips = 0
        if without_items:
            self.steps_without_items += 1
            self.epoch_steps_without_items += 1
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.method.parameters() if p.requires_grad], self.cfg.optim.grad_clip
            )
            metrics["grad_norm"] = grad_norm.detach()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return metrics, verdict.stop

    def _warn_about_steps_without_items(self, epoch: int) -> None:
        """Say when many of an epoch's steps learnt nothing because their loss counted no item:
        a loss of exactly 0 must not pass for a converged run. (A memory that starts unwritten
        empties the first step: one step alone is not reported.)"""
        empty, self.epoch_steps_without_items = self.epoch_steps_without_items, 0
        if empty > 1 and empty >= 0.1 * self.steps_per_epoch and is_main_process():
            warnings.warn(
                f"epoch {epoch}: {empty} of {self.steps_per_epoch} steps had no item the loss "
                "could use (for LOOK: no query had a neighbour of its own class among its k), "
                "so they trained on a loss of 0 with no gradient. Raise method.k, use "
                "method.no_positive=nearest, or check the labels (classes of one image each?)",
                RuntimeWarning,
                stacklevel=2,
            )

    def _finish_step(self, *, skipped: bool) -> None:
        """The method's momentum updates (and any memory write still queued) after the optimizer
        step; a skipped step's are dropped instead, so that its batch leaves no trace at all."""
        with self._step_errors("after the optimizer step"):
            if skipped:
                self.method.discard_step()
            else:
                self.method.after_optimizer_step(self.global_step / self.total_steps)

    def fit(self) -> TrainResult:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        lock = self._lock = RunDirectoryLock(self.output_dir)
        busy = None
        if is_main_process():
            try:
                lock.acquire()
            except RunDirectoryBusyError as error:
                busy = str(error)
        if is_distributed():  # every rank stops, not rank 0 alone
            message = [busy]
            torch.distributed.broadcast_object_list(message, src=0)
            busy = message[0]
        if busy is not None:
            raise RunDirectoryBusyError(busy)
        if is_main_process():  # the lock's holder is the only writer: no save is in progress
            remove_leftover_temp_files(self.checkpoint_dir)
        try:
            with StopSignals(self.cfg.train.stop_signals) as self.stop_signals:
                return self._fit()
        finally:
            # On an error too: the loader's workers ignore SIGTERM, and a process holding
            # live workers could not exit (multiprocessing waits for them).
            self._end_loader_workers()
            self.stop_signals = StopSignals([])
            lock.release()

    @property
    def derived_method_options(self) -> dict[str, Any]:
        """The method's options that it set from the data, not as configured: LOOK's ``k`` from
        ``k_fraction`` (config.yaml keeps the options as given, which a resume compares)."""
        configured = self.resolved["method"]
        return {
            key: value
            for key, value in asdict(self.method.options).items()
            if key in configured and configured[key] != value
        }

    def _pretrained_weights(self) -> str | None:
        """What ``model.pretrained_weights`` loaded, in one line (None: none given)."""
        return getattr(self.method.backbone, "pretrained_weights_summary", None)

    def _fit(self) -> TrainResult:
        resumed = self._try_resume()
        if not resumed and self._pretrained_weights() and is_main_process():
            print(f"look: {self._pretrained_weights()}")
        self.logger = MetricsLogger(
            self.output_dir, tensorboard=self.cfg.train.tensorboard, enabled=is_main_process()
        )
        session_start_step = self.global_step
        # A fresh start replaces an old run's curve; a resumed run's goes on from its step.
        self.logger.truncate_after(self.global_step if resumed else -1)
        if is_main_process():
            if not resumed:
                # --no-resume: the old run's checkpoints go too, or a later plain re-run of
                # this command would resume that run under this one's log and config.
                discarded = discard_checkpoints(self.checkpoint_dir)
                if discarded:
                    print(
                        f"look: starting over in {self.output_dir}: removed the {discarded} "
                        "checkpoint(s) of the run it held"
                    )
            # What the run trains with from here on (a resume may change the train section,
            # speed settings and where the data is).
            derived = ", ".join(f"method.{k}={v}" for k, v in self.derived_method_options.items())
            if derived and not resumed:
                print(f"look: the method derived from the data: {derived}")
            header = f"# derived from the data at the start: {derived}\n" if derived else ""
            save_yaml(self.resolved, self.output_dir / "config.yaml", header=header)
            if self.global_step < self.total_steps:
                # Not finished until it has trained the rest: a job script (or the demo, which
                # skips a run with a summary) must not read an older session's marks of a
                # finished run as this one's, while it runs or if it stops.
                (self.output_dir / "summary.json").unlink(missing_ok=True)
                (self.output_dir / "backbone.safetensors").unlink(missing_ok=True)
        if resumed:
            if self.monitor_pending:
                self._measure_transfer(epochs_trained=self.global_step // self.steps_per_epoch)
                self.monitor_pending = False
        else:
            if self.method.needs_warmup_pass:
                self._warmup_memory()
            self._measure_transfer(epochs_trained=0)  # the starting point of the curve
        if is_distributed():
            self.model = wrap_ddp(
                self.method,
                self.device,
                find_unused_parameters=type(self.method).ddp_find_unused_parameters,
            )
        if self.cfg.train.compile:
            self.method.backbone.compile()
        self.method.train()

        epoch_seconds: list[float] = []
        # A batch job's log (SLURM's .out file) is no terminal: a bar redrawn with carriage
        # returns would be one endless line there, so it gets a line of its own now and then.
        if self._show_progress() and not sys.stderr.isatty():
            self._progress_lines = _ProgressLines(self.global_step, self.total_steps)
        progress = tqdm(
            total=self.total_steps,
            initial=self.global_step,
            desc=f"pretrain {self.resolved['method']['name']}",
            unit="step",
            disable=not self._show_progress() or self._progress_lines is not None,
            dynamic_ncols=True,
        )
        epoch_start = time.perf_counter()
        window_start, window_images = time.perf_counter(), 0
        current_epoch = self.global_step // self.steps_per_epoch
        stop = False
        for epoch, batch in self._batches():
            # Only the steps that are logged compute the methods' diagnostics.
            self.method.wants_metrics = self._logs_step(self.global_step + 1)
            step_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step trains with
            metrics, stop = self._step(epoch, batch)
            self._write_train_log(progress)  # the previous logged step's: on the host by now
            self.scheduler.step()
            self.global_step += 1
            self._finish_step(skipped=metrics is None)
            window_images += self.global_batch
            progress.update(1)
            if metrics is not None and self._logs_step(self.global_step):
                elapsed = time.perf_counter() - window_start
                self._queue_train_log(metrics, epoch, window_images / max(elapsed, 1e-9), step_lr)
                window_start, window_images = time.perf_counter(), 0
            epoch_done = self.global_step % self.steps_per_epoch == 0
            stop = stop and self.global_step < self.total_steps  # the last step just finishes
            if epoch_done:
                self._write_train_log(progress)
                seconds = time.perf_counter() - epoch_start
                epoch_seconds.append(seconds)
                self.logger.log(
                    self.global_step,
                    {
                        "epoch": epoch,
                        "epoch_seconds": seconds,
                        "steps_without_items": self.epoch_steps_without_items,
                    },
                    split="epoch",
                )
                self._warn_about_steps_without_items(epoch)
                if stop:
                    # The scheduler's grace period is for saving: the resumed run measures it.
                    self.monitor_pending = self.knn_monitor is not None
                else:
                    monitor_start = time.perf_counter()
                    self._measure_transfer(epochs_trained=epoch + 1)
                    window_start += time.perf_counter() - monitor_start  # not training time
                epoch_start = time.perf_counter()
                current_epoch = epoch + 1
            if (
                self.global_step % self.cfg.train.checkpoint_every_steps == 0
                or epoch_done
                or self.global_step == self.total_steps
                or stop
            ):
                with self._step_errors("saving the checkpoint"):
                    self.save()
            if stop:
                break
        self._write_train_log(progress)
        progress.close()
        if stop:
            self._end_loader_workers()
            # No summary.json and no exported backbone: both say a run is finished.
            self.logger.close()
            barrier()
            raise self._stopped()
        self.method.wants_metrics = True  # for whoever calls the method after training
        if self.global_step == 0 or not self.checkpoint_dir.exists():
            self.save()
        result = TrainResult(
            output_dir=self.output_dir,
            global_step=self.global_step,
            epochs_completed=current_epoch,
            epoch_seconds=epoch_seconds,
            skipped_steps=self.skipped_steps,
        )
        # A finished run run again trains nothing: its summary (with the timings of the session
        # that trained) and backbone stay as they are.
        finished_before = (
            self.global_step == session_start_step and (self.output_dir / "summary.json").is_file()
        )
        if self.cfg.train.export_backbone and is_main_process():
            result.backbone_path = self.output_dir / "backbone.safetensors"
        if result.backbone_path is not None and not (
            finished_before and result.backbone_path.is_file()
        ):
            export_backbone(
                self.method.backbone,
                self.cfg.model.backbone,
                str(result.backbone_path),
                small_stem=self.cfg.model.small_stem,
                model_kwargs=self.cfg.model.backbone_kwargs,
                extra_metadata=export_metadata(self.resolved, global_step=self.global_step),
            )
        # Unreadable images replaced this session (data.corrupt_images=skip), found by any
        # rank's loader (each rank reads its own images: a collective).
        replaced: list[str] = list(self.dataset.source.skipped_files)
        if is_distributed():
            found: list[Any] = [None] * get_world_size()
            torch.distributed.all_gather_object(found, replaced)
            replaced = sorted({path for paths in found for path in paths})
        if is_main_process() and not finished_before:
            summary = {
                "global_step": self.global_step,
                "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "epoch_seconds_this_session": epoch_seconds,
                "skipped_steps": self.skipped_steps,
                "steps_without_items": self.steps_without_items,
                "inexact_steps_redone_this_session": self.inexact_steps_redone,
                "world_size": get_world_size(),
                "device": str(self.device),
                "num_samples": self.data_info.num_samples,
                "num_classes": self.data_info.num_classes,
                "derived_method_options": self.derived_method_options,
                "unreadable_images_replaced_this_session": len(replaced),
                "unreadable_images_replaced_examples": replaced[:20],
            }
            atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2))
        self.logger.close()
        barrier()
        return result


def pretrain(
    cfg: RunConfig, output_dir: str | Path, *, resume: bool = True, check_images: bool = False
) -> TrainResult:
    """Pre-train as configured, writing config, metrics, checkpoints and the backbone to
    ``output_dir``; an existing run there is resumed from its last good checkpoint.

    ``check_images`` decodes every training image first (:meth:`Trainer.check_images`).
    """
    trainer = Trainer(cfg, output_dir, resume=resume)
    if check_images:
        checked, unreadable = trainer.check_images()  # raises with corrupt_images='fail'
        if unreadable and is_main_process():
            warnings.warn(
                f"{len(unreadable)} of {checked} training images cannot be decoded; each is "
                f"replaced by another image of its class (data.corrupt_images=skip): "
                + ", ".join(image.path for image in unreadable[:10])
                + (" … (every one is listed above)" if len(unreadable) > 10 else ""),
                RuntimeWarning,
                stacklevel=2,
            )
    return trainer.fit()
