"""Two gloo ranks on CPU: sharded extraction, and a whole evaluation, equal one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from look.data import DataSpec, build_eval_dataset
from look.evaluation import (
    KnnOptions,
    LinearProbeOptions,
    ModelSource,
    evaluate,
    extract_features,
    load_model,
    load_or_extract_features,
)
from tests.ddp import free_port, init_gloo

pytestmark = pytest.mark.ddp

WORLD_SIZE = 2
# 37 training images: shards of 19 and 18, so the gather must handle uneven sizes.
SPEC = DataSpec(
    dataset="synthetic", synthetic_num_samples=37, synthetic_num_classes=3, synthetic_image_size=12
)
SPEC_TEXT = "synthetic:samples=37,classes=3,size=12"
EVALUATE_KWARGS = {
    "labels": "fine",
    "cache_dir": None,
    "device": "cpu",
    "batch_size": 5,
    "progress": False,
    "linear_options": LinearProbeOptions(c_grid=(0.1, 1.0)),
    "knn_options": KnnOptions(ks=(3, 50)),
}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_gloo(rank, WORLD_SIZE, port, timeout_s=120)
    try:
        model = load_model(ModelSource(timm="look_cnn_small"), seed=0).backbone
        dataset, _ = build_eval_dataset(SPEC, "train")
        features = extract_features(model, dataset, batch_size=4, progress=False)
        # Fewer images than ranks: rank 1's shard is empty.
        single = torch.utils.data.Subset(dataset, [5])
        one = extract_features(model, single, batch_size=4, progress=False)
        fine_labels = torch.as_tensor(dataset.fine_labels)
        cache = Path(out_dir) / "cache"
        written = load_or_extract_features(
            model, dataset, fine_labels, cache_key="k", cache_dir=cache, progress=False
        )
        dist.barrier()  # rank 0 has written the file
        hit = load_or_extract_features(
            model, dataset, fine_labels, cache_key="k", cache_dir=cache, progress=False
        )
        report = evaluate(
            ModelSource(timm="look_cnn_small"),
            SPEC_TEXT,
            ["linear", "knn"],
            output_dir=Path(out_dir) / "ddp_eval",
            **EVALUATE_KWARGS,
        )
        torch.save(
            {
                "features": features,
                "one": one,
                "written_from_cache": written.from_cache,
                "hit_from_cache": hit.from_cache,
                "hit": hit.features,
                "protocols": json.dumps(report["protocols"]),
                "world_size": report["world_size"],
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    model = load_model(ModelSource(timm="look_cnn_small"), seed=0).backbone
    dataset, _ = build_eval_dataset(SPEC, "train")
    expected = extract_features(model, dataset, batch_size=4, progress=False)
    expected_one = extract_features(
        model, torch.utils.data.Subset(dataset, [5]), batch_size=4, progress=False
    )
    single = evaluate(
        ModelSource(timm="look_cnn_small"),
        SPEC_TEXT,
        ["linear", "knn"],
        output_dir=tmp_path / "single_eval",
        **EVALUATE_KWARGS,
    )
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["features"].shape == (37, expected.shape[1])
        torch.testing.assert_close(result["features"], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["one"], expected_one, rtol=1e-5, atol=1e-5)
        assert not result["written_from_cache"] and result["hit_from_cache"]
        assert torch.equal(result["hit"], torch.load(tmp_path / "cache" / "k.pt")["features"])
        assert result["world_size"] == WORLD_SIZE
        assert json.loads(result["protocols"]) == json.loads(json.dumps(single["protocols"]))
    written = json.loads((tmp_path / "ddp_eval" / "results.json").read_text())
    assert written["distributed"] and written["features"]["train"]["num_images"] == 37
