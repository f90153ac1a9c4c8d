"""Whether a CUDA bank's int8 copy, written by its Triton kernel, is the copy
``QuantizedRows.quantize`` computes from the same rows, and how PyTorch's two ways of dividing
the scales by 127 differ (session 20: on an H200 they did, in ~1 % of rows).

    python benchmarks/int8_copy_rounding.py --output int8_copy_rounding.json   # needs CUDA

The bank is built as ``tests/test_search_cuda.py`` builds it (50,000 bf16 rows of 128 dims,
four momentum writes of 4,096 random ids). Counts are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from look.memory import MemoryBank
from look.search_triton import QuantizedRows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: on CPU the copy is written by quantize itself")
    torch.manual_seed(args.seed)
    bank = MemoryBank(50_000, 128, momentum=0.5, dtype="bf16", int8_prefilter=True).cuda()
    copy = None
    for _ in range(4):  # the first write builds the copy, the next ones go through the kernel
        ids = torch.randint(0, 50_000, (4096,), device="cuda")
        bank.update(ids, torch.randn(4096, 128, device="cuda"), torch.zeros_like(ids))
        copy = bank.search_prefilter()
    assert copy is not None
    values, scales, errors = QuantizedRows.quantize(bank.features)
    largest = bank.features.float().abs().amax(dim=1)
    by_python_scalar = largest / 127.0  # PyTorch on CUDA: a product with the reciprocal
    by_tensor = largest / largest.new_full((), 127.0)  # a correctly rounded division
    rows = bank.features.float()
    safe = torch.where(by_python_scalar > 0, by_python_scalar, 1.0)
    # the int8 values quantize computed before session 20's fix (scales divided by a scalar)
    values_by_scalar = torch.floor(rows / safe.unsqueeze(1) + 0.5).clamp_(-127, 127)
    values_by_scalar = values_by_scalar.to(torch.int8)
    figures = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": bank.size,
        "kernel_vs_quantize_values_differ": int((copy.values != values).sum()),
        "kernel_vs_quantize_scales_differ": int((copy.scales != scales).sum()),
        "kernel_vs_quantize_errors_max_relative": float(
            ((copy.errors - errors).abs() / errors.clamp_min(1e-30)).max()
        ),
        "scalar_division_vs_tensor_division_scales_differ": int(
            (by_python_scalar != by_tensor).sum()
        ),
        "kernel_vs_scalar_division_scales_differ": int((copy.scales != by_python_scalar).sum()),
        "kernel_vs_scalar_division_values_differ": int((copy.values != values_by_scalar).sum()),
        "kernel_vs_scalar_division_rows_with_other_values": int(
            (copy.values != values_by_scalar).any(dim=1).sum()
        ),
    }
    for name, value in figures.items():
        print(f"{name}: {value}")
    args.output.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
