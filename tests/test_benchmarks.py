"""The benchmark scripts must keep running; a CPU smoke run each, with tiny sizes."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from look.search_triton import KERNEL_CONFIGS, triton_available
from tests.ddp import free_port

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run_benchmark(
    tmp_path: Path,
    script: str,
    *args: str,
    launcher: tuple[str, ...] = (),
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``benchmarks/<script>`` (under ``launcher``, e.g. torchrun) with ``--output`` in
    ``tmp_path`` and return the JSON it wrote."""
    output = tmp_path / f"{Path(script).stem}.json"
    subprocess.run(
        [sys.executable, *launcher, str(BENCHMARKS / script), *args, "--output", str(output)],
        check=True,
        capture_output=True,
        timeout=timeout,
    )
    return json.loads(output.read_text())


def test_in_step_search_times_the_fused_search_the_step_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The in-step diagnosis wraps ``look.search.fused_knn_search`` while the step runs (here a
    stand-in search that reports its phases as the real one does), averages per call and puts
    the original back."""
    import look.search as search_module

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from gpu_step import _in_step_search
    finally:
        sys.path.remove(str(BENCHMARKS))

    def stand_in(query, memory, k, *, timings=None, **_):  # type: ignore[no-untyped-def]
        timings["collect_pass"] = timings.get("collect_pass", 0.0) + 0.002
        timings["mean_candidates"] = 40.0 + query.shape[0]
        timings["hit_tile_frac"] = 0.25
        overflowed = torch.tensor([True, False, False, False])
        return torch.zeros(4, k), torch.zeros(4, k, dtype=torch.int64), overflowed

    monkeypatch.setattr(search_module, "fused_knn_search", stand_in)
    batches = iter([torch.zeros(4, 8), torch.zeros(8, 8)])

    masks = iter([torch.ones(5, dtype=torch.bool), None])  # a memory found full after one step

    def step() -> None:
        search_module.fused_knn_search(next(batches), None, 3, memory_valid=next(masks))

    figures = _in_step_search(step, 2)
    assert figures == {
        "calls": 2, "phases_ms": {"collect_pass": pytest.approx(2.0)},
        "mean_candidates": 46.0, "hit_tile_frac": 0.25, "overflow": 0.25, "masked": 0.5,
    }  # fmt: skip
    assert search_module.fused_knn_search is stand_in  # put back
    assert _in_step_search(lambda: None, 3) == {"calls": 0}


@pytest.mark.parametrize("replay", [False, True], ids=["launched", "replayed"])
def test_search_host_overhead_smoke_on_cpu(tmp_path: Path, replay: bool) -> None:
    """The host time of a search with no-op kernels (the interpreter path), launched or through
    a recording whose replay does nothing: figures for both entry points."""
    figures = _run_benchmark(
        tmp_path, "search_host_overhead.py", "--device", "cpu", "--rows", "5000", "--calls",
        "5", *(["--graph-replay"] if replay else []),
    )  # fmt: skip
    assert figures["graph_replay"] is replay
    assert figures["fused_knn_search_us"] > 0 and figures["knn_search_deferred_us"] > 0


def test_search_candidates_model_smoke(tmp_path: Path) -> None:
    """The CPU model of the fused search's bound: at least k + 1 candidates per query (the bound
    is reached by k + 1 distinct rows), more with a sparser bound pass, and a larger share of
    appended tiles for larger query blocks. Reading the int8 copy, every query keeps a superset
    of those candidates (upper bounds tested against the bound), and more with the int8 bound
    pass's looser bound; the bound passes of bins keep at least k + 1."""
    figures = _run_benchmark(
        tmp_path, "search_candidates.py", "--rows", "100000", "--queries", "64", "--k", "20",
        "--strides", "1", "4", "--block-q", "16", "64", "--int8", "--bins", "36", "39",
    )  # fmt: skip
    strides = figures["rows"]["100000"]["strides"]
    assert strides["1"]["stride_used"] == 1 and strides["4"]["stride_used"] == 4
    assert 21 <= strides["1"]["mean_candidates"] < strides["4"]["mean_candidates"]
    for entry in strides.values():
        for figures_of in (entry, entry["int8"], entry["int8_bound_pass"]):
            appended = figures_of["appended_tile_frac"]
            assert 0 < appended["16"] < appended["64"] <= 1
        # Supersets: the bf16 bound's candidates, then the looser int8 bound's.
        exact, int8, both = entry["mean_candidates"], entry["int8"], entry["int8_bound_pass"]
        assert exact < int8["mean_candidates"] < both["mean_candidates"]
        assert entry["appended_tile_frac"]["16"] <= int8["appended_tile_frac"]["16"]
        assert int8["appended_tile_frac"]["16"] <= both["appended_tile_frac"]["16"]
        # The bound passes of bins (Gluon's, Triton's): still k + 1 rows at or above the bound.
        assert entry["bins_36"]["mean_candidates"] >= 21 and entry["bins_39"]["mean_candidates"] >= 21


