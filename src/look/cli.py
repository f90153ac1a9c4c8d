"""``look`` command line: a thin layer over the library (every subcommand is one library call)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

from look.engine.errors import error_message
from look.engine.stop_signals import (
    EXIT_STOPPED,
    RunStopped,
    ignore_stop_signals_until_exit,
)

DESCRIPTION = """\
LOOK: Leave-One-Out K-Nearest-Neighbour supervised pre-training (Feng et al., ICLR 2022).

subcommands:
  pretrain   pre-train a backbone with LOOK or a baseline (ce, sl_mlp, supcon, nca, mocov2)
             from a YAML recipe plus --set overrides; resumes automatically in the same --output
  export     write the backbone of a run or checkpoint as safetensors (loads into timm/torchvision)
  evaluate   transfer evaluation of a checkpoint or any timm/torchvision model on a dataset:
             linear probe, weighted kNN, fine-tuning, few-shot (features cached on disk)
  analyze    multi-modality metrics and Figure-1 style t-SNE maps of frozen features
  report     one Markdown/JSON/CSV table (methods x datasets x protocols, mean +- std over
             seeds) with plots, from evaluation results
  demo       the embedded experiment: Fashion-MNIST coarse -> fine and -> digits, all methods
  methods    list the pre-training methods and their options with defaults

Multi-GPU / multi-node: launch `look pretrain` with torchrun, e.g.
  torchrun --nproc_per_node 8 -m look pretrain --config look_resnet50_imagenet ...
