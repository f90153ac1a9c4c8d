from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from look.evaluation.commands import _print_summary, register, run
from look.evaluation.fewshot import FewShotEpisodesWarning
from look.evaluation.linear_probe import LinearProbeConvergenceWarning
from tests.evaluation.conftest import SYNTHETIC_SPEC


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="look")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--checkpoint",
        "--timm",
        "--weights",
        "--small-stem",
        "--timm-kwargs",
        "--dataset",
        "--protocol",
        "--labels",
        "--image-size",
        "--device",
        "--batch-size",
        "--num-workers",
        "--cache-dir",
        "--cache-max-gb",
        "--seed",
        "--head",
        "--output",
        "--knn-k",
        "--finetune-epochs",
        "--fewshot-shots",
        "--corrupt-images",
        "--train-subset",
        "--label",
        "imagefolder:ROOT",
    ):
        assert option in text


def test_model_options_are_exclusive_and_required(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for argv in (
        ["evaluate", "--dataset", "digits", "--output", "o"],
        [
            "evaluate",
            "--checkpoint",
            "r",
            "--timm",
            "resnet18",
            "--dataset",
            "digits",
            "--output",
            "o",
        ],
    ):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 2
    capsys.readouterr()


def test_a_cache_limit_without_a_cache_is_refused(tmp_path: Path) -> None:
    from look.evaluation.commands import run

    args = build_parser().parse_args(
        ["evaluate", "--timm", "look_cnn_small", "--dataset", "digits", "--output",
         str(tmp_path / "out"), "--no-cache", "--cache-max-gb", "3"]
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"--cache-max-gb .* --no-cache .* give one of them"):
        run(args)
    assert not (tmp_path / "out").exists()


def test_run_writes_results_and_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(
        [
            "evaluate",
            "--timm",
            "look_cnn_small",
            "--dataset",
            SYNTHETIC_SPEC,
            "--protocol",
            "knn,fewshot",
            "--protocol",
            "linear",
            "--labels",
            "coarse",
            "--linear-c-grid",
            "0.1,1",
            "--knn-k",
            "3",
            "7",
            "--fewshot-ways",
            "2",
            "--fewshot-shots",
            "1",
            "--fewshot-queries",
            "3",
            "--fewshot-episodes",
            "10",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--seed",
            "3",
            "--device",
            "cpu",
            "--no-progress",
            "--label",
            "cnn k=7",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    with pytest.warns(FewShotEpisodesWarning, match="10 episodes.*600"):
        assert run(args) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["model"]["label"] == "cnn k=7"  # the row label look report gives it
    assert set(report["protocols"]) == {"linear", "knn", "fewshot"}
    assert report["labels"]["evaluation"] == "coarse" and report["dataset"]["num_classes"] == 2
    assert [r["k"] for r in report["protocols"]["knn"]["results"]] == [3, 7]
    assert [p["c"] for p in report["protocols"]["linear"]["validation_curve"]] == [0.1, 1.0]
    assert report["seed"] == 3 and report["model"]["initialisation"] == "random (seed 3)"
    assert list((tmp_path / "cache").glob("*.pt")), "features were cached"
    printed = capsys.readouterr().out
    assert "results.json" in printed and "knn k=3" in printed and "2-way 1-shot" in printed
    assert "(10 episodes, below the protocol's 600)" in printed
    assert "features: train extracted, test extracted" in printed
    with pytest.warns(FewShotEpisodesWarning):  # the same again: the features are cached
        assert run(args) == 0
    assert "features: train from the cache, test from the cache" in capsys.readouterr().out
    linear = report["protocols"]["linear"]
    assert linear["selection_metric"] in ("top1", "mean_per_class_accuracy")
    assert isinstance(linear["imbalanced"], bool) and linear["class_count_ratio"] >= 1.0
    assert report["protocols"]["fewshot"]["episodes_below_spec"] is True


def test_corrupt_images_option_skips_unreadable_files(tmp_path: Path) -> None:
    from look.data.sources import CorruptImageError
    from tests.data.conftest import write_png, write_truncated_png

    root = tmp_path / "images"
    for name, colour in {"cat": (200, 30, 30), "dog": (30, 30, 200)}.items():
        for i in range(4):
            write_png(root / "train" / name / f"{i}.png", colour)
            write_png(root / "val" / name / f"{i}.png", colour)
    write_truncated_png(root / "train" / "cat" / "broken.png")
    argv = [
        "evaluate", "--timm", "look_cnn_small", "--dataset", f"imagefolder:{root}",
        "--protocol", "knn", "--knn-k", "3", "--image-size", "16", "--device", "cpu",
        "--no-cache", "--no-progress", "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    with pytest.raises(CorruptImageError, match=r"broken\.png.*--corrupt-images skip"):
        run(build_parser().parse_args(argv))
    with pytest.warns(RuntimeWarning, match=r"left out 1 unreadable image.*broken\.png") as caught:
        assert run(build_parser().parse_args([*argv, "--corrupt-images", "skip"])) == 0
    # Left out, not replaced: no pre-training "another image takes its place" warning.
    assert not [w for w in caught if "takes its place" in str(w.message)]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["features"]["train"]["num_images"] == 8, "left out, not replaced"
    assert report["features"]["train"]["unreadable_files"] == [str(root / "train/cat/broken.png")]
    assert report["protocols"]["knn"]["results"][0]["k_effective"] == 3


def test_a_training_subset_is_used_and_recorded(tmp_path: Path) -> None:
    # A small study on a large dataset, from the command line (only the library had it).
    argv = [
        "evaluate", "--timm", "look_cnn_small", "--dataset", "synthetic:samples=40,classes=4,size=12",
        "--protocol", "knn", "--knn-k", "3", "--device", "cpu", "--no-cache", "--no-progress",
        "--train-subset", "12", "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    assert run(build_parser().parse_args(argv)) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["features"]["train"]["num_images"] == 12
    assert "subset=12" in report["dataset"]["description"]
    assert report["dataset"]["train_subset"] == 12
    # Another subset re-reads the training split only: the test split's features are shared.
    cached = [a for a in argv[:-2] if a != "--no-cache"] + ["--cache-dir", str(tmp_path / "cache")]
    for subset in ("12", "16"):
        cached[cached.index("--train-subset") + 1] = subset
        assert run(build_parser().parse_args([*cached, "--output", str(tmp_path / subset)])) == 0
    features = json.loads((tmp_path / "16" / "results.json").read_text())["features"]
    assert (features["train"]["from_cache"], features["test"]["from_cache"]) == (False, True)


def test_a_class_whose_every_image_is_unreadable_is_left_out_not_fatal(tmp_path: Path) -> None:
    # skip in evaluation leaves unreadable images out; it once looked for a substitute in the
    # class, and stopped with "no readable image left in class" when there was none.
    from tests.data.conftest import write_png

    root = tmp_path / "images"
    for name, colour in {"cat": (200, 30, 30), "dog": (30, 30, 200), "owl": (9, 9, 9)}.items():
        for i in range(3):
            write_png(root / "train" / name / f"{i}.png", colour)
            write_png(root / "val" / name / f"{i}.png", colour)
    for i in range(3):
        (root / "train" / "owl" / f"{i}.png").write_bytes(b"not a png")
    argv = [
        "evaluate", "--timm", "look_cnn_small", "--dataset", f"imagefolder:{root}",
        "--protocol", "knn", "--knn-k", "3", "--image-size", "16", "--device", "cpu",
        "--no-cache", "--no-progress", "--corrupt-images", "skip", "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    with pytest.warns(RuntimeWarning, match="left out 3 unreadable image"):
        assert run(build_parser().parse_args(argv)) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["features"]["train"]["num_images"] == 6


def test_small_images_enlarged_to_an_image_folders_default_size_are_warned_about(
    tmp_path: Path,
) -> None:
    # 20-px images evaluated at 224 px took minutes, without a word.
    from tests.data.conftest import write_png

    root = tmp_path / "images"
    for name, colour in {"cat": (200, 30, 30), "dog": (30, 30, 200)}.items():
        for i in range(3):
            write_png(root / "train" / name / f"{i}.png", colour)
            write_png(root / "val" / name / f"{i}.png", colour)
    argv = [
        "evaluate", "--timm", "look_cnn_small", "--dataset", f"imagefolder:{root}",
        "--protocol", "knn", "--knn-k", "3", "--device", "cpu", "--no-cache", "--no-progress",
        "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    with pytest.warns(UserWarning, match=r"evaluated at 224 px.*is 20x20\): pass --image-size"):
        assert run(build_parser().parse_args(argv)) == 0
    model = json.loads((tmp_path / "out" / "results.json").read_text())["model"]
    assert model["frozen_feature_dim"] == model["feature_dim"]  # (the head's with --head)


def test_summary_says_when_knn_k_was_clipped_to_the_train_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "evaluate", "--timm", "look_cnn_small", "--dataset", SYNTHETIC_SPEC, "--protocol", "knn",
        "--knn-k", "5", "500", "--device", "cpu", "--no-cache", "--no-progress",
        "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    assert run(build_parser().parse_args(argv)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "knn k=" in line]
    train_size = json.loads((tmp_path / "out" / "results.json").read_text())["protocols"]["knn"][
        "num_train"
    ]
    assert "whole train set" not in lines[0]
    assert f"(k={train_size}: the whole train set)" in lines[1]


def test_summary_says_when_the_linear_probe_did_not_converge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "evaluate", "--timm", "look_cnn_small", "--dataset", SYNTHETIC_SPEC, "--protocol",
        "linear", "--linear-c-grid", "0.1,1", "--linear-max-iter", "1", "--device", "cpu",
        "--no-cache", "--no-progress", "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    with pytest.warns(LinearProbeConvergenceWarning, match=r"C=\S+ stopped on max_iter after 1"):
        assert run(build_parser().parse_args(argv)) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "linear" in line]
    assert "NOT CONVERGED: refit stopped on max_iter after 1 iterations, 2/2 grid fits" in line
    linear = json.loads((tmp_path / "out" / "results.json").read_text())["protocols"]["linear"]
    assert linear["refit_converged"] is False and linear["warnings"]


def test_summary_notes_on_linear_choices_and_older_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    linear = {"top1": 80.0, "mean_per_class_accuracy": 70.0, "best_c": 100.0}
    _print_summary({"protocols": {"linear": linear}}, tmp_path)  # a file from before the notes
    assert capsys.readouterr().out.splitlines()[1].endswith("(C=100)")
    linear |= {
        "selection_metric": "mean_per_class_accuracy",
        "class_count_ratio": 20.0,
        "c_at_grid_edge": "largest",
        "refit_converged": True,
        "grid_fits_not_converged": 1,
        "validation_curve": [{"c": 1.0}, {"c": 100.0}],
    }
    _print_summary({"protocols": {"linear": linear}}, tmp_path)
    line = capsys.readouterr().out.splitlines()[1]
    assert "chosen on mean/class: imbalanced train set, class counts 20.0:1" in line
    assert "the largest C of the grid" in line and "1/2 grid fits did not converge" in line


def test_timm_kwargs_build_a_vit_for_small_images(tmp_path: Path) -> None:
    common = ["evaluate", "--timm", "vit_tiny_patch16_224", "--dataset"]
    common += ["synthetic:samples=32,classes=2,size=16", "--protocol", "knn", "--knn-k", "3"]
    common += ["--device", "cpu", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    args = build_parser().parse_args(
        [*common, "--timm-kwargs", "{img_size: 16, patch_size: 4}", "--output", str(tmp_path / "o")]
    )
    assert run(args) == 0
    written = json.loads((tmp_path / "o" / "results.json").read_text())
    assert written["model"]["model_kwargs"] == {"img_size": 16, "patch_size": 4}
    for text, message in (("[1, 2]", "must be a mapping"), ("{a: [", "is not YAML")):
        bad = build_parser().parse_args([*common, "--timm-kwargs", text, "--output", "x"])
        with pytest.raises(ValueError, match=f"--timm-kwargs .*{message}|{message}"):
            run(bad)
    checkpoint_args = ["evaluate", "--checkpoint", "r", "--dataset", "digits", "--output", "x"]
    on_checkpoint = build_parser().parse_args([*checkpoint_args, "--timm-kwargs", "{a: 1}"])
    with pytest.raises(ValueError, match="--timm-kwargs go with --timm"):
        run(on_checkpoint)
