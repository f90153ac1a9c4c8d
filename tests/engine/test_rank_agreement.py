"""Two gloo ranks given different settings (a node's own --set) stop before training, every rank
naming the settings; a node may read its own copy of the data from another path."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from look.config import ConfigError, load_config
from look.engine.trainer import Trainer
from tests.data.conftest import write_png
from tests.ddp import free_port, set_torchrun_environment
from tests.engine.test_trainer import TINY

pytestmark = pytest.mark.ddp


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """root/train/{cat,dog}/ with 3 images each."""
    root = tmp_path / "images"
    for name, colour in {"cat": (200, 30, 30), "dog": (30, 30, 200)}.items():
        for i in range(3):
            write_png(root / "train" / name / f"{i}.png", colour)
    return root


def _worker(
    rank: int, port: int, out_dir: str, per_rank: list[list[str]], check: bool = False
) -> None:
    set_torchrun_environment(rank, 2, port)
    # Two nodes of one process each, as torchrun describes them.
    os.environ.update({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    torch.set_num_threads(1)
    outcome: dict[str, object] = {}
    try:
        cfg = load_config(None, [*TINY, "train.ddp_timeout_s=60", *per_rank[rank]])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = Trainer(cfg, Path(out_dir) / "run")
        outcome["built"] = trainer.data_identity["sha256"]
        outcome["warned"] = [str(warning.message) for warning in caught]
        if check:
            checked, unreadable = trainer.check_images()
            outcome["checked"] = [checked, [image.path for image in unreadable]]
            outcome["skipped"] = list(trainer.dataset.source.skipped_files)
    except ConfigError as error:
        outcome["error"] = str(error)
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcome))
        torch.distributed.destroy_process_group()


def _run(tmp_path: Path, per_rank: list[list[str]], check: bool = False) -> list[dict[str, Any]]:
    mp.spawn(_worker, args=(free_port(), str(tmp_path), per_rank, check), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_ranks_started_with_different_settings_stop_naming_them(tmp_path: Path) -> None:
    outcomes = _run(tmp_path, [[], ["method.temperature=0.5", "optim.lr=0.01"]])
    for outcome in outcomes:
        assert "built" not in outcome
        message = outcome["error"]
        assert message.startswith("the ranks of this job differ in their configuration: ")
        assert "method.temperature: rank 0 0.1 vs rank 1 0.5" in message
        assert "optim.lr: rank 0 0.1 vs rank 1 0.01" in message
    assert not (tmp_path / "run").exists(), "nothing written"


def test_nodes_whose_grouping_files_differ_stop_naming_the_data(
    tmp_path: Path, image_folder: Path
) -> None:
    groupings = []
    for rank, (cat, dog) in enumerate((("animal", "animal"), ("animal", "pet"))):
        path = tmp_path / f"rank{rank}" / "groups.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"fine_to_coarse": {"cat": cat, "dog": dog}}))
        groupings.append(path)
    shared = ["data.dataset=imagefolder", "optim.batch_size=2", f"data.root={image_folder}"]
    outcomes = _run(tmp_path, [[*shared, f"data.labels={path}"] for path in groupings])
    for outcome in outcomes:
        assert "differ in their training data" in outcome.get("error", ""), outcome


def test_nodes_may_read_their_own_copies_each_checking_every_image_and_rank_0_warns(
    tmp_path: Path, image_folder: Path
) -> None:
    # A node's copy on its local disk, read with its own loader workers. Each node checks every
    # file of its copy (rank 0's share would leave a file only rank 1's copy lacks unchecked),
    # and a warning of the method's is said once, by rank 0.
    copy = tmp_path / "node-local" / "images"
    shutil.copytree(image_folder, copy)
    broken = copy / "train" / "cat" / "0.png"
    broken.write_bytes(b"not a png")
    shared = ["data.dataset=imagefolder", "optim.batch_size=2", "data.corrupt_images=skip"]
    shared.append("method.k=1")  # (a warning: LOOK with k = 1 learns nothing)
    outcomes = _run(
        tmp_path,
        [
            [*shared, f"data.root={image_folder}"],
            [*shared, f"data.root={copy}", "data.num_workers=1", "train.progress=true"],
        ],
        check=True,
    )
    assert outcomes[0]["built"] == outcomes[1]["built"], outcomes
    for rank, outcome in enumerate(outcomes):
        assert outcome["checked"] == [6, [str(broken)]], outcome
        own = image_folder if rank == 0 else copy
        assert outcome["skipped"] == [str(own / "train" / "cat" / "0.png")]
    assert any("learns nothing" in message for message in outcomes[0]["warned"]), outcomes
    assert not any("learns nothing" in message for message in outcomes[1]["warned"]), outcomes