def test_the_bins_bound_is_a_lower_bound_attained_by_k_distinct_rows() -> None:
    """The rule of the bound passes of bins (look.search_gluon, and the Triton pass with
    bound_bins; modelled in PyTorch by search_candidates.bin_bound): the (k + 1)-th largest of
    the per-program bins is at most the (k + 1)-th largest similarity, and at least k + 1 rows
    reach it, at every stride; on rows with a partial last tile."""
    sys.path.insert(0, str(BENCHMARKS))
    import torch.nn.functional as F
    from search_candidates import bin_bound, similarity_chunks

    generator = torch.Generator().manual_seed(3)
    bank = F.normalize(torch.randn(70_001, 32, generator=generator), dim=1).bfloat16()
    query = F.normalize(torch.randn(64, 32, generator=generator), dim=1).bfloat16().float()
    similarities = torch.cat([chunk for _, chunk in similarity_chunks(query, bank)], dim=1)
    kth = similarities.topk(11, dim=1).values[:, -1]
    for config in (36, 39):
        for stride in (1, 2, 4):
            bound = bin_bound(query, bank, 10, stride, config)
            assert bool((bound <= kth).all())
            assert int((similarities >= bound[:, None]).sum(dim=1).min()) >= 11


def test_gpu_step_benchmark_smoke_on_cpu(tmp_path: Path) -> None:
    figures = _run_benchmark(
        tmp_path, "gpu_step.py", "--device", "cpu", "--backbone", "look_resnet_tiny",
        "--image-size", "16", "--batch-size", "8", "--classes", "10", "--rows", "2048",
        "--world", "4", "--k", "20", "--steps", "1", "--warmup", "1", "--scan-step",
        "--variants", "--compiled-terms", "--trace", str(tmp_path / "trace"),
        "--profile", str(tmp_path / "profile.txt"), "--prefilter-step", "--search-config", "36",
        "--graph-replay",
    )  # fmt: skip
    # The kernel config asked for is recorded (a CPU search scans: it is not used here).
    assert figures["search_config"]["kernel"] == "gluon"
    assert figures["args"]["graph_replay"] is True  # (no recording on CPU: searches scan)
    # One profiled pass gives the op table and the traces.
    assert "== look step x2" in (tmp_path / "profile.txt").read_text()
    # The traces are written; a CPU trace holds no GPU kernel to analyse, which is recorded.
    assert (tmp_path / "trace_look.json.gz").exists() and (tmp_path / "trace_ce.json.gz").exists()
    assert "no GPU kernel" in figures["trace"]["error"]
    entry = figures["rows"]["2048"]
    # The targets summary: a size that is not ImageNet's gets the larger size's step target.
    assert figures["targets"]["met"]["step_2048"] == (entry["look_over_ce"] <= 1.05)
    assert figures["targets"]["met"]["search_2048"] == (entry["search_over_read"] <= 3.0)
    assert entry["look_step_compiled_terms_ms"] > 0, entry.get("look_step_compiled_terms_error")
    assert entry["look_step_no_write_ms"] > 0 and entry["look_step_write_after_optimizer_ms"] > 0
    assert entry["look_step_pytorch_terms_ms"] > 0 and entry["look_step_masked_ms"] > 0
    assert entry["look_step_ms"] > 0 and entry["search_ms"] > 0 and entry["bank_read_ms"] > 0
    assert entry["look_scan_step_ms"] > 0 and entry["search_torch_ms"] == entry["search_ms"]
    # The step with the bank's int8 copy (the CPU scan ignores the copy, the step maintains it).
    assert entry["look_int8_step_ms"] > 0 and entry["in_step_search_int8"] == {"calls": 0}
    assert figures["targets"]["met"]["step_int8_2048"] == (entry["look_int8_over_ce"] <= 1.05)
    assert entry["queries"] == 8 and entry["look_host_syncs"] is None  # counted on CUDA only
    assert entry["in_step_search"] == {"calls": 0}  # a CPU step scans: no fused search to time
    # One rank of 4 of a sharded bank: all ranks' queries over a quarter of the rows.
    shard = figures["shards"]["2048"]
    assert shard["rows_per_rank"] == 512 and shard["queries"] == 32 and shard["search_ms"] > 0
    # The products' floor: the scan's one product of 8 queries × 2048 rows × 128 dims, at the
    # measured rate (on CPU the fused search does not apply: no bound pass counted).
    assert figures["matmul_tflops"] > 0 and entry["search_tflop"] == 2 * 8 * 2048 * 128 / 1e12
    floor_ms = entry["search_tflop"] / figures["matmul_tflops"] * 1000
    assert entry["products_floor_ms"] == pytest.approx(floor_ms)
    assert entry["search_over_products_floor"] == pytest.approx(entry["search_ms"] / floor_ms)


