from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file

from look.cli import error_message, main, resolve_config_path
from look.data import CorruptImageError

from .engine.test_check_images import image_folder_overrides, write_image_folder
from .engine.test_trainer import TINY


def _pretrain_args(output: Path, *extra: str) -> list[str]:
    args = ["pretrain", "--output", str(output)]
    for override in [*TINY, *extra]:
        args += ["--set", override]
    return args


def test_help_names_every_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "look", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("pretrain", "export", "methods", "torchrun"):
        assert command in out


def test_methods_lists_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("look:", "nca:", "ce:", "sl_mlp:", "supcon:", "mocov2:", "temperature"):
        assert name in out
    assert "memory = 'bank'  (one of bank, queue, sharded_bank)" in out
    nca = out[out.index("nca:") : out.index("\n", out.index("k_fraction", out.index("nca:")))]
    assert "k = None  (fixed: nca uses every memory row)" in nca


def test_an_unknown_option_shows_its_subcommands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--output", "x", "--bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: look pretrain") and "unrecognized arguments: --bogus" in err


def test_recipe_names_are_looked_up_in_named_folders(tmp_path: Path) -> None:
    from look.cli import resolve_config_path

    with pytest.raises(
        FileNotFoundError, match=r"no recipe of that name in /.*configs.*Recipes: \["
    ):
        resolve_config_path("no_such_recipe")


def test_bad_input_is_one_clear_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["pretrain", "--config", "no_such_recipe", "--output", str(tmp_path)]) == 2
    assert "config 'no_such_recipe' does not exist" in capsys.readouterr().err
    assert main(_pretrain_args(tmp_path / "r", "method.k=500")) == 2
    assert "k=500 is impossible" in capsys.readouterr().err


def test_every_rank_prints_its_configuration_error_naming_its_rank(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rank's own problem (its node's copy of the data) would otherwise go unsaid: torchrun
    # stops rank 0 before rank 0 meets it.
    monkeypatch.setenv("RANK", "1")
    assert main(_pretrain_args(tmp_path / "r", "method.k=500")) == 2
    assert capsys.readouterr().err.startswith("look: error (rank 1): ")
    monkeypatch.setenv("RANK", "0")
    assert main(_pretrain_args(tmp_path / "r", "method.k=500")) == 2
    assert "k=500 is impossible" in capsys.readouterr().err


