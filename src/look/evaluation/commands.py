"""The ``look evaluate`` subcommand: argument parsing over :func:`look.evaluation.evaluate`.

``look.cli`` adds it with ``register(subparsers)`` and dispatches to ``run(args)``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from look.engine.stop_signals import DEFAULT_STOP_SIGNALS, STOPPABLE_SIGNALS
from look.evaluation.features import DEFAULT_FEATURE_CACHE_DIR
from look.evaluation.fewshot import FewShotOptions
from look.evaluation.finetune import FinetuneOptions
from look.evaluation.knn import KnnOptions
from look.evaluation.linear_probe import DEFAULT_C_GRID, LinearProbeOptions
from look.evaluation.suite import DATASET_SPEC_HELP, PROTOCOLS, RESULTS_FILE

__all__ = ["register", "run"]

DESCRIPTION = f"""\
Evaluate a backbone with the transfer protocols and write OUTPUT/{RESULTS_FILE}.

model (one of):
  --checkpoint PATH   a `look pretrain` run directory (newest good checkpoint), a ckpt-*.pt file
                      or an exported backbone .safetensors
  --timm NAME         any timm model, or a torchvision one as tv:NAME; random initialisation
                      (seeded) unless --weights gives a local weight file (never downloaded)

dataset SPEC: {DATASET_SPEC_HELP}

protocols (--protocol, repeatable or comma-separated; default all):
  linear    multinomial logistic regression (L-BFGS) on standardised frozen features,
            C chosen on a stratified validation split of train (on mean per-class accuracy
            when the training classes are imbalanced), refit on all of train
  knn       weighted kNN on L2-normalised frozen features (cosine, exp(sim/T) votes)
  finetune  whole network + new linear classifier, SGD momentum 0.9, cosine schedule
  fewshot   N-way K-shot episodes on frozen test features, nearest centroid (cosine),
            mean and 95% confidence interval

Frozen features are the backbone's global-pool output (the projection head's embedding with
--head) and are cached in --cache-dir, keyed by weights, dataset, split, transform, image size
and the name, size, modification and status-change times of every image file (so replaced
images are re-read, even ones copied with their old modification time).
The image size defaults to the pre-training image size recorded with the model (so digits are
resized to 28 px for a Fashion-MNIST model), else the dataset's own size (224 px for an image
folder, whatever its images' size: a warning says when they are much smaller; --image-size).