def test_search_flops_count_the_bound_pass_over_every_stride_th_tile() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _step_benchmark import search_flops
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert search_flops(256, 1000, 128, None) == 2 * 256 * 1000 * 128
    assert search_flops(256, 1000, 128, 4) == 2 * 256 * 1000 * 128 * 1.25


def test_search_ncu_target_names_the_configs_it_can_profile() -> None:
    """The Nsight Compute target and search_tune.py need CUDA; on CPU their command lines at
    least parse, and gpu_session.sh profiles the default reading the bf16 bank and its int8
    copy, and times the configs session 12 left untimed (s = 8, TMA copies) both ways."""
    usage = {}
    for script in ("search_ncu.py", "search_tune.py"):
        usage[script] = subprocess.run(
            [sys.executable, str(BENCHMARKS / script), "--help"],
            check=True, capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
        assert "--configs" in usage[script] and "--prefilter" in usage[script]
    session = (BENCHMARKS / "gpu_session.sh").read_text()
    assert "search_ncu.py --rows 14197122 --configs 0 36 --prefilter none int8" in session
    assert "search_tune.py --configs 0 1 29 32 33 34 35 39" in session
    # Session 15's CUDA graph replay: timed against launching, and the host time of a search.
    assert "search_tune.py --configs 0 29 36 --graph-replay" in session
    assert "tests/test_search_cuda.py -k replayed" in session  # its test, in part 2 only
    assert '-k "not replayed"' in session  # (part 1's CUDA tests)
    cuda_search_tests = (BENCHMARKS.parent / "tests" / "test_search_cuda.py").read_text()
    assert "def test_replayed_searches_find_what_eager_ones_do(" in cuda_search_tests
    assert "search_host_overhead.py --device cuda" in session  # (its smoke test runs it on CPU)
    assert "--graph-replay" in usage["search_tune.py"]
    # Session 14's Gluon passes: their CUDA tests and timings in part 1.
    assert "tests/test_search_gluon_cuda.py" in session
    # Session 23's candidates: config 36 with its collect pass's tiles in pairs, and also
    # freeing its buffers a pair at a time, timed alone, in the step (the fastest) and under
    # Nsight Compute (a config list shifted by one would time another).
    assert KERNEL_CONFIGS[40] == dataclasses.replace(KERNEL_CONFIGS[36], gluon_tile_pairs=True)
    assert KERNEL_CONFIGS[41] == dataclasses.replace(KERNEL_CONFIGS[40], gluon_pair_release=True)
    assert "search_tune.py --configs 0 36 37 38 40 41 --prefilter none" in session
    assert '--fastest-exact 14197122' in session and '--search-config "$fastest"' in session
    assert "search_ncu.py --rows 14197122 --configs 36 40 41 --prefilter none" in session
    # When they fail, each pass alone against the reference: the -k selects a test that exists.
    assert "-k writes_what_the_reference" in session
    cuda_tests = (BENCHMARKS.parent / "tests" / "test_search_gluon_cuda.py").read_text()
    assert "def test_each_gluon_pass_writes_what_the_reference_does(" in cuda_tests
    assert all(KERNEL_CONFIGS[i].kernel == "gluon" for i in (36, 37, 38))
    assert KERNEL_CONFIGS[39].bound_bins and KERNEL_CONFIGS[39].kernel == "triton"
    assert KERNEL_CONFIGS[32].tile_stride == 8
    assert KERNEL_CONFIGS[33].loads == KERNEL_CONFIGS[34].loads == "tma"
    assert KERNEL_CONFIGS[35].int8_bound_pass


def test_the_fastest_exact_config_is_read_from_search_tune_figures() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from search_tune import fastest_exact

    def entry(position: int, ms: float, **flags: object) -> dict[str, object]:
        return {"position": position, "ms": ms, "exact": True, "prefilter": "none", **flags}

    figures = {"rows": {"100": {"configs": [
        entry(0, 4.0), entry(36, 2.0, gluon_failed=True),  # the Triton pass's time, not Gluon's
        entry(37, 3.0, exact=False), entry(1, 1.0, prefilter="int8"), entry(38, 3.5),
        entry(0, 0.5, variant="tile_stride=8"),  # a variant is no config of the list
    ]}}}  # fmt: skip
    assert fastest_exact(figures, 100) == 38
    assert fastest_exact(figures, 200) == ""


def test_search_tune_variants_replace_fields_of_a_listed_config() -> None:
    import argparse

    sys.path.insert(0, str(BENCHMARKS))
    from search_tune import parse_variant

    position, label, config = parse_variant("36:tile_stride=8,num_stages=4,skip_empty_tiles=false")
    assert (position, label) == (36, "tile_stride=8,num_stages=4,skip_empty_tiles=false")
    assert config == dataclasses.replace(
        KERNEL_CONFIGS[36], tile_stride=8, num_stages=4, skip_empty_tiles=False
    )
    assert parse_variant("0:loads=tma")[2].loads == "tma"
    for wrong, says in [
        ("36", "POSITION:FIELD=VALUE"), ("x:tile_stride=8", "POSITION:FIELD=VALUE"),
        ("999:tile_stride=8", "no config at position 999"), ("36:stride=8", "'stride=8'"),
        ("36:tile_stride=eight", "takes an integer"), ("36:bound_bins=yes", "true or false"),
    ]:  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            parse_variant(wrong)
    # The variants gpu_session.sh times parse (a typo there would cost a GPU session's stage).
    session = (BENCHMARKS / "gpu_session.sh").read_text()
    variants = re.findall(r"--variant (\S+)", session)
    assert len(variants) == 5 and {parse_variant(v)[0] for v in variants} == {36, 41}


def test_ncu_summary_keeps_each_launchs_metrics(tmp_path: Path) -> None:
    header = (
        '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
        '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
        '"Metric Value"'
    )

    def row(launch: int, kernel: str, metric: str, unit: str, value: str) -> str:
        return (
            f'"{launch}","1","python","h","{kernel}","1","7","(128, 1, 1)","(4, 264, 1)","0",'
            f'"9.0","GPU Speed Of Light Throughput","{metric}","{unit}","{value}"'
        )

    listing = "\n".join([
        "config 0 SearchKernelConfig(...): 5.1 ms",  # the program's own output
        header,
        row(0, "void at::vectorized_elementwise_kernel<4>", "Duration", "ns", "2,912"),
        row(1, "_knn_tiles_kernel", "Duration", "ns", "1,133,760"),
        row(1, "_knn_tiles_kernel", "L2 Hit Rate", "%", "61.82"),
        row(1, "_knn_tiles_kernel", "Registers Per Thread", "register", "47"),
        row(2, "_kth_largest_kernel", "Duration", "ns", "8,672"),
    ])  # fmt: skip
    (tmp_path / "ncu.csv").write_text(listing)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from search_ncu import summarize
    finally:
        sys.path.remove(str(BENCHMARKS))
    launches = summarize(tmp_path / "ncu.csv")
    assert [launch["kernel"] for launch in launches] == ["_knn_tiles_kernel", "_kth_largest_kernel"]
    assert launches[0]["Duration"] == 1_133_760.0 and launches[0]["L2 Hit Rate"] == 61.82
    assert "Registers Per Thread" not in launches[0]  # not a summary metric
    assert launches[0]["units"] == {"Duration": "ns", "L2 Hit Rate": "%"}
    (tmp_path / "empty.csv").write_text("no ncu rows here\n")
    with pytest.raises(ValueError, match="no ncu CSV rows"):
        summarize(tmp_path / "empty.csv")


def test_trace_gaps_attributes_each_idle_stretch_to_the_launch_that_ended_it() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _trace_gaps import difference_by_op, idle_gaps
    finally:
        sys.path.remove(str(BENCHMARKS))

    def span(cat: str, name: str, ts: float, dur: float, **args: object) -> dict[str, Any]:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}

    events = [
        span("user_annotation", "step/forward", 0, 100),
        span("cpu_op", "aten::mm", 5, 10),
        span("cuda_runtime", "cudaLaunchKernel", 6, 2, correlation=1),
        span("user_annotation", "step/after_optimizer_step", 150, 60),
        span("cpu_op", "aten::index_put_", 190, 15),
        span("cuda_runtime", "cudaLaunchKernel", 195, 3, correlation=2),
        span("kernel", "gemm", 10, 40, correlation=1),  # busy 10..50
        span("kernel", "overlapping", 30, 30),  # busy to 60
        span("gpu_memset", "memset", 65, 2),  # a 5 us gap: below the threshold
        span("kernel", "scatter", 200, 20, correlation=2),  # 133 us idle before it
    ]
    summary = idle_gaps(events, min_gap_us=10.0)
    assert summary["span_ms"] == pytest.approx(0.210)
    assert summary["busy_ms"] == pytest.approx(0.072)
    assert summary["idle_ms"] == pytest.approx(0.138)  # both gaps, reported or not
    [gap] = summary["largest_gaps"]
    assert gap["idle_us"] == pytest.approx(133.0) and gap["next_kernel"] == "scatter"
    assert gap["host_op"] == "aten::index_put_" and gap["phase"] == "step/after_optimizer_step"
    assert summary["idle_ms_by_phase"] == {"step/after_optimizer_step": pytest.approx(0.133)}
    # Kernels' own time by the phase they were launched in (the memset and the second kernel
    # have no launch in the trace).
    assert summary["busy_ms_by_phase"] == {
        "step/forward": pytest.approx(0.040),
        "None": pytest.approx(0.032),
        "step/after_optimizer_step": pytest.approx(0.020),
    }
    with pytest.raises(ValueError, match="no GPU kernel"):
        idle_gaps([span("cpu_op", "aten::mm", 0, 1)])
    # Against a baseline trace of the same steps: GPU time and kernels per step, per host op.
    baseline = [
        span("cpu_op", "aten::mm", 5, 10),
        span("cuda_runtime", "cudaLaunchKernel", 6, 2, correlation=7),
        span("kernel", "gemm", 10, 30, correlation=7),
    ]
    rows = {row["host_op"]: row for row in difference_by_op(events, baseline, steps=2)}
    assert rows["aten::mm"]["ms_per_step"] == pytest.approx(0.005)  # (40 - 30) us / 2 steps
    assert rows["aten::index_put_"]["kernels_per_step"] == 0.5
    assert rows["(kernel) memset"]["ms_per_step"] == pytest.approx(0.001)


