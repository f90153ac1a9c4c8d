"""CPU (or GPU) wall time of one pre-training epoch of the Fashion-MNIST recipes, LOOK vs CE.

    python benchmarks/fmnist_epoch_time.py --output epoch_time.json [--methods ce look] [--epochs 1]

Runs `look pretrain` on the shipped recipes (configs/<method>_cnn-small_fmnist-coarse.yaml, all 60k
training images, batch 256) and reads the epoch times the trainer records in summary.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from look.cli import resolve_config_path
from look.config import load_config
from look.engine.trainer import pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON file for the figures")
    parser.add_argument("--methods", nargs="+", default=["ce", "look"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    figures: dict[str, object] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "epochs": args.epochs,
        "seconds_per_epoch": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            recipe = resolve_config_path(f"{method}_cnn-small_fmnist-coarse")
            cfg = load_config(
                recipe,
                [
                    f"optim.epochs={args.epochs}",
                    "optim.warmup_epochs=0",
                    "train.progress=false",
                    "train.tensorboard=false",
                    f"train.device={args.device}",
                ],
            )
            result = pretrain(cfg, Path(tmp) / method, resume=False)
            figures["seconds_per_epoch"][method] = result.epoch_seconds  # type: ignore[index]
    per_epoch = figures["seconds_per_epoch"]
    print(f"{'method':<8} seconds/epoch (60k images, batch 256)")
    for method, seconds in per_epoch.items():  # type: ignore[union-attr]
        print(f"{method:<8} " + ", ".join(f"{s:.1f}" for s in seconds))
    Path(args.output).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