Coarse-to-fine transfer: evaluate a model pre-trained with coarse labels with --labels fine;
{RESULTS_FILE} records both the pre-training and the evaluation labels.
Multi-GPU: torchrun --nproc_per_node N -m look evaluate ... (same numbers as one process).
Preemption: on SIGTERM or SIGUSR1 (--stop-signals) the command exits with status 75 and the same
command goes on: fine-tuning saves the step in progress and resumes it; a feature extraction
stops after its batch in progress, a frozen protocol before the next one (they re-run from the
cached features).
"""


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from error
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def register(subparsers: Any) -> None:
    """Add the ``evaluate`` subcommand (with its full ``--help``) to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "evaluate",
        help="transfer evaluation: linear probe, kNN, fine-tuning, few-shot",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    choice = model.add_mutually_exclusive_group(required=True)
    choice.add_argument(
        "--checkpoint", metavar="PATH", help="run directory, ckpt-*.pt or .safetensors"
    )
    choice.add_argument(
        "--timm", metavar="NAME", help="timm model name, or tv:NAME for torchvision"
    )
    model.add_argument("--weights", metavar="FILE", help="local weight file for --timm")
    model.add_argument(
        "--small-stem",
        action="store_true",
        help="with --timm: CIFAR-style ResNet stem (3x3 conv, no max-pool) for 28-32 px images",
    )
    model.add_argument(
        "--timm-kwargs",
        metavar="YAML",
        help="with --timm: more constructor arguments, e.g. '{img_size: 32, patch_size: 4}' for "
        "a ViT on small images (as model.backbone_kwargs in pre-training)",
    )
    model.add_argument(
        "--head",
        action="store_true",
        help="frozen protocols use the projection head's L2-normalised embedding instead of the "
        "backbone's pooled features (needs a checkpoint with a head)",
    )

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, metavar="SPEC", help=DATASET_SPEC_HELP)
    data.add_argument(
        "--labels",
        default="fine",
        metavar="fine|coarse|FILE.json",
        help="evaluation labels: fine (default), coarse (the dataset's shipped grouping) or a "
        "grouping JSON mapping fine class name -> coarse class name",
    )
    data.add_argument(
        "--image-size",
        type=int,
        metavar="N",
        help="evaluation image size (default: the pre-training image size, else the dataset's: "
        "224 for an image folder)",
    )
    data.add_argument(
        "--corrupt-images",
        default="fail",
        choices=("fail", "skip"),
        help="imagefolder files that cannot be decoded: fail (default, naming the file) or skip "
        "(left out of the evaluation, with a warning naming them; fine-tuning replaces an "
        "unreadable training image by another image of its class)",
    )
    data.add_argument(
        "--train-subset",
        type=int,
        metavar="N",
        help="use a stratified subset of N training images (the same N images for every model "
        "and seed; results.json records it); default: the whole training split. The test split "
        "is always whole",
    )
    data.add_argument(
        "--download",
        action="store_true",
        help="allow torchvision to download MNIST/CIFAR (never done otherwise)",
    )

    run_group = parser.add_argument_group("run")
    run_group.add_argument(
        "--protocol",
        action="append",
        metavar="NAME",
        help=f"{', '.join(PROTOCOLS)} or all (default: all); repeatable or comma-separated",
    )
    run_group.add_argument("--output", required=True, metavar="DIR", help="folder for results.json")
    run_group.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto"
    )
    run_group.add_argument(
        "--batch-size", type=int, default=256, help="images per forward pass (default: 256)"
    )
    run_group.add_argument(
        "--num-workers", type=int, help="DataLoader workers (default: 0 on CPU, up to 8 on CUDA)"
    )
    run_group.add_argument(
        "--cache-dir",
        default=DEFAULT_FEATURE_CACHE_DIR,
        metavar="DIR",
        help=f"feature cache folder (default: {DEFAULT_FEATURE_CACHE_DIR})",
    )
    run_group.add_argument(
        "--no-cache", action="store_true", help="neither read nor write the cache"
    )
    run_group.add_argument(
        "--cache-max-gb",
        type=float,
        metavar="GB",
        help="after writing features, delete the cache's least recently used files until it "
        "takes at most GB (default: no limit; a warning once it passes 50 GB)",
    )
    run_group.add_argument(
        "--seed", type=int, default=0, help="seed of splits, episodes, fine-tuning"
    )
    run_group.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run_group.add_argument(
        "--label",
        metavar="TEXT",
        help="this model's row in `look report` (default: method [backbone] (pre-training "
        "labels)); e.g. 'look k=50' to keep two recipes of one method apart",
    )

    linear = parser.add_argument_group("linear probe")
    linear.add_argument(
        "--linear-c",
        type=float,
        metavar="C",
        help="fixed inverse L2 strength (skips the validation search)",
    )
    linear.add_argument(
        "--linear-c-grid",
        type=_float_list,
        default=DEFAULT_C_GRID,
        metavar="C1,C2,...",
        help="values of C searched on the validation split (default: 1e-4 ... 1e2, 7 log-spaced)",
    )
    linear.add_argument(
        "--linear-val-fraction",
        type=float,
        default=LinearProbeOptions.val_fraction,
        help="fraction of each training class held out to choose C (default: 0.2)",
    )
    linear.add_argument(
        "--linear-max-iter",
        type=int,
        default=LinearProbeOptions.max_iter,
        help="L-BFGS iterations per fit (default: 1000)",
    )

    knn = parser.add_argument_group("kNN")
    knn.add_argument(
        "--knn-k",
        type=int,
        nargs="+",
        default=list(KnnOptions.ks),
        metavar="K",
        help="neighbour counts (default: 20 200)",
    )
    knn.add_argument(
        "--knn-temperature",
        type=float,
        default=KnnOptions.temperature,
        help="vote temperature (default: 0.07)",
    )

    tune = parser.add_argument_group("fine-tuning (defaults depend on the image size)")
    tune.add_argument("--finetune-epochs", type=int, help="default: 5")
    tune.add_argument("--finetune-lr", type=float, help="default: 0.03 (<= 64 px), 0.01 (larger)")
    tune.add_argument(
        "--finetune-batch-size", type=int, help="global batch; default: 128 (<= 64 px), 64 (larger)"
    )
    tune.add_argument(
        "--finetune-weight-decay", type=float, help="default: 5e-4 (<= 64 px), 1e-4 (larger)"
    )
    tune.add_argument(
        "--stop-signals",
        nargs="*",
        choices=STOPPABLE_SIGNALS,
        default=list(DEFAULT_STOP_SIGNALS),
        metavar="SIGNAL",
        help="signals on which the evaluation stops (fine-tuning saves its step) and exits "
        "with status 75 (default: "
        f"{' '.join(DEFAULT_STOP_SIGNALS)}; none given: catch none); choose from "
        f"{', '.join(STOPPABLE_SIGNALS)}",
    )

    fewshot = parser.add_argument_group("few-shot")
    fewshot.add_argument(
        "--fewshot-ways", type=int, default=FewShotOptions.n_way, help="N (default: 5)"
    )
    fewshot.add_argument(
        "--fewshot-shots",
        type=int,
        nargs="+",
        default=list(FewShotOptions.shots),
        metavar="K",
        help="K of each setting (default: 1 5)",
    )
    fewshot.add_argument(
        "--fewshot-queries",
        type=int,
        default=FewShotOptions.queries,
        help="query images per class (default: 15)",
    )
    fewshot.add_argument(
        "--fewshot-episodes",
        type=int,
        default=FewShotOptions.episodes,
        help="episodes per setting (default: 600, the protocol's minimum; fewer warn)",
    )


