"""``Trainer.check_images``: every training image decoded once before the first step, each rank
a share under DDP, with the same verdict on every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from look.data import CorruptImageError
from look.engine.trainer import Trainer
from tests.engine.test_trainer import tiny_config


def write_image_folder(root: Path, *, broken: int, per_class: int = 8) -> list[Path]:
    """root/train/{a,b}/ with ``per_class`` PNGs each, the last ``broken`` of class b not images;
    returns the broken files."""
    for name, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        for i in range(per_class):
            path = root / "train" / name / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), colour).save(path)
    bad = [root / "train" / "b" / f"{i:02d}.png" for i in range(per_class - broken, per_class)]
    for path in bad:
        path.write_bytes(b"not a png")
    return bad


def image_folder_overrides(root: Path, *extra: str) -> tuple[str, ...]:
    return (
        "data.dataset=imagefolder", f"data.root={root}", "data.image_size=16", "method.k=4",
        "optim.batch_size=8", *extra,
    )  # fmt: skip


def test_fail_names_the_first_ten_counts_the_rest_and_lists_every_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_image_folder(tmp_path / "images", broken=12, per_class=14)
    trainer = Trainer(tiny_config(*image_folder_overrides(tmp_path / "images")), tmp_path / "r")
    with pytest.raises(CorruptImageError) as info:
        trainer.check_images()
    message = str(info.value)
    assert message.startswith("12 of 28 training images cannot be decoded: ")
    assert all(str(path) in message for path in bad[:10]) and str(bad[10]) not in message
    assert "and 2 more (every one is listed above)" in message
    assert "data.corrupt_images=skip" in message
    listed = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in listed] == [
        f"look: unreadable training image {path}" for path in bad
    ]


def test_a_class_left_without_a_readable_image_fails_even_with_skip(tmp_path: Path) -> None:
    # Every file of class b unreadable (Git LFS pointers saved as .png): skip has nothing to
    # put in their place, and the run used to stop at the first batch holding class b.
    write_image_folder(tmp_path / "images", broken=8)
    overrides = image_folder_overrides(tmp_path / "images", "data.corrupt_images=skip")
    trainer = Trainer(tiny_config(*overrides), tmp_path / "r")
    with pytest.raises(CorruptImageError, match="no training image of class\\(es\\) 'b' can be"):
        trainer.check_images()


def test_skip_returns_every_unreadable_file(tmp_path: Path) -> None:
    bad = write_image_folder(tmp_path / "images", broken=2)
    overrides = image_folder_overrides(tmp_path / "images", "data.corrupt_images=skip")
    trainer = Trainer(tiny_config(*overrides), tmp_path / "r")
    checked, unreadable = trainer.check_images()
    assert checked == 16 and [image.path for image in unreadable] == [str(p) for p in bad]
    # The source knows them: the loader will replace them without a warning of its own.
    assert trainer.dataset.source.skipped_files == tuple(str(p) for p in bad)


def _check_on_rank(rank: int, port: int, root: str, out: str) -> None:
    from tests.ddp import set_torchrun_environment

    set_torchrun_environment(rank, 2, port)
    torch.set_num_threads(1)
    overrides = image_folder_overrides(Path(root), "data.corrupt_images=skip")
    checked, unreadable = Trainer(tiny_config(*overrides), Path(out) / "run").check_images()
    result = {"checked": checked, "unreadable": [image.path for image in unreadable]}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.ddp
def test_two_ranks_share_the_work_and_agree(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from tests.ddp import free_port

    bad = write_image_folder(tmp_path / "images", broken=3)
    mp.spawn(_check_on_rank, args=(free_port(), str(tmp_path / "images"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = {"checked": 16, "unreadable": sorted(str(p) for p in bad)}
    assert results == [expected, expected]


def test_a_run_counts_the_images_it_replaced_in_its_summary(tmp_path: Path) -> None:
    # reliability.md says replaced images are counted: only the log's warnings said so.
    from look.engine.trainer import pretrain

    bad = write_image_folder(tmp_path / "images", broken=2)
    overrides = image_folder_overrides(
        tmp_path / "images", "data.corrupt_images=skip", "train.max_steps=2"
    )
    with pytest.warns(RuntimeWarning, match="another image of its class takes its place"):
        pretrain(tiny_config(*overrides), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    replaced = summary["unreadable_images_replaced_examples"]
    assert summary["unreadable_images_replaced_this_session"] == len(replaced) >= 1
    assert set(replaced) <= {str(path) for path in bad}
