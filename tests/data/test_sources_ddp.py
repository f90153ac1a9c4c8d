"""Two gloo ranks: inside ``each_folder_listed_once`` an image folder is listed by rank 0
alone, and the other rank gets the same source, or rank 0's listing error; outside it each rank
lists for itself, with no collective."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from look.data import sources
from look.data.sources import _sendable, each_folder_listed_once, read_image_folder
from tests.ddp import free_port, init_gloo

pytestmark = pytest.mark.ddp

# A file name that is not UTF-8 (as copied from an old share): it must arrive as it is on disk.
LATIN_1_NAME = os.fsdecode(b"caf\xe9.png")


def _described(source: sources.ImageFolderSource) -> dict[str, object]:
    return {
        # (surrogate escapes do not go through JSON: the names as bytes, in hex)
        "paths": [os.fsencode(path).hex() for path in source.paths],
        "labels": source.labels.tolist(),
        "classes": list(source.class_names),
        "description": source.description,
        "corrupt_images": source.corrupt_images,
    }


def _worker(rank: int, port: int, root: str, out_dir: str) -> None:
    init_gloo(rank, 2, port, timeout_s=60)
    listed = sources._list_images
    try:
        if rank == 1:

            def refuse(*args: object, **kwargs: object) -> object:
                raise AssertionError("rank 1 walked the folder")

            sources._list_images = refuse
        result: dict[str, object] = {}
        with each_folder_listed_once():
            train = read_image_folder(Path(root), "train", "train", corrupt_images="skip")
            val = read_image_folder(Path(root), "train", "val", corrupt_images="fail")
            try:
                read_image_folder(Path(root), "train", "holdout", corrupt_images="fail")
                result["error"] = None
            except Exception as error:
                result["error"] = [type(error).__name__, str(error)]
        result["train"], result["val"] = _described(train), _described(val)
        sources._list_images = listed
        if rank == 1:  # alone, outside the context: a collective here would time out
            result["alone"] = _described(
                read_image_folder(Path(root), "train", "val", corrupt_images="fail")
            )
        dist.barrier()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        sources._list_images = listed
        dist.destroy_process_group()


def test_rank_zero_lists_an_image_folder_for_every_rank(
    image_folder: Path, make_png, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    make_png(image_folder / "train" / "cat" / LATIN_1_NAME, (0, 0, 0))
    mp.spawn(_worker, args=(free_port(), str(image_folder), str(tmp_path)), nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    expected_train = _described(
        read_image_folder(image_folder, "train", "train", corrupt_images="skip")
    )
    expected_val = _described(
        read_image_folder(image_folder, "train", "val", corrupt_images="fail")
    )
    assert any(path.endswith(os.fsencode(LATIN_1_NAME).hex()) for path in expected_train["paths"])
    for result in (first, second):
        assert result["train"] == expected_train and result["val"] == expected_val
    assert second["alone"] == expected_val
    # Rank 0's error, raised on rank 1 too: its type and message.
    assert first["error"][0] == "FileNotFoundError" and "'holdout' not found" in first["error"][1]
    assert second["error"] == first["error"]


class _TwoArgumentError(Exception):
    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


def test_an_error_that_does_not_pickle_is_sent_by_type_and_message() -> None:
    plain = FileNotFoundError("no such folder")
    assert _sendable(plain) is plain
    sent = _sendable(_TwoArgumentError("bad listing", "/data"))  # unpickling calls it with 1 arg
    assert isinstance(sent, RuntimeError) and str(sent) == "_TwoArgumentError: bad listing"


def _slow_worker(rank: int, port: int, root: str, out_dir: str) -> None:
    # A group that times out after 3 s, and a walk of 5 s: rank 1 waits in heartbeats of 0.5 s.
    import time

    init_gloo(rank, 2, port, timeout_s=3)
    sources._LISTING_HEARTBEAT_S = 0.5
    listed = sources._list_image_folder

    def slow(*args: object, **kwargs: object) -> sources.ImageFolderSource:
        time.sleep(5)
        return listed(*args, **kwargs)  # type: ignore[arg-type]

    try:
        sources._list_image_folder = slow  # type: ignore[assignment]
        with each_folder_listed_once():
            train = read_image_folder(Path(root), "train", "train", corrupt_images="fail")
        Path(out_dir, f"slow{rank}.json").write_text(json.dumps(_described(train)))
    finally:
        sources._list_image_folder = listed
        dist.destroy_process_group()


def test_a_listing_longer_than_the_groups_timeout_keeps_the_other_ranks_waiting(
    image_folder: Path, tmp_path: Path
) -> None:
    mp.spawn(_slow_worker, args=(free_port(), str(image_folder), str(tmp_path)), nprocs=2)
    first, second = (json.loads((tmp_path / f"slow{r}.json").read_text()) for r in (0, 1))
    assert first == second and len(first["paths"]) == 6


def _own_copy_worker(rank: int, port: int, roots: list[str], out_dir: str) -> None:
    init_gloo(rank, 2, port, timeout_s=60)
    try:
        with each_folder_listed_once():  # each rank names its own copy of the data
            train = read_image_folder(Path(roots[rank]), "train", "train", corrupt_images="fail")
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({**_described(train), "first_image": train.load(0).sum().item()})
        )
    finally:
        dist.destroy_process_group()


def test_a_rank_reads_rank_0s_listing_from_its_own_copy_of_the_folder(
    image_folder: Path, tmp_path: Path
) -> None:
    # A node's copy on its local disk: rank 0's paths, moved below that rank's data.root (they
    # once pointed into rank 0's folder, which another node may not see, or see stale).
    import shutil

    copy = tmp_path / "node-local" / "images"
    shutil.copytree(image_folder, copy)
    mp.spawn(
        _own_copy_worker,
        args=(free_port(), [str(image_folder), str(copy)], str(tmp_path)),
        nprocs=2,
        join=True,
    )
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    expected = _described(read_image_folder(copy, "train", "train", corrupt_images="fail"))
    assert second["paths"] == expected["paths"] and second["labels"] == expected["labels"]
    assert second["description"] == expected["description"]
    assert first["paths"] != second["paths"] and first["first_image"] == second["first_image"]


def _turns_worker(rank: int, port: int, out_dir: str) -> None:
    import time

    from look.data.sources import one_rank_at_a_time

    init_gloo(rank, 2, port, timeout_s=60)
    busy = Path(out_dir, "downloading")
    log = Path(out_dir, f"turns{rank}.json")

    def download() -> None:  # fails if another rank is downloading at the same time
        if busy.exists():
            raise AssertionError("two ranks downloaded at once")
        busy.touch()
        time.sleep(0.3)
        busy.unlink()
        if rank == 0:
            raise OSError("rank 0's download failed")

    outcome: dict[str, object] = {}
    try:
        one_rank_at_a_time(download)
        outcome["finished"] = True
    except OSError as error:
        outcome["error"] = str(error)
    finally:
        log.write_text(json.dumps(outcome))
        dist.destroy_process_group()


def test_downloads_take_turns_and_a_failure_keeps_no_rank_waiting(tmp_path: Path) -> None:
    # Under torchrun every rank once downloaded CIFAR or MNIST into one folder at the same time.
    mp.spawn(_turns_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    first, second = (json.loads((tmp_path / f"turns{r}.json").read_text()) for r in (0, 1))
    assert first == {"error": "rank 0's download failed"} and second == {"finished": True}