def test_cpu_step_benchmark_smoke(tmp_path: Path) -> None:
    report = _run_benchmark(
        tmp_path, "cpu_step.py", "--batch-size", "16", "--rows", "400", "--k", "100",
        "--steps", "1", "--warmup-steps", "0",
    )  # fmt: skip
    assert report["k"] == 100 and report["bank_rows"] == 400
    assert set(report["seconds_median"]) == {
        "ce_step", "look_step", "look_step_scan", "look_loss_forward_backward",
        "look_loss_forward_backward_scan", "knn_search", "product", "selection",
    }  # fmt: skip
    assert all(seconds > 0 for seconds in report["seconds_median"].values())


def test_ddp_step_benchmark_smoke_with_two_gloo_ranks(tmp_path: Path) -> None:
    report = _run_benchmark(
        tmp_path, "ddp_step.py", "--device", "cpu", "--backbone", "look_cnn_small",
        "--image-size", "28", "--batch-size", "8", "--rows", "3000", "--k", "20",
        "--classes", "10", "--memory-dtype", "float32", "--steps", "1", "--warmup", "1",
        launcher=(
            "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(free_port()),
        ),
        timeout=300,
    )  # fmt: skip
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    bank, sharded = report["memories"]["bank"], report["memories"]["sharded_bank"]
    assert bank["step_ms"] > 0 and sharded["step_ms"] > 0 and sharded["loss_ms"] > 0
    # Each rank holds half of the rows.
    assert sharded["bank_mb_per_rank"] < 0.6 * bank["bank_mb_per_rank"]


