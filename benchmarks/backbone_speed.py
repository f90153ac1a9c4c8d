"""Training throughput (forward + backward, images/s) of backbones on this machine's CPU.

Example::

    python benchmarks/backbone_speed.py --threads 2 --image-size 28 --batch-size 256 \
        --output results/backbone_speed.json

Each configuration is timed ``--repeats`` times and the best run is reported: on a shared machine
the best run is the one least disturbed by other processes (the load average is recorded too). The
rate from CPU time (threads × images per CPU-second of this process) estimates the idle-machine
rate when other processes compete for the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from _machine import cpu_name

from look.models import count_parameters, create_backbone

DEFAULT_MODELS = ("look_cnn_small", "look_resnet_tiny", "resnet18")


def measure_throughput(
    name: str,
    *,
    image_size: int,
    batch_size: int,
    min_seconds: float,
    warmup_steps: int,
    repeats: int,
    channels_last: bool,
    bf16: bool,
) -> dict[str, object]:
    """Time forward+backward passes of a small-stem backbone; best and median of ``repeats`` runs.

    Each run takes whole steps until ``min_seconds`` have passed, so slow models are timed on few
    steps and fast ones on many.
    """
    torch.manual_seed(0)
    backbone, feature_dim = create_backbone(name, small_stem=True)
    backbone.train()
    images = torch.randn(batch_size, 3, image_size, image_size)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features = backbone(images)
        features.float().square().mean().backward()
        backbone.zero_grad(set_to_none=True)

    for _ in range(warmup_steps):
        step()
    rates = []
    cpu_rates = []
    for _ in range(repeats):
        steps = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        while steps == 0 or time.perf_counter() - start < min_seconds:
            step()
            steps += 1
        rates.append(batch_size * steps / (time.perf_counter() - start))
        # Wall time counts the minutes other processes hold the cores; CPU time does not. With all
        # threads busy, threads × images per CPU-second estimates the rate on an idle machine.
        cpu_seconds = time.process_time() - cpu_start
        cpu_rates.append(torch.get_num_threads() * batch_size * steps / cpu_seconds)
    return {
        "model": name,
        "small_stem": True,
        "feature_dim": feature_dim,
        "parameters": count_parameters(backbone),
        "memory_format": "channels_last" if channels_last else "contiguous",
        "precision": "bf16-autocast" if bf16 else "fp32",
        "images_per_second_best": round(max(rates), 1),
        "images_per_second_median": round(statistics.median(rates), 1),
        "images_per_second_from_cpu_time": round(max(cpu_rates), 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--min-seconds", type=float, default=3.0, help="each timed run takes at least this long"
    )
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--memory-formats",
        nargs="+",
        choices=("contiguous", "channels_last"),
        default=["contiguous", "channels_last"],
    )
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()  # other processes on the machine distort the timings
    results = []
    for name in args.models:
        for memory_format in args.memory_formats:
            for precision in args.precisions:
                result = measure_throughput(
                    name,
                    image_size=args.image_size,
                    batch_size=args.batch_size,
                    min_seconds=args.min_seconds,
                    warmup_steps=args.warmup_steps,
                    repeats=args.repeats,
                    channels_last=memory_format == "channels_last",
                    bf16=precision == "bf16",
                )
                results.append(result)
                print(
                    f"{name:>18} {memory_format:>13} {precision:>5}: "
                    f"{result['images_per_second_best']:8.1f} img/s best, "
                    f"{result['images_per_second_median']:8.1f} median, "
                    f"{result['images_per_second_from_cpu_time']:8.1f} from CPU time "
                    f"({result['parameters']:,} parameters, {result['feature_dim']}-d)",
                    flush=True,
                )
    report = {
        "benchmark": "backbone forward+backward throughput",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "min_seconds_per_run": args.min_seconds,
        "repeats": args.repeats,
        "cpu": cpu_name(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "results": results,
    }
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
