"""A kNN monitor during pre-training: how well the backbone's features transfer, epoch by epoch.

With ``train.knn_monitor`` set to a dataset SPEC (as ``look evaluate --dataset`` takes, e.g.
``fashion_mnist`` to watch the fine labels while pre-training on the coarse ones), the trainer
extracts frozen backbone features of a stratified subset of that dataset's train split (the kNN
memory) and test split (the queries) before the first step and after every epoch, and logs the
weighted-kNN accuracy as the ``monitor`` split of the run's metrics (``metrics_monitor.csv``,
TensorBoard). It is the ``knn`` protocol of ``look evaluate`` (weighted votes, τ = 0.07, one
k: ``train.knn_monitor_k``) on stratified subsets of ``train.knn_monitor_images`` images.

It neither trains nor changes anything the training reads: features come from the backbone in
eval mode (batch norm's running statistics untouched), and the global random number generators
are restored afterwards, so a run gives the same loss curve with and without the monitor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from look.data import build_eval_dataset, stratified_subset
from look.evaluation.features import extract_features
from look.evaluation.knn import KnnOptions, knn_classify
from look.evaluation.suite import parse_dataset_spec

__all__ = ["KnnMonitor", "build_knn_monitor"]


@dataclass
class KnnMonitor:
    """The monitor's two image sets and labels, built once at the start of a run."""

    description: str
    memory_images: Dataset
    memory_labels: torch.Tensor
    query_images: Dataset
    query_labels: torch.Tensor
    num_classes: int
    k: int

    @torch.no_grad()
    def measure(
        self,
        backbone: nn.Module,
        *,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        batch_size: int,
        num_workers: int,
        worker_signals: Sequence[int] = (),
    ) -> dict[str, float]:
        """kNN accuracy (percent) of ``backbone``'s features; a collective under DDP (each rank
        extracts a shard), with the same result on every rank. The loaders' workers leave
        ``worker_signals`` (the run's stop signals) to this process."""
        # The loaders draw their seeds from the global generator: fork it, so that training
        # (MoCo's shuffle, dropout) draws the same numbers with or without the monitor.
        with torch.random.fork_rng(devices=[]):
            features = [
                extract_features(
                    backbone,
                    images,
                    device=device,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    worker_signals=worker_signals,
                    autocast_dtype=autocast_dtype,
                    progress=False,
                    description=f"kNN monitor {split}",
                )
                for split, images in (("memory", self.memory_images), ("query", self.query_images))
            ]
        result = knn_classify(
            features[0],
            self.memory_labels,
            features[1],
            self.query_labels,
            options=KnnOptions(ks=(self.k,)),
            device=device,
            num_classes=self.num_classes,
        )["results"][0]
        return {
            "knn_top1": float(result["top1"]),
            "knn_mean_per_class": float(result["mean_per_class_accuracy"]),
        }


def build_knn_monitor(
    dataset_spec: str,
    *,
    labels: str,
    k: int,
    images: int | None,
    image_size: int,
    training_data: tuple[str, str | None] = ("", None),
    corrupt_images: str = "fail",
) -> KnnMonitor:
    """The monitor of ``dataset_spec`` (see :data:`look.evaluation.suite.DATASET_SPEC_HELP`),
    labelled by ``labels``, at the run's ``image_size``, on stratified subsets of at most
    ``images`` images per split (``None``: every image). ``training_data`` is the run's
    ``(dataset, root)``: a spec of the same dataset without a root reads the training root.
    ``corrupt_images`` is the run's ``data.corrupt_images``: with ``"skip"`` an undecodable image
    is replaced by another of its class, as in training (the monitor is a diagnostic: a
    substitute counts once more, where ``look evaluate`` leaves it out).
    Raises ``ValueError`` naming what is wrong (unknown dataset, missing files, a subset
    smaller than the number of classes)."""
    dataset, root = training_data
    if dataset_spec.strip().lower() == dataset == "imagefolder" and root is not None:
        # The training folder's own test split: a root-less imagefolder spec would be refused.
        dataset_spec = f"imagefolder:{root}"
    spec = dataclasses.replace(
        parse_dataset_spec(dataset_spec, corrupt_images=corrupt_images), image_size=image_size
    )
    if spec.root is None and spec.dataset == dataset:
        spec = dataclasses.replace(spec, root=root)
    sets = []
    for split in ("train", "test"):
        dataset, info = build_eval_dataset(spec, split, labels)
        split_labels = dataset.labels
        if images is not None and images < len(dataset):
            try:
                chosen = stratified_subset(split_labels, images)
            except ValueError as error:
                raise ValueError(f"train.knn_monitor_images={images}: {error}") from error
            dataset, split_labels = Subset(dataset, chosen.tolist()), split_labels[chosen]
        sets.append((dataset, split_labels, info.num_classes))
    (memory_images, memory_labels, classes), (query_images, query_labels, _) = sets
    return KnnMonitor(
        description=(
            f"{dataset_spec} ({labels} labels, {len(memory_labels)} train / {len(query_labels)} "
            f"test images, k={k})"
        ),
        memory_images=memory_images,
        memory_labels=memory_labels,
        query_images=query_images,
        query_labels=query_labels,
        num_classes=classes,
        k=k,
    )