def test_nca_memory_benchmark_smoke(tmp_path: Path) -> None:
    report = _run_benchmark(
        tmp_path, "nca_memory.py", "--rows", "3000", "--batch-size", "8", "--dim", "16",
        timeout=300,
    )  # fmt: skip
    assert report["kept"]["seconds"] > 0 and report["recomputed"]["seconds"] > 0


def test_data_listing_benchmark_times_each_step_at_a_small_size(tmp_path: Path) -> None:
    report = _run_benchmark(
        tmp_path, "data_listing.py", "--classes", "20", "--paths", "2000", timeout=300
    )
    steps = {row["what"] for row in report["rows"]}
    assert steps == {"listing", "identity_paths", "listing_broadcast", "class_members"}
    (sent,) = [row for row in report["rows"] if row["what"] == "listing_broadcast"]
    # 2,000 paths of ~45 bytes, 21,000 class names of ~12 and 8-byte labels: one buffer each
    # (~0.4 MB), not a pickled object per path.
    assert sent["paths"] == 2000 and 0.3 < sent["mb"] < 0.6
    assert sent["send_s"] >= 0 and sent["receive_s"] >= 0


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux's smaps_rollup")
def test_a_dataloader_worker_copies_no_image_folder_paths(tmp_path: Path) -> None:
    """A forked worker that reads every path of a 200k-image folder copies ~1.5 MB of its
    parent's memory (its own batches); with the paths as a tuple of strings it copied ~21 MB
    (every string's reference count written)."""
    report = _run_benchmark(
        tmp_path, "loader_memory.py", "--paths", "200000", "--workers", "1", timeout=300
    )
    (worker,) = report["per_worker"]
    assert worker["images"] == 200_000
    assert worker["copied_mb"] < 8, worker