def test_dry_run_checks_everything_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert main([*_pretrain_args(run, "train.max_steps=2"), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "starts_at: step 0 (fresh run)" in plan and "total_steps: 2" in plan
    assert "memory: MemoryBank(size=" in plan and "dry run" in plan
    assert not run.exists()
    # Checked like a real start: a bad setting fails, and so does a run of another config.
    assert main([*_pretrain_args(run, "method.k=500"), "--dry-run"]) == 2
    assert "k=500 is impossible" in capsys.readouterr().err
    assert main(_pretrain_args(run, "train.max_steps=2")) == 0
    capsys.readouterr()
    assert main([*_pretrain_args(run, "train.max_steps=2"), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "starts_at: step 2 (ckpt-000000002.pt): finished, nothing to train" in plan
    # The rehearsed step runs on the model it would resume, not on a fresh one.
    assert "'model': 'ckpt-000000002.pt (step 2)'" in plan
    assert "held no written row" not in plan  # the resumed memory is written
    assert main([*_pretrain_args(run, "train.max_steps=2", "method.k=4"), "--dry-run"]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_the_dry_run_rehearses_one_step(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main([*_pretrain_args(run), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "rehearsed_step: {'loss': " in plan and not run.exists()
    # A fresh LOOK run's first step finds no neighbour in its empty memory: the plan says so.
    assert "'note': \"the step's memory held no written row yet" in plan
    # Builds fine, fails at its first step: a batch of 16 cannot make 20 batch-norm groups.
    moco = "method={name: mocov2, bn_splits: 20, queue_size: 64}"
    assert main([*_pretrain_args(run, moco), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "step 1 " in err and "bn_splits=20" in err and "No checkpoint had been written" in err
    # One image per forward pass: batch norm's refusal names the settings that gave it.
    assert main([*_pretrain_args(run, "optim.batch_size=1"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Expected more than 1 value per channel" in err and "optim.batch_size=1 over" in err
    assert "method.head_batch_norm=false" in err and ".." not in err


def test_the_plan_says_which_weights_the_backbone_starts_from(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([*_pretrain_args(tmp_path / "first", "train.max_steps=1")]) == 0
    capsys.readouterr()
    assert main([*_pretrain_args(tmp_path / "second"), "--dry-run"]) == 0
    assert "pretrained_weights: none (random initialisation)" in capsys.readouterr().out
    weights = f"model.pretrained_weights={tmp_path / 'first'}"  # a run directory
    assert main([*_pretrain_args(tmp_path / "second", weights), "--dry-run"]) == 0
    assert "pretrained_weights: loaded " in capsys.readouterr().out


def test_recipe_names_resolve() -> None:
    assert (
        resolve_config_path("look_cnn-small_fmnist-coarse").name
        == "look_cnn-small_fmnist-coarse.yaml"
    )


@pytest.mark.parametrize(
    ("backbone", "reference"),
    [
        ("resnet18", lambda: timm.create_model("resnet18")),
        ("tv:resnet18", lambda: torchvision.models.resnet18()),
    ],
)
def test_exported_backbone_loads_into_timm_and_torchvision(
    tmp_path: Path, backbone: str, reference: object
) -> None:
    run = tmp_path / "run"
    assert main(_pretrain_args(run, f"model.backbone={backbone}", "train.max_steps=2")) == 0
    exported = tmp_path / "exported.safetensors"
    assert main(["export", "--checkpoint", str(run), "--output", str(exported)]) == 0
    model = reference()  # type: ignore[operator]
    result = model.load_state_dict(load_file(exported), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    # The weights are the trained ones, not a fresh initialisation.
    state = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert torch.equal(model.state_dict()["conv1.weight"], state["model"]["backbone.conv1.weight"])


def test_export_of_a_file_that_is_no_checkpoint_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    not_a_checkpoint = tmp_path / "config.yaml"
    not_a_checkpoint.write_text("method: {name: look}\n")
    output = tmp_path / "e.safetensors"
    assert main(["export", "--checkpoint", str(not_a_checkpoint), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("look: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    assert str(not_a_checkpoint) in err and not output.exists()


def _image_folder_args(run: Path, root: Path, *extra: str) -> list[str]:
    return _pretrain_args(run, *image_folder_overrides(root, *extra))


def test_check_images_finds_every_broken_file_before_the_first_step(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (broken,) = write_image_folder(tmp_path / "images", broken=1)
    run = tmp_path / "run"
    # Without the check, the dry run decodes one batch only (its rehearsed step), so it may or
    # may not meet the broken file; it never claims to have checked the images.
    main([*_image_folder_args(run, tmp_path / "images"), "--dry-run"])
    assert "images_checked" not in capsys.readouterr().out
    command = [*_image_folder_args(run, tmp_path / "images"), "--check-images"]
    assert main([*command, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"1 of 16 training images cannot be decoded: {broken}" in err
    assert main(command) == 2  # a real run stops before writing anything
    assert "cannot be decoded" in capsys.readouterr().err and not run.exists()
    skip = _image_folder_args(run, tmp_path / "images", "data.corrupt_images=skip")
    assert main([*skip, "--check-images", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "images_checked: 16" in out
    assert f'unreadable_images: ["{broken} (UnidentifiedImageError' in out
    with pytest.warns(RuntimeWarning) as caught:
        assert main([*skip, "--set", "train.max_steps=2", "--check-images"]) == 0
    messages = [str(warning.message) for warning in caught]
    assert any("1 of 16 training images cannot be decoded" in m for m in messages)
    # Reported once: the loader replaces the file found by the check without warning again.
    assert not any("another image of its class takes its place" in m for m in messages), messages


def test_errors_raised_in_dataloader_workers_print_their_own_message() -> None:
    class Exploding(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> int:
            raise CorruptImageError("cannot decode image file x.png; remove or replace it")

    with pytest.raises(CorruptImageError) as info:
        next(iter(torch.utils.data.DataLoader(Exploding(), num_workers=1)))
    assert "Original Traceback" in str(info.value)  # what PyTorch re-raises
    assert error_message(info.value) == "cannot decode image file x.png; remove or replace it"
    assert error_message(ValueError("plain")) == "plain"
    # Wrapped by another error (the trainer's step errors): its words stay around the message.
    wrapped = RuntimeError(f"step 0 failed measuring the kNN monitor: {info.value}. No checkpoint.")
    assert error_message(wrapped) == (
        "step 0 failed measuring the kNN monitor: cannot decode image file x.png; remove or "
        "replace it. No checkpoint."
    )
    # The worker's own words are kept as they are (a " . " inside them is not the wrapper's).
    worker = ValueError(
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\nValueError: file a . b is odd'
    )
    assert error_message(worker) == "file a . b is odd"


def test_output_paths_are_checked_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    a_folder = tmp_path / "d.safetensors"
    a_folder.mkdir()
    # The data root is missing too: the output error comes first, before the data is read.
    pretrain = _pretrain_args(a_file, "data.dataset=imagefolder", f"data.root={tmp_path / 'no'}")
    evaluate = ["evaluate", "--timm", "resnet18", "--dataset", "digits"]
    cases = [
        (pretrain, f"--output {a_file} is a file, not a folder"),
        ([*pretrain, "--dry-run"], f"--output {a_file} is a file, not a folder"),
        (
            _pretrain_args(a_file / "sub"),
            f"--output {a_file / 'sub'}: {a_file} is a file, not a folder",
        ),
        ([*evaluate, "--output", str(a_file)], f"--output {a_file} is a file, not a folder"),
        (
            [*evaluate, "--output", str(tmp_path / "eval"), "--cache-dir", str(a_file)],
            f"--cache-dir {a_file} is a file, not a folder",
        ),
        (["report", str(tmp_path), "--output", str(a_file)], f"--output {a_file} is a file"),
        (
            ["analyze", "--results", str(tmp_path), "--output", str(a_file / "x")],
            f"--output {a_file / 'x'}: {a_file} is a file, not a folder",
        ),
        (["demo", "--output", str(a_file)], f"--output {a_file} is a file, not a folder"),
        (
            ["export", "--checkpoint", str(tmp_path), "--output", str(a_folder)],
            f"--output {a_folder} is a folder, not a file",
        ),
        (
            ["export", "--checkpoint", str(tmp_path), "--output", str(a_file / "b.safetensors")],
            f"--output {a_file / 'b.safetensors'}: {a_file} is a file, not a folder",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"look: error: {message}") and err.count("\n") == 1, (argv, err)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile", "d.safetensors"]
    # With --debug the same check raises, with its traceback.
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        main(["--debug", *pretrain])


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied", "/shared/runs/x"),
        IsADirectoryError(21, "Is a directory", "out.json"),
        FileExistsError(17, "File exists", "runs/x"),
        OSError(28, "No space left on device"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_os_errors_are_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: OSError
) -> None:
    def failing(_: object) -> int:
        raise error

    monkeypatch.setattr("look.cli._run_methods", failing)
    assert main(["methods"]) == 2
    assert capsys.readouterr().err == f"look: error: {error}\n"


def test_bugs_and_interrupts_are_not_hidden(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def buggy(_: object) -> int:
        raise TypeError("a bug")

    monkeypatch.setattr("look.cli._run_methods", buggy)
    with pytest.raises(TypeError, match="a bug"):
        main(["methods"])

    def interrupted(_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("look.cli._run_methods", interrupted)
    assert main(["methods"]) == 130
    assert capsys.readouterr().err == "look: interrupted\n", "no checkpoint to speak of"


def test_an_interrupted_pretraining_says_which_checkpoint_it_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import look.engine.trainer as trainer_module
    from tests.engine.test_trainer import TINY

    def interrupted(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "pretrain", interrupted)
    command = ["pretrain", "--output", str(tmp_path), *(a for o in TINY for a in ("--set", o))]
    assert main(command) == 130
    assert capsys.readouterr().err == "look: interrupted; no checkpoint had been written yet\n"
    (tmp_path / "checkpoints").mkdir()
    for step in (4, 8):
        (tmp_path / "checkpoints" / f"ckpt-{step:09d}.pt").write_bytes(b"")
    assert main(command) == 130
    assert capsys.readouterr().err == (
        "look: interrupted; the last checkpoint, ckpt-000000008.pt, is kept: run the same "
        "command to resume\n"
    )


def test_the_top_level_help_lists_every_command_without_importing_torch() -> None:
    import subprocess
    import sys

    from look.cli import COMMAND_SUMMARIES, build_parser

    # The stand-in entries say what the full ones say.
    def help_lines(full: str | None) -> str:
        return build_parser(full=full).format_help()

    assert help_lines("") == help_lines(None)
    assert all(summary in help_lines("") for summary in COMMAND_SUMMARIES.values())
    code = (
        "import sys; from look.cli import build_parser; build_parser(full='').format_help(); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


_WARNING_SCRIPT = """
import warnings
from pathlib import Path

import look
from look.cli import one_line_warnings

inside_look = str(Path(look.__file__).parent / "evaluation" / "fewshot.py")
with one_line_warnings():
    warnings.warn_explicit("few-shot: 100 episodes", UserWarning, inside_look, 1)
    warnings.warn_explicit("from the user's own code", UserWarning, "/elsewhere/mine.py", 7)
"""


def test_look_warnings_are_one_line_and_others_keep_their_form() -> None:
    # A process of its own: pytest records every warning, which one_line_warnings leaves alone.
    done = subprocess.run(
        [sys.executable, "-c", _WARNING_SCRIPT], capture_output=True, text=True, check=True
    )
    lines = done.stderr.splitlines()
    assert lines[0] == "look: warning: few-shot: 100 episodes", "no Python source location"
    assert lines[1] == "/elsewhere/mine.py:7: UserWarning: from the user's own code"


def test_warnings_recorded_around_the_cli_are_still_recorded() -> None:
    import warnings

    import look.evaluation.fewshot
    from look.cli import one_line_warnings

    with pytest.warns(UserWarning, match="few-shot: 100 episodes"), one_line_warnings():
        warnings.warn_explicit(
            "few-shot: 100 episodes", UserWarning, look.evaluation.fewshot.__file__, 1
        )