Run `look SUBCOMMAND --help` for the options of each subcommand.
"""


def resolve_config_path(name: str) -> Path:
    """A path, or a recipe name (:func:`look.config.resolve_recipe`)."""
    from look.config import resolve_recipe

    return resolve_recipe(name)


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pre-train a backbone",
        description="Pre-train a backbone. Defaults <- --config recipe <- --set overrides. "
        "The resolved config, metrics (CSV/JSONL/TensorBoard), checkpoints and the exported "
        "backbone go to --output; re-running with the same --output resumes exactly.",
    )
    p.add_argument(
        "--config",
        help="YAML recipe: a path, or a recipe name (found in the working folder's configs/, "
        "the source tree's, or the installed share/look/configs)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set method.k=50 --set optim.epochs=20 (repeatable)",
    )
    p.add_argument("--output", required=True, help="run directory (created or resumed)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --output")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build and check everything (data, model, method, memory, schedule, the checkpoint "
        "to resume from) and print the plan; train nothing, write nothing",
    )
    p.add_argument(
        "--check-images",
        action="store_true",
        help="decode every training image once before anything else (in data.num_workers "
        "workers; under torchrun each rank a share) and list the unreadable files; with "
        "data.corrupt_images=fail any of them stops the run (or dry run) here",
    )
    p.add_argument("--device", help="shortcut for --set train.device=DEVICE (auto, cpu, cuda, mps)")
    p.add_argument(
        "--download",
        action="store_true",
        help="allow torchvision datasets to be downloaded (never done otherwise)",
    )


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint's backbone as safetensors",
        description="Write the backbone weights of a run directory or checkpoint file as a "
        "safetensors file whose keys are those of timm.create_model(name) (or the torchvision "
        "model) without the classifier.",
    )
    p.add_argument("--checkpoint", required=True, help="run directory or ckpt-*.pt file")
    p.add_argument("--output", required=True, help="destination .safetensors file")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the embedded experiment (Fashion-MNIST coarse -> fine, -> digits)",
        description="Pre-train every method on Fashion-MNIST (coarse labels; fine labels for the "
        "digits scenario), evaluate frozen features on the fine labels and on digits, measure "
        "intra-class multi-modality, draw t-SNE maps and write REPORT.md. Re-running the same "
        "command skips finished stages.",
    )
    p.add_argument(
        "--output", help="output folder (default runs/demo, with --quick runs/demo-quick)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a smoke version of a few minutes on 2 CPU cores"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="pre-training seeds (default: 0); with several, mean ± std and LOOK's paired "
        "difference with each baseline with a 95%% confidence interval",
    )
    p.add_argument("--epochs", type=int, help="override the plan's pre-training epochs")
    p.add_argument("--train-subset", type=int, help="override the number of training images")


def _run_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from look.demo import DemoPlan, run_demo

    plan = DemoPlan.quick() if args.quick else DemoPlan.default()
    changes: dict[str, object] = {}
    if args.seeds is not None:
        if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
            raise ValueError(f"--seeds must be distinct non-negative integers, got {args.seeds}")
        changes["seeds"] = tuple(args.seeds)
    for option, field in (("epochs", "epochs"), ("train_subset", "train_subset")):
        value = getattr(args, option)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
            changes[field] = value
    run_demo(_demo_output(args), plan=replace(plan, **changes), device=args.device)
    return 0


def _demo_output(args: argparse.Namespace) -> str:
    # The quick smoke run has its own default folder: its finished stages never stand in for
    # the full demo's (run_demo refuses a folder of another plan).
    return args.output or ("runs/demo-quick" if args.quick else "runs/demo")


def build_parser(full: str | None = None) -> argparse.ArgumentParser:
    """The ``look`` parser: every subcommand complete, or with ``full``, that one only (the
    others listed with their help line; ``full=""`` for none)."""
    parser = argparse.ArgumentParser(
        prog="look", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks instead of one-line errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    _add_pretrain(sub)
    _add_export(sub)
    _add_demo(sub)
    # evaluate, analyze and report define their options with the protocols' own defaults, whose
    # modules import torch, scikit-learn and matplotlib (seconds): when another command runs (or
    # the top-level --help), an entry with their one-line help stands in for them.
    if full is None or full == "evaluate":
        from look.evaluation import commands as evaluation_commands

        evaluation_commands.register(sub)
    else:
        sub.add_parser("evaluate", help=COMMAND_SUMMARIES["evaluate"])
    if full is None or full in ("analyze", "report"):
        from look.analysis import commands as analysis_commands

        analysis_commands.register(sub)
    else:
        for name in ("analyze", "report"):
            sub.add_parser(name, help=COMMAND_SUMMARIES[name])
    sub.add_parser("methods", help="list methods and their options")
    return parser


# The help lines of the commands defined elsewhere (tests/test_cli.py checks they match).
COMMAND_SUMMARIES = {
    "evaluate": "transfer evaluation: linear probe, kNN, fine-tuning, few-shot",
    "analyze": "multi-modality metrics and t-SNE maps of frozen features",
    "report": "collect results over methods and seeds into REPORT.md/json/csv",
}


def _requested_command(argv: Sequence[str] | None) -> str:
    """The subcommand named on the command line ('' for none), read without building the
    parser (the top-level options take no value)."""
    words = list(sys.argv[1:] if argv is None else argv)
    return next((word for word in words if not word.startswith("-")), "")


def _run_pretrain(args: argparse.Namespace) -> int:
    from look.config import load_config
    from look.engine.trainer import pretrain

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.download:
        overrides.append("data.download=true")
    config_path = resolve_config_path(args.config) if args.config else None
    cfg = load_config(config_path, overrides)
    if args.dry_run:
        from look.engine.distributed import is_main_process
        from look.engine.trainer import Trainer

        trainer = Trainer(cfg, args.output, resume=not args.no_resume)
        plan = trainer.plan()
        if args.check_images:
            plan["images_checked"], unreadable = trainer.check_images()
            if not trainer.dataset.source.file_paths:
                plan["images_checked"] = "none: the dataset is held in memory, with no files"
            plan["unreadable_images"] = [f"{image.path} ({image.error})" for image in unreadable]
        # One step, kept nowhere: the errors only a step meets, before the job is queued.
        plan["rehearsed_step"] = trainer.rehearse_step()
        if is_main_process():
            for key, value in plan.items():
                print(f"{key}: {value}")
            print("look: dry run; one step rehearsed, nothing was trained or written")
        return 0
    result = pretrain(cfg, args.output, resume=not args.no_resume, check_images=args.check_images)
    if result.backbone_path is not None:
        print(f"look: done at step {result.global_step}; backbone: {result.backbone_path}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from look.engine.export import export_from_checkpoint

    path = export_from_checkpoint(args.checkpoint, args.output)
    print(f"look: wrote {path}")
    return 0


def _run_methods(_: argparse.Namespace) -> int:
    import dataclasses

    from look.methods import METHODS, registered_methods

    broken: list[str] = []
    for name, cls in registered_methods(broken=broken).items():
        module_doc = sys.modules[cls.__module__].__doc__ or ""
        # A plug-in's own class docstring: several methods of one module tell themselves apart.
        own = "" if name in METHODS else cls.__dict__.get("__doc__") or ""
        doc = (own or module_doc).strip().splitlines()
        print(f"{name}: {doc[0] if doc else ''}")
        choices = getattr(cls.Options, "CHOICES", {})
        fixed = getattr(cls.Options, "FIXED", {})
        for f in dataclasses.fields(cls.Options):
            default = f.default if f.default is not dataclasses.MISSING else None
            allowed = f"  (one of {', '.join(choices[f.name])})" if f.name in choices else ""
            if f.name in fixed:
                allowed = f"  (fixed: {fixed[f.name]})"
            print(f"    {f.name} = {default!r}{allowed}")
    for problem in broken:
        print(f"look: warning: {problem}", file=sys.stderr)
    return 0


class OutputPath(NamedTuple):
    """A path a command writes: a folder (created if missing) or a single file."""

    option: str
    path: Path
    is_folder: bool


def output_paths(args: argparse.Namespace) -> list[OutputPath]:
    """The paths ``args.command`` will write, to be checked before it does any work."""
    if args.command == "export":
        return [OutputPath("--output", Path(args.output), is_folder=False)]
    if args.command not in ("pretrain", "evaluate", "analyze", "report", "demo"):
        return []
    output = _demo_output(args) if args.command == "demo" else args.output
    paths = [OutputPath("--output", Path(output), is_folder=True)]
    if args.command == "evaluate" and not args.no_cache and args.cache_dir:
        paths.append(OutputPath("--cache-dir", Path(args.cache_dir), is_folder=True))
    return paths


def check_output_path(output: OutputPath) -> None:
    """Fail now, naming the path, when ``output`` cannot be written: otherwise the command meets
    it only when it writes, possibly after hours of training or evaluation."""
    path = output.path
    if output.is_folder and path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"{output.option} {path} is a file, not a folder; pass a folder (created if missing)"
        )
    if not output.is_folder and path.is_dir():
        raise IsADirectoryError(
            f"{output.option} {path} is a folder, not a file; pass a file path such as "
            f"{path / 'backbone.safetensors'}"
        )
    # The nearest existing ancestor decides whether the missing folders can be created.
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise NotADirectoryError(
                    f"{output.option} {path}: {ancestor} is a file, not a folder, so nothing can "
                    "be written under it"
                )
            break


def _run_evaluate(args: argparse.Namespace) -> int:
    from look.evaluation import commands as evaluation_commands

    return evaluation_commands.run(args)


def _run_analyze(args: argparse.Namespace) -> int:
    from look.analysis import commands as analysis_commands

    return analysis_commands.run_analyze(args)


def _run_report(args: argparse.Namespace) -> int:
    from look.analysis import commands as analysis_commands

    return analysis_commands.run_report(args)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show the warnings look's own code raises as ``look: warning: MESSAGE`` lines above any
    progress bar, without the Python source line a user has no use for; others as usual."""
    package = str(Path(__file__).resolve().parent)
    original = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        # A warnings.catch_warnings(record=True) around main() (a test, a notebook) records
        # through warnings' message hook: leave those warnings to it.
        recording = getattr(warnings, "_showwarnmsg_impl", None)
        recorded = getattr(recording, "__name__", "_showwarnmsg_impl") != "_showwarnmsg_impl"
        if str(Path(filename).resolve()).startswith(package) and not recorded:
            from tqdm import tqdm

            tqdm.write(f"look: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def _what_is_kept(args: argparse.Namespace) -> str:
    """What an interrupted command leaves to resume from: for pre-training, its newest
    checkpoint, if it had written one."""
    if args.command != "pretrain" or getattr(args, "dry_run", False):
        return ""
    from look.engine.checkpoint import newest_checkpoint_file

    newest = newest_checkpoint_file(Path(args.output) / "checkpoints")
    if newest is None:
        return "; no checkpoint had been written yet"
    return f"; the last checkpoint, {newest}, is kept: run the same command to resume"


def _report_stop(stopped: RunStopped) -> int:
    """A run stopped by a signal: how to go on (rank 0 says it), and status 75."""
    if os.environ.get("RANK", "0") == "0":  # every rank stops alike: one message
        print(f"look: {stopped}", file=sys.stderr)
    ignore_stop_signals_until_exit()  # (the checkpoint is saved: exit with 75, not the signal)
    return EXIT_STOPPED


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(full=_requested_command(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand's parser: its usage, not the top level's
        commands = next(
            action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
        )
        command_parser = commands.choices.get(args.command) if args.command else None
        (command_parser or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.version:
        import look

        print(look.__version__)
        return 0
    handlers = {
        "pretrain": _run_pretrain,
        "export": _run_export,
        "evaluate": _run_evaluate,
        "analyze": _run_analyze,
        "report": _run_report,
        "demo": _run_demo,
        "methods": _run_methods,
    }
    if args.command not in handlers:
        parser.print_help()
        return 0 if args.command is None else 2

    def run() -> int:
        for output in output_paths(args):
            check_output_path(output)
        with one_line_warnings():
            return handlers[args.command](args)

    if args.debug or os.environ.get("LOOK_DEBUG"):
        try:
            return run()
        except RunStopped as stopped:  # not an error: no traceback, the same status
            return _report_stop(stopped)
    from look.config import ConfigError
    from look.engine.checkpoint import CheckpointCorruptError
    from look.engine.trainer import TrainingStepError

    try:
        return run()
    # OSError: a path the user gave that cannot be read or written (permissions, a file where a
    # folder belongs, a full disk) is a usage error like a missing file, not a bug; so is a
    # checkpoint that is no checkpoint (e.g. `look export --checkpoint config.yaml`).
    except (CheckpointCorruptError, ConfigError, OSError, TrainingStepError, ValueError) as exc:
        # Under torchrun every rank says what stopped it, the others naming their rank: a
        # problem of one node (its copy of the data, a missing file) must not go unsaid when
        # rank 0 is stopped by torchrun instead of by the error itself.
        rank = os.environ.get("RANK", "0")
        where = "" if rank == "0" else f" (rank {rank})"
        print(f"look: error{where}: {error_message(exc)}", file=sys.stderr)
        return 2
    except RunStopped as stopped:
        return _report_stop(stopped)
    except KeyboardInterrupt:
        print(f"look: interrupted{_what_is_kept(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