def test_kernel_resources_benchmark_reads_registers_and_loop_instructions(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    # The default, a 128 x 64 tile with pointer and with TMA loads (every config's compile and
    # wgmma are checked by tests/test_search_triton_compile.py).
    positions = [0] + [
        i for i, config in enumerate(KERNEL_CONFIGS)
        if (config.block_q, config.block_n, config.collect) == (128, 64, "atomic")
        and config.skip_empty_tiles
    ]  # fmt: skip
    report = _run_benchmark(
        tmp_path, "kernel_resources.py", "--configs", *map(str, positions), timeout=600
    )
    assert report["capability"] == 90 and len(report["kernels"]) >= 2
    assert all(0 < kernel["reg"] <= 255 for kernel in report["kernels"])
    assert all(kernel["blocks_per_sm"] >= 1 for kernel in report["kernels"])
    assert len(report["kernels"]) == 2 * len(positions)
    assert all(kernel["wgmma_serialized"] is None for kernel in report["kernels"])
    # The issue-slot proxy: every pass has a tile loop; a 128 x 64 tile's collect pass spends
    # fewer warp instructions per similarity than the default 64 x 32 one.
    assert all(0 < kernel["warp_instructions_per_similarity"] < 4 for kernel in report["kernels"])
    default = report["kernels"][1]  # KERNEL_CONFIGS[0], collect pass
    assert (default["block_q"], default["block_n"], default["pass"]) == (64, 32, "collect")
    larger = [
        kernel for kernel in report["kernels"]
        if (kernel["block_q"], kernel["block_n"], kernel["pass"]) == (128, 64, "collect")
        and kernel["skip_empty_tiles"] and kernel["collect"] == "atomic"
    ]  # fmt: skip
    assert larger and all(
        kernel["warp_instructions_per_similarity"] < default["warp_instructions_per_similarity"]
        for kernel in larger
    )
    assert {kernel["kernel"] for kernel in report["loss_terms_kernels"]} == {
        "terms_forward", "terms_backward",
    }  # fmt: skip


def test_the_loop_path_skips_appends_but_not_a_pairs_second_tile() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from kernel_resources import main_loop_path
    finally:
        sys.path.remove(str(BENCHMARKS))
    # A loop over two tiles: each waits for its product, meets a warpgroup barrier and may
    # skip its append; the second tile is guarded (the last turn of an odd count skips it).
    listing = [
        (0x00, "HGMMA.64x32x16.F32.BF16 R24, R68, gdesc[UR8], RZ, !UPT"),
        (0x10, "BAR.SYNC.DEFER_BLOCKING 0x2, 0x80"),
        (0x20, "@!P0 BRA 0x40"),  # no candidate: the append is skipped
        (0x30, "ATOMG.E.ADD.STRONG.GPU PT, R2, desc[UR4][R4.64], R5"),
        (0x40, "@P1 BRA 0x90"),  # an odd count's last turn: the second tile is skipped
        (0x50, "HGMMA.64x32x16.F32.BF16 R24, R68, gdesc[UR8], RZ, !UPT"),
        (0x60, "BAR.SYNC.DEFER_BLOCKING 0x2, 0x80"),
        (0x70, "ATOMG.E.ADD.STRONG.GPU PT, R2, desc[UR4][R4.64], R5"),
        (0x80, "BRA 0xa0"),  # past the other path's barrier
        (0x90, "BAR.SYNC.DEFER_BLOCKING 0x2, 0x80"),
        (0xA0, "@P2 BRA 0x0"),  # the loop's latch
        (0xB0, "EXIT"),
    ]
    path = main_loop_path(listing)
    assert path is not None
    assert [text for text in path if "ATOMG" in text] == [listing[7][1]]  # only the 2nd append
    assert sum("HGMMA" in text for text in path) == 2
    assert sum("BAR.SYNC" in text for text in path) == 2
    assert main_loop_path(listing[1:4]) is None  # no product, no loop


def test_blocks_per_sm_is_bounded_by_registers_or_shared_memory() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from kernel_resources import blocks_per_sm
    finally:
        sys.path.remove(str(BENCHMARKS))
    # sm_90: 145 registers -> 152 per thread, 19,456 per block: 3 fit 65,536.
    assert blocks_per_sm(145, 40 * 1024, 4, 90) == 3
    # 94 registers -> 96: 5 by registers; 56 KB + 1 KB reserved: 4 fit 228 KB.
    assert blocks_per_sm(94, 57344, 4, 90) == 4
    assert blocks_per_sm(94, 57345, 4, 90) == 3
    assert blocks_per_sm(94, 40960, 4, 90) == 5  # 41 KB: 5 by shared memory
    assert blocks_per_sm(32, 0, 4, 90) == 16  # 2,048 threads per SM
    assert blocks_per_sm(64, 0, 4, 61) is None  # unknown GPU


def test_interleaved_timing_alternates_blocks_and_takes_each_median() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _step_benchmark import interleaved_median_ms
    finally:
        sys.path.remove(str(BENCHMARKS))
    calls: list[str] = []
    interleaved_median_ms(
        lambda: calls.append("a"), lambda: calls.append("b"), rounds=3, steps=2, warmup=1,
        device=torch.device("cpu"),
    )  # fmt: skip
    # Round 1: a warm-up then 2 timed of each; later rounds settle with 1 repetition.
    assert "".join(calls) == "aaabbb" + "aaabbb" * 2
    slow, fast = interleaved_median_ms(
        lambda: time.sleep(0.02), lambda: None, rounds=2, steps=2, warmup=0,
        device=torch.device("cpu"),
    )  # fmt: skip
    assert slow >= 20.0 > fast


def test_training_length_plot_from_ablation_files(tmp_path: Path) -> None:
    rows = [
        {"name": "ce", "seed": s, "linear_top1": 80.0 + s, "epochs": e, "train_subset": 100}
        for s in (0, 1)
        for e in (3, 10)
    ]
    (tmp_path / "a.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "a2.json").write_text(json.dumps({"rows": rows[:1]}))  # a repeated run counts once
    plan = {"plan": {"epochs": 3, "train_subset": 100}}
    (tmp_path / "b.json").write_text(
        json.dumps({**plan, "rows": [{"name": "look_k5_e3", "seed": 0, "linear_top1": 70.0}]})
    )
    output = tmp_path / "curve.png"
    completed = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "plot_training_length.py"),
            str(tmp_path / "a.json"),
            str(tmp_path / "a2.json"),
            str(tmp_path / "b.json"),
            "--output",
            str(output),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert output.stat().st_size > 0
    assert "ce                       3 ep: 80.50 (n=2), 10 ep: 80.50 (n=2)" in completed.stdout
    assert "look_k5                  3 ep: 70.00 (n=1)" in completed.stdout


def test_k_sweep_plot_takes_only_runs_that_vary_k(tmp_path: Path) -> None:
    def look(k: int, seed: int, probe: float, **options: object) -> dict[str, object]:
        method = {"name": "look", "k": k, "temperature": 0.1, **options}
        return {"name": f"look_k{k}", "seed": seed, "linear_top1": probe, "knn20_top1": probe - 5,
                "saturated_frac": 1.0 / k, "dropped_frac": 0.0, "method": json.dumps(method)}  # fmt: skip

    rows = [
        look(5, 0, 70.0), look(5, 1, 72.0), look(50, 0, 78.0),
        look(50, 1, 10.0, memory_init="warmup"),  # another experiment: left out
        {"name": "ce", "seed": 0, "linear_top1": 80.0},
        {"name": "ce", "seed": 0, "linear_top1": 1.0, "epochs": 10},  # another budget: left out
    ]  # fmt: skip
    plan = {"plan": {"epochs": 3, "train_subset": 10_000}}
    (tmp_path / "a.json").write_text(json.dumps({**plan, "rows": rows}))
    output = tmp_path / "k.png"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "plot_k_sweep.py"), str(tmp_path / "a.json"),
         "--output", str(output)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert output.stat().st_size > 0
    assert "| 0.1 | 5 | 2 | 71.00 ± 1.41 | 66.00 | 20.0 % | 0.0 % |" in completed.stdout
    assert "| 0.1 | 50 | 1 | 78.00 | 73.00 | 2.0 % | 0.0 % |" in completed.stdout
    assert "CE: 80.00 over 1 seeds" in completed.stdout