def _linear_notes(r: dict[str, Any]) -> str:
    """What a reader of the linear line must know before trusting it: how C was chosen on an
    imbalanced set, a C at the grid's end, fits that ran out of iterations (.get: older files)."""
    notes = []
    if r.get("selection_metric") == "mean_per_class_accuracy":
        notes.append(
            f"chosen on mean/class: imbalanced train set, class counts "
            f"{r.get('class_count_ratio', float('nan')):.1f}:1"
        )
    if r.get("c_at_grid_edge"):
        notes.append(f"the {r['c_at_grid_edge']} C of the grid: widen --linear-c-grid")
    curve = r.get("validation_curve") or []
    failed = r.get("grid_fits_not_converged", 0)
    if r.get("refit_converged") is False:
        grid = f", {failed}/{len(curve)} grid fits too" if curve else ""
        notes.append(
            f"NOT CONVERGED: refit stopped on {r.get('refit_stop_reason', 'max_iter')} after "
            f"{r.get('refit_iterations')} iterations{grid}; raise --linear-max-iter"
        )
    elif failed:
        notes.append(f"{failed}/{len(curve)} grid fits did not converge; raise --linear-max-iter")
    return "".join(f"; {note}" for note in notes)


def _yaml_mapping(text: str | None, option: str) -> dict[str, Any] | None:
    """``text`` read as a YAML mapping (``None`` stays ``None``); ``ValueError`` naming ``option``."""
    if text is None:
        return None
    import yaml

    from look.config import yaml_problem

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{option} {text!r} is not YAML {yaml_problem(error)}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a mapping such as '{{img_size: 32}}', got {text!r}")
    return value


