"""Fine-tuning of the whole network: backbone + a new linear classifier, a few epochs of SGD.

The recipe depends on the image size (see :func:`default_finetune_recipe`): SGD with momentum 0.9,
a cosine learning-rate schedule without warm-up, weight decay on weights but not on biases and
norm parameters, and the training augmentation of :mod:`look.data` for the image size. Under
``torch.distributed`` the model is wrapped in DDP and every rank takes its slice of the same global
batches (:class:`look.engine.sampler.GlobalBatchSampler`); test predictions are gathered without
padded duplicates.

With a ``checkpoint_dir`` (``look evaluate`` gives ``OUTPUT/finetune_checkpoints``) the state is
saved after every epoch (model, optimizer, schedule, every rank's random generators) and a
re-run resumes from the last finished epoch, with the same result as an uninterrupted fine-tuning;
a checkpoint of another model, dataset or recipe is left aside with a warning. With
``stop_signals`` too (``look evaluate``: SIGTERM and SIGUSR1, what a cluster sends before it takes
the machine back; see :mod:`look.engine.stop_signals`) a signal to any rank makes every rank
finish the step in progress; that step is saved and :class:`TrainingStopped` raised, and a re-run
resumes mid-epoch, again with the uninterrupted result. A re-run with another number of processes
resumes too, with a warning: every rank then continues from rank 0's generators (as a
pre-training checkpoint does), so random draws such as dropout do not continue as they would
have; the data order and the augmentation (seeded per image) are unaffected. The folder is
removed once the test accuracy is computed.

Fine-tuning draws from generators of its own, seeded from ``seed`` (the classifier's
initialisation alike on every rank, dropout and the like from each rank's own seed), and leaves
the caller's torch generators as they were.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from look.data import (
    DataSpec,
    build_eval_dataset,
    build_train_dataset,
    describe,
    resolve_augment,
)
from look.engine.checkpoint import (
    CheckpointCorruptError,
    capture_rng_state_of_every_rank,
    load_latest_checkpoint,
    remove_leftover_temp_files,
    restore_rng_state_of_this_rank,
    save_checkpoint,
)
from look.engine.distributed import (
    all_reduce_sum,
    barrier,
    broadcast_buffers_from_rank_0,
    get_rank,
    get_world_size,
    is_distributed,
    is_main_process,
    rank_seed,
)
from look.engine.optim import build_lr_scheduler, build_optimizer
from look.engine.sampler import GlobalBatchSampler
from look.engine.stop_signals import StopSignals, TrainingStopped, end_workers, start_workers
from look.evaluation.features import (
    extract_features,
    files_at,
    keep_readable,
    unreadable_indices,
)
from look.evaluation.metrics import mean_per_class_accuracy, top1_accuracy
from look.evaluation.model_source import state_fingerprint
from look.models import check_finite

__all__ = ["FinetuneOptions", "default_finetune_recipe", "finetune"]

# Images up to this side length count as "small" (MNIST/CIFAR-like) for the default recipe.
_SMALL_IMAGE_MAX = 64


@dataclass(frozen=True)
class FinetuneOptions:
    """Overrides of the default recipe; ``None`` takes the value for the image size."""

    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    momentum: float = 0.9

    def validate(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"fine-tune epochs={self.epochs} must be at least 1")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"fine-tune lr={self.lr} must be a finite number > 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"fine-tune batch_size={self.batch_size} must be at least 1")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"fine-tune weight_decay={self.weight_decay} must be >= 0")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"fine-tune momentum={self.momentum} must lie in [0, 1)")


def default_finetune_recipe(image_size: int) -> dict[str, Any]:
    """Epochs, lr, global batch and weight decay used when not overridden.

    Small images (≤ 64 px): 5 epochs, lr 0.03, batch 128, weight decay 5e-4.
    Larger images (224 px and such): 5 epochs, lr 0.01, batch 64, weight decay 1e-4.
    """
    if image_size <= _SMALL_IMAGE_MAX:
        return {"epochs": 5, "lr": 0.03, "batch_size": 128, "weight_decay": 5e-4}
    return {"epochs": 5, "lr": 0.01, "batch_size": 64, "weight_decay": 1e-4}


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images))


def _collate(
    items: list[tuple[tuple[torch.Tensor, ...], int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([views[0] for views, _, _ in items])
    labels = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
    return images, labels


@dataclass
class _Progress:
    """Where a fine-tuning is: the steps it has taken, and the epoch in progress's loss so far
    (summed over every rank's images)."""

    step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_images: float = 0.0
    last_epoch_loss: float = float("nan")


def _resume(
    checkpoint_dir: Path,
    identity: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    steps_per_epoch: int,
) -> _Progress:
    """Restore the newest fine-tuning checkpoint of this very fine-tuning (``identity``) and
    return where it was; a fresh :class:`_Progress` when there is none."""
    if is_main_process():  # the job's own folder: a crash's temp files are leftovers
        remove_leftover_temp_files(checkpoint_dir)
    try:
        found = load_latest_checkpoint(checkpoint_dir)
    except CheckpointCorruptError as error:
        # Fine-tuning checkpoints are this evaluation's scratch (look evaluate has no option
        # to start over): unreadable ones are set aside as another model's are.
        if is_main_process():
            warnings.warn(
                f"fine-tuning checkpoints in {checkpoint_dir} cannot be read; fine-tuning starts "
                f"over (they will be replaced): {error}",
                RuntimeWarning,
                stacklevel=3,
            )
        return _Progress()
    if found is None:
        return _Progress()
    state, path = found
    if state.get("identity") != identity:
        if is_main_process():
            warnings.warn(
                f"{path} is a fine-tuning checkpoint of another model, dataset or recipe; "
                "fine-tuning starts over (it will be replaced)",
                RuntimeWarning,
                stacklevel=3,
            )
        return _Progress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _restore_own_rng_state(state, path)
    # Written before fine-tuning could stop mid-epoch: a finished epoch, with no "step".
    step = int(state.get("step", int(state["epoch"]) * steps_per_epoch))
    # The loss sums so far count every rank's images: rank 0 carries them on.
    mine = is_main_process()
    return _Progress(
        step=step,
        epoch_loss_sum=float(state.get("epoch_loss_sum", 0.0)) if mine else 0.0,
        epoch_images=float(state.get("epoch_images", 0.0)) if mine else 0.0,
        last_epoch_loss=float(state["last_epoch_loss"]),
    )


def _restore_own_rng_state(state: dict[str, Any], path: Path) -> None:
    """Restore this rank's generators from a checkpoint written by as many processes; otherwise
    every rank takes rank 0's (the pre-training checkpoint's rule), with a warning."""
    saved = state.get("rng_per_rank")
    if saved is None:  # written before per-rank states: rank 0's alone, of unknown world size
        saved, written = [state["rng"]], "holds rank 0's random generators only"
    else:
        written = f"was written by {len(saved)} process{'es' if len(saved) > 1 else ''}"
    if not restore_rng_state_of_this_rank(saved) and is_main_process():
        warnings.warn(
            f"{path} {written} and this fine-tuning runs in {get_world_size()}: every process "
            "continues from rank 0's random generators, so random draws (dropout and the like) "
            "do not continue as in the interrupted fine-tuning; the data order and augmentation do",
            RuntimeWarning,
            stacklevel=4,
        )


def _device_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` (``cuda`` alone: the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _train(
    model: _Classifier,
    train_set: Any,
    *,
    device: torch.device,
    recipe: dict[str, Any],
    global_batch: int,
    momentum: float,
    seed: int,
    num_workers: int,
    autocast_dtype: torch.dtype | None,
    progress: bool,
    checkpoint_dir: Path | None,
    identity: dict[str, Any],
    stop: StopSignals,
    worker_signals: tuple[int, ...],
) -> tuple[_Classifier, float, int]:
    """Train ``model`` with the recipe, from the newest checkpoint of ``checkpoint_dir`` when it
    is this fine-tuning's (``identity``); return it, its last epoch's mean training loss and the
    recipe's number of steps.

    Every step all-reduces two flags, read on the host once: a non-finite loss on some rank (every
    rank then raises, rather than the others waiting in DDP's all-reduce until the timeout) and a
    stop signal (``stop``) received by some rank: every rank then finishes the step, the state is
    saved there and :class:`TrainingStopped` is raised.
    """
    model = model.to(device)
    model.train()
    train_model: nn.Module = model
    if is_distributed():
        # Only a GPU has a device index: asking CUDA for one on a CPU (gloo) run fails.
        device_ids = [_device_index(device)] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    optimizer = build_optimizer(
        model.named_parameters(),
        name="sgd",
        lr=recipe["lr"],
        weight_decay=recipe["weight_decay"],
        momentum=momentum,
    )
    sampler = GlobalBatchSampler(
        len(train_set),
        global_batch,
        rank=get_rank(),
        world_size=get_world_size(),
        seed=seed,
        drop_last=True,
    )
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = recipe["epochs"] * steps_per_epoch
    scheduler = build_lr_scheduler(optimizer, total_steps=total_steps, warmup_steps=0)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    where = _Progress()
    if checkpoint_dir is not None:
        where = _resume(checkpoint_dir, identity, model, optimizer, scheduler, steps_per_epoch)
    stopping = False
    while where.step < total_steps and not stopping:
        epoch, step_in_epoch = divmod(where.step, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.set_start_step(step_in_epoch)
        train_set.set_epoch(epoch)
        loader = DataLoader(
            train_set,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
            # Its own generator: without one the iterator draws its workers' base seed from the
            # global one, one draw more in a run resumed mid-epoch (dropout would then differ).
            # The workers' seeds matter to nothing: augmentations are seeded per image.
            generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
        )
        # This rank's loss sum and image count in the epoch (rank 0 also carries a resumed
        # epoch's sums over every rank).
        sums = torch.tensor(
            [where.epoch_loss_sum, where.epoch_images], dtype=torch.float64, device=device
        )
        bar = tqdm(
            total=steps_per_epoch,
            initial=step_in_epoch,
            desc=f"fine-tune epoch {epoch + 1}/{recipe['epochs']}",
            unit="batch",
            disable=None if progress and get_rank() == 0 else True,  # (None: a terminal only)
            leave=False,
        )
        batches = start_workers(loader, worker_signals)
        for images, targets in batches:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with autocast:
                logits = train_model(images)
            loss = F.cross_entropy(logits.float(), targets)
            requested = 1.0 if stop.received is not None else 0.0
            flags = all_reduce_sum(
                torch.stack(
                    [
                        (~torch.isfinite(loss.detach())).double(),
                        loss.new_tensor(requested, dtype=torch.float64),
                    ]
                )
            )
            non_finite, stopping = (bool(flag > 0) for flag in flags.tolist())
            if non_finite:
                end_workers(batches)
                raise ValueError(
                    f"fine-tuning diverged (non-finite loss at epoch {epoch + 1}); lower the "
                    f"learning rate (now {recipe['lr']})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            sums += torch.stack(
                [loss.detach().double() * len(targets), sums.new_tensor(len(targets))]
            )
            where.step += 1
            bar.update(1)
            # The last step of all just finishes; a stop saves the step it came in.
            stopping = stopping and where.step < total_steps
            if stopping:
                break
        bar.close()
        end_workers(batches)
        totals = all_reduce_sum(sums).tolist()
        where.epoch_loss_sum, where.epoch_images = 0.0, 0.0  # the next loop starts an epoch
        epoch_done = where.step % steps_per_epoch == 0
        if epoch_done:
            where.last_epoch_loss = totals[0] / max(totals[1], 1.0)
            totals = [0.0, 0.0]
        if checkpoint_dir is not None and (epoch_done or stopping):
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_per_rank": capture_rng_state_of_every_rank(),  # (a collective)
                "identity": identity,
                "step": where.step,
                "epoch": where.step // steps_per_epoch,  # finished epochs
                "epoch_loss_sum": totals[0],
                "epoch_images": totals[1],
                "last_epoch_loss": where.last_epoch_loss,
            }
            if is_main_process():
                save_checkpoint(checkpoint_dir, where.step, state, keep_last=1)
            barrier()  # no rank runs ahead of a checkpoint another rank may resume from
    # The test predictions of every rank's shard use rank 0's running statistics: those its
    # checkpoints hold (DDP here broadcasts them at each forward, then each rank's own batch
    # moves them), so a fine-tuning resumed after its last checkpoint predicts alike.
    broadcast_buffers_from_rank_0(model)
    if stopping:  # only with a checkpoint folder (finetune catches no signal otherwise)
        raise TrainingStopped(
            stop.received or "a signal another rank received",
            where.step,
            total_steps,
            str(checkpoint_dir),
        )
    return model, where.last_epoch_loss, total_steps


def finetune(
    backbone: nn.Module,
    feature_dim: int,
    spec: DataSpec,
    *,
    labels: str = "fine",
    options: FinetuneOptions | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    eval_batch_size: int = 256,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    stop_signals: Sequence[str] = (),
    architecture: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune a copy of ``backbone`` with a new linear head on ``spec``'s training split.

    ``spec.image_size`` should be set to the evaluation image size. Reports test top-1 and mean
    per-class accuracy (percent) on the ``"test"`` split with the evaluation transform, leaving
    out test images whose file cannot be decoded (``corrupt_images="skip"``; unreadable training
    images are replaced by another of their class, as in pre-training). The caller's ``backbone``
    is not modified. ``checkpoint_dir``: save every epoch there and resume from it (see the
    module docstring). ``stop_signals`` (names such as ``"SIGTERM"``; with a ``checkpoint_dir``
    only): on one of them, save the step in progress and raise :class:`TrainingStopped`.
    ``architecture``: what built ``backbone`` (``evaluate`` passes its name, stem and constructor
    arguments), part of what makes a checkpoint this fine-tuning's, with the weights and the
    module's printed structure: a pooling or an activation the weights do not show.
    """
    options = options or FinetuneOptions()
    options.validate()
    # (Otherwise the first step's NaN loss would blame the learning rate.)
    check_finite(backbone.state_dict(), "the backbone to fine-tune's weights")
    device = torch.device(device)
    train_spec = dataclasses.replace(spec, labels=labels)
    train_set, info = build_train_dataset(train_spec, num_views=1, seed=seed)
    test_set, _ = build_eval_dataset(spec, "test", labels)
    if len(train_set) == 0 or len(test_set) == 0:
        raise ValueError(
            f"fine-tuning needs train and test images, got {len(train_set)} and {len(test_set)}"
        )
    recipe = default_finetune_recipe(info.image_size)
    overrides = {
        "epochs": options.epochs,
        "lr": options.lr,
        "batch_size": options.batch_size,
        "weight_decay": options.weight_decay,
    }
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    world = get_world_size()
    # The global batch must fit the training set and split evenly over the ranks.
    global_batch = min(recipe["batch_size"], len(train_set))
    global_batch -= global_batch % world
    if global_batch < world:
        raise ValueError(
            f"the training split has {len(train_set)} images, fewer than the {world} processes"
        )

    # Fine-tuning draws from generators of its own (the caller's are left as they were): the
    # classifier's initialisation from ``seed`` on every rank alike, then dropout and the like
    # from each rank's own seed.
    rng_devices = [_device_index(device)] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        model = _Classifier(copy.deepcopy(backbone), feature_dim, info.num_classes)
        torch.manual_seed(rank_seed(seed, get_rank()))
        # Stopping is saving: without a checkpoint folder a signal keeps its usual effect.
        with StopSignals(stop_signals if checkpoint_dir is not None else ()) as stop:
            model, last_epoch_loss, total_steps = _train(
                model,
                train_set,
                device=device,
                recipe=recipe,
                global_batch=global_batch,
                momentum=options.momentum,
                seed=seed,
                num_workers=num_workers,
                autocast_dtype=autocast_dtype,
                progress=progress,
                checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
                identity={
                    "backbone_sha256": state_fingerprint(backbone),
                    "architecture": dict(architecture or {}),
                    "module_sha256": hashlib.sha256(repr(backbone).encode()).hexdigest(),
                    "data": describe(train_spec),
                    "image_size": info.image_size,
                    "num_train": len(train_set),
                    "num_classes": info.num_classes,
                    "seed": seed,
                    "epochs": recipe["epochs"],
                    "lr": recipe["lr"],
                    "global_batch": global_batch,
                    "weight_decay": recipe["weight_decay"],
                    "momentum": options.momentum,
                    "autocast": str(autocast_dtype),
                },
                stop=stop,
                worker_signals=stop.numbers,
            )
    predictions = extract_features(
        model,
        test_set,
        device=device,
        batch_size=eval_batch_size,
        num_workers=num_workers,
        autocast_dtype=autocast_dtype,
        progress=progress,
        description="fine-tune test",
        output_fn=lambda logits: logits.argmax(dim=1),
    )
    # Unreadable test images (corrupt_images="skip") are left out, not scored as a substitute.
    unreadable = unreadable_indices(test_set)
    keep = keep_readable(unreadable, test_set, "fine-tune test split")
    predictions, test_labels = predictions[keep], test_set.labels[keep]
    if checkpoint_dir is not None:
        barrier()  # every rank has read what it needs before the folder goes
        if is_main_process():
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return {
        "model": "whole network fine-tuned, new linear classifier on the pooled features",
        "top1": top1_accuracy(predictions, test_labels),
        "mean_per_class_accuracy": mean_per_class_accuracy(predictions, test_labels),
        "epochs": recipe["epochs"],
        "lr": recipe["lr"],
        "batch_size": global_batch,
        "weight_decay": recipe["weight_decay"],
        "momentum": options.momentum,
        "optimizer": "sgd (no weight decay on biases and norm parameters)",
        "schedule": "cosine, no warm-up, per step",
        "augment": resolve_augment(spec.augment, info.image_size, spec.dataset),
        "steps": total_steps,
        "final_epoch_train_loss": last_epoch_loss,
        "num_train": len(train_set),
        "num_test": len(test_labels),
        "unreadable_test_files": files_at(test_set.source, unreadable),
        "num_classes": info.num_classes,
    }