def test_summarize_ablations_means_over_seeds_and_dedupes(tmp_path: Path) -> None:
    rows = [
        {
            "name": "look_k5",
            "seed": 0,
            "linear_top1": 70.0,
            "knn20_top1": 60.0,
            "saturated_frac": 0.1,
        },
        {
            "name": "look_k5",
            "seed": 1,
            "linear_top1": 72.0,
            "knn20_top1": 62.0,
            "saturated_frac": 0.3,
        },
        {"name": "ce", "seed": 0, "linear_top1": 71.0, "knn20_top1": 61.0},
    ]
    (tmp_path / "a.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "b.json").write_text(json.dumps({"rows": rows[:1]}))  # a repeated run counts once
    completed = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "summarize_ablations.py"),
            *map(str, tmp_path.glob("*.json")),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "| look_k5 | 2 | 71.00 ± 1.41 | 61.00 ± 1.41 | 20.0 % |" in completed.stdout
    assert "| ce | 1 | 71.00 | 61.00 | — |" in completed.stdout


def test_look_step_ops_benchmark_counts_more_operations_for_look(tmp_path: Path) -> None:
    report = _run_benchmark(tmp_path, "look_step_ops.py", timeout=300)
    assert report["look"]["forward"] > report["ce"]["forward"] > 0
    # A logged step adds the diagnostics' operations; the others (the trainer's 9 in 10) do not.
    assert report["look_logged"]["forward"] > report["look"]["forward"]
    assert report["ce_logged"]["forward"] > report["ce"]["forward"]
    # Under the accelerator policy LOOK writes its memory after the optimizer step.
    assert report["look"]["after_optimizer_step"] == report["look_parts"]["memory_write"] > 0
    # Keeping the int8 copy in step costs the write a few operations (quantise, three stores,
    # two running bounds).
    parts = report["look_parts"]
    assert parts["memory_write_bf16"] < parts["memory_write_bf16_with_int8_copy"]
    if triton_available():  # the fused loss terms, in Triton's interpreter: fewer kernels
        for phase in ("forward", "backward"):
            assert report["look"][phase] < report["look_pytorch_terms"][phase]
        parts = report["look_parts"]
        assert parts["look_loss_terms_backward"] < parts["look_loss_terms_backward_pytorch_terms"]
        assert parts["fused_search"] > 2  # its two kernel passes and the selections around them