def _print_summary(report: dict[str, Any], output_dir: Path) -> None:
    protocols = report["protocols"]
    lines = [f"look: wrote {output_dir / RESULTS_FILE}"]
    if "linear" in protocols:
        r = protocols["linear"]
        lines.append(
            f"  linear    top1 {r['top1']:6.2f}  mean/class {r['mean_per_class_accuracy']:6.2f}"
            f"  (C={r['best_c']:g}{_linear_notes(r)})"
        )
    if "knn" in protocols:
        for r in protocols["knn"]["results"]:
            clipped = (
                f"  (k={r['k_effective']}: the whole train set)"
                if r.get("k_effective", r["k"]) != r["k"]
                else ""
            )
            lines.append(
                f"  knn k={r['k']:<4d}top1 {r['top1']:6.2f}  mean/class {r['mean_per_class_accuracy']:6.2f}"
                + clipped
            )
    if "finetune" in protocols:
        r = protocols["finetune"]
        lines.append(
            f"  finetune  top1 {r['top1']:6.2f}  mean/class {r['mean_per_class_accuracy']:6.2f}"
            f"  ({r['epochs']} epochs)"
        )
    if "fewshot" in protocols:
        fewshot = protocols["fewshot"]
        for r in fewshot["settings"]:
            below = (
                f"  ({r['episodes']} episodes, below the protocol's "
                f"{fewshot.get('spec_min_episodes')})"
                if fewshot.get("episodes_below_spec")
                else ""
            )
            lines.append(
                f"  fewshot   {r['n_way']}-way {r['k_shot']}-shot {r['mean_accuracy']:6.2f}"
                f" ± {r['ci95']:.2f}{below}"
            )
    features = report.get("features")
    if isinstance(features, dict):
        # Whether each split's frozen features came from the cache (a hit shows nowhere else).
        sources = [
            f"{split} {'from the cache' if info.get('from_cache') else 'extracted'}"
            for split, info in features.items()
            if isinstance(info, dict) and "from_cache" in info
        ]
        if sources:
            lines.append(f"  features: {', '.join(sources)}")
    print("\n".join(lines))


def run(args: argparse.Namespace) -> int:
    """Run ``look evaluate`` from parsed arguments; returns the exit status (0 on success)."""
    from look.engine.distributed import (
        cleanup_distributed,
        init_distributed,
        is_distributed,
        is_main_process,
        launched_by_torchrun,
    )
    from look.evaluation.model_source import ModelSource
    from look.evaluation.suite import evaluate, parse_dataset_spec, resolve_eval_device

    if args.no_cache and args.cache_max_gb is not None:
        raise ValueError(
            "--cache-max-gb limits the feature cache's size and --no-cache turns the cache off: "
            "give one of them"
        )
    source = ModelSource(
        checkpoint=args.checkpoint,
        timm=args.timm,
        weights=args.weights,
        small_stem=args.small_stem,
        model_kwargs=_yaml_mapping(args.timm_kwargs, "--timm-kwargs"),
    )
    spec = parse_dataset_spec(
        args.dataset, download=args.download, corrupt_images=args.corrupt_images
    )
    if args.train_subset is not None:
        spec = dataclasses.replace(spec, subset=args.train_subset)
    started_group = False
    if launched_by_torchrun() and not is_distributed():
        init_distributed(resolve_eval_device(args.device).type)
        started_group = True
    try:
        report = evaluate(
            source,
            spec,
            args.protocol or "all",
            labels=args.labels,
            output_dir=args.output,
            image_size=args.image_size,
            device=args.device,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            cache_dir=None if args.no_cache else args.cache_dir,
            cache_max_gb=args.cache_max_gb,
            seed=args.seed,
            use_head=args.head,
            progress=not args.no_progress,
            linear_options=LinearProbeOptions(
                c_grid=tuple(args.linear_c_grid),
                c=args.linear_c,
                val_fraction=args.linear_val_fraction,
                max_iter=args.linear_max_iter,
            ),
            knn_options=KnnOptions(ks=tuple(args.knn_k), temperature=args.knn_temperature),
            finetune_options=FinetuneOptions(
                epochs=args.finetune_epochs,
                lr=args.finetune_lr,
                batch_size=args.finetune_batch_size,
                weight_decay=args.finetune_weight_decay,
            ),
            fewshot_options=FewShotOptions(
                n_way=args.fewshot_ways,
                shots=tuple(args.fewshot_shots),
                queries=args.fewshot_queries,
                episodes=args.fewshot_episodes,
            ),
            stop_signals=tuple(args.stop_signals),
            label=args.label,
        )
        if is_main_process():
            _print_summary(report, Path(args.output))
    finally:
        if started_group:
            cleanup_distributed()
    return 0