def test_summarize_ablations_pairs_seeds_with_a_baseline(tmp_path: Path) -> None:
    rows = [
        *({"name": "ce", "seed": s, "linear_top1": 70.0, "knn20_top1": 60.0} for s in range(3)),
        # +1, +2, +3 on the probe: mean 2, interval 2 ± 4.303 · 1 / √3 = [-0.48, +4.48].
        *(
            {"name": "look", "seed": s, "linear_top1": 71.0 + s, "knn20_top1": 65.0 + s}
            for s in range(3)
        ),
        {"name": "look", "seed": 0, "epochs": 10, "linear_top1": 1.0, "knn20_top1": 1.0},
    ]
    (tmp_path / "a.json").write_text(json.dumps({"plan": {"epochs": 3}, "rows": rows}))
    command = [sys.executable, str(BENCHMARKS / "summarize_ablations.py"), str(tmp_path / "a.json")]
    completed = subprocess.run(
        [*command, "--paired-with", "ce"], check=True, capture_output=True, text=True
    )
    # The 10-epoch run has no 10-epoch CE partner and is not paired.
    assert "+2.00 [-0.48, +4.48] no clear difference | +6.00 [+3.52, +8.48] better |" in (
        completed.stdout
    )
    (tmp_path / "other.json").write_text(json.dumps({"step_ms": 3.0}))
    failed = subprocess.run(
        [*command, str(tmp_path / "other.json")], capture_output=True, text=True
    )
    assert failed.returncode != 0 and "is not a result file of ablate_look.py" in failed.stderr


def test_issue_targets_read_session_8s_h100_figures() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from gpu_step import issue_targets
    finally:
        sys.path.remove(str(BENCHMARKS))
    figures = json.loads((BENCHMARKS / "results" / "h100_gpu_step_s8.json").read_text())
    targets = issue_targets(figures["rows"])
    # 1.036 and 1.110 x CE, 8.7 and 3.7 x the bank read: none met (docs/results.md).
    assert targets["met"] == {
        "step_1281167": False, "search_1281167": False,
        "step_14197122": False, "search_14197122": False,
    }  # fmt: skip
    assert any("1.036 x CE (target <= 1.02): not met" in line for line in targets["lines"])


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_compile_with_triton_compiles_every_kernel_with_the_given_triton(tmp_path: Path) -> None:
    """Pointed at an unpacked Triton (here the installed one), the script compiles the passes
    with and without the int8 copy and with and without the valid mask, the selections and the
    copy's helpers, and says which Triton; a directory without Triton is refused."""
    import triton

    site = str(Path(triton.__file__).resolve().parents[1])
    report = _run_benchmark(
        tmp_path, "compile_with_triton.py", "--triton-dir", site, "--configs", "0",
        "--capabilities", "90",
    )  # fmt: skip
    assert report["triton"] == triton.__version__ and report["failed"] == 0
    names = {row["kernel"] for row in report["kernels"]}
    assert "config 0 collect pass int8" in names and "int8 write" in names
    assert "config 0 collect pass int8 no valid" in names and "config 0 bound pass" in names
    assert len(names) == 2 * 2 * 2 + 4  # passes × int8 copy × valid mask, and four helpers
    refused = subprocess.run(
        [sys.executable, str(BENCHMARKS / "compile_with_triton.py"), "--triton-dir",
         str(tmp_path), "--output", str(tmp_path / "x.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 2 and "holds no triton package" in refused.stderr
