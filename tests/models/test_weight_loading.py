"""Weight files: prefix stripping, pretrained_weights loading, and clear errors for mismatches."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from look.models import (
    create_backbone,
    describe_torch_load_error,
    export_backbone,
    load_backbone_weights,
    read_state_dict,
    strip_known_prefixes,
    strip_prefix,
)


def test_strip_prefix_uses_removeprefix_not_lstrip() -> None:
    weight = torch.zeros(1)
    state = {"module.module.x": weight, "model.y": weight, "module.z": weight}
    # lstrip("module.") would also eat "mod" from "model.y" and both "module." copies.
    assert strip_prefix(state, "module.").keys() == {"module.x", "model.y", "z"}
    assert strip_prefix(state, "module.", keep_unmatched=False).keys() == {"module.x", "z"}


def test_strip_prefix_refuses_collisions_and_empty_prefix() -> None:
    weight = torch.zeros(1)
    with pytest.raises(ValueError, match="two keys"):
        strip_prefix({"module.a": weight, "a": weight}, "module.")
    with pytest.raises(ValueError, match="non-empty"):
        strip_prefix({"a": weight}, "")


def test_strip_known_prefixes_repeats_until_none_applies() -> None:
    weight = torch.zeros(1)
    stripped = strip_known_prefixes(
        {"module.backbone.conv1.weight": weight, "encoder.fc.bias": weight}
    )
    assert stripped.keys() == {"conv1.weight", "fc.bias"}


def source_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("look_resnet_tiny", num_classes=10)


def assert_same_backbone_weights(source: torch.nn.Module, loaded: torch.nn.Module) -> None:
    loaded_state = loaded.state_dict()
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(loaded_state[key], value), key


@pytest.mark.parametrize(("prefix", "suffix"), [("module.", ".pth"), ("backbone.", ".safetensors")])
def test_pretrained_weights_with_wrapper_prefixes(tmp_path: Path, prefix: str, suffix: str) -> None:
    source = source_model()
    state = {prefix + k: v for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))

    backbone, _ = create_backbone("look_resnet_tiny", pretrained_weights=path)
    assert_same_backbone_weights(source, backbone)

    report = load_backbone_weights(create_backbone("look_resnet_tiny")[0], path)
    assert report.ignored_keys == ("fc.bias", "fc.weight")
    assert "stem.conv.weight" in report.loaded_keys


def test_pretrained_weights_for_timm_resnet_from_nested_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("resnet18")
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    backbone, _ = create_backbone("resnet18", pretrained_weights=path)
    assert_same_backbone_weights(source, backbone)


def test_missing_batch_counters_are_defaulted(tmp_path: Path) -> None:
    source = source_model()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, str(tmp_path / "w.safetensors"))
    report = load_backbone_weights(
        create_backbone("look_resnet_tiny")[0], tmp_path / "w.safetensors"
    )
    assert report.defaulted_keys and all(
        k.endswith("num_batches_tracked") for k in report.defaulted_keys
    )


def test_weights_of_another_architecture_give_a_clear_error(tmp_path: Path) -> None:
    other = timm.create_model("look_cnn_small", num_classes=0)
    save_file(other.state_dict(), str(tmp_path / "cnn_small.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatch: .*file \(32,\) vs model \(16,\)"):
        create_backbone("look_resnet_tiny", pretrained_weights=tmp_path / "cnn_small.safetensors")


def test_weights_holding_nan_or_inf_are_refused_by_name(tmp_path: Path) -> None:
    """A diverged run's weights would make every feature and loss NaN, and the first error
    would then blame the learning rate or the data."""
    state = {
        k: v.clone()
        for k, v in timm.create_model("look_cnn_small", num_classes=0).state_dict().items()
    }
    state["stem.conv.weight"][0, 0, 0, 0] = float("nan")
    state["stem.bn.running_var"][1] = float("inf")
    save_file(state, str(tmp_path / "diverged.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"NaN or infinite values in stem\.bn\.running_var, stem\.conv\.weight",
    ):
        create_backbone("look_cnn_small", pretrained_weights=tmp_path / "diverged.safetensors")


def test_small_stem_weights_into_standard_stem_name_the_option(tmp_path: Path) -> None:
    small, _ = create_backbone("tv:resnet18", small_stem=True)
    save_file(small.state_dict(), str(tmp_path / "small.safetensors"))
    with pytest.raises(ValueError, match=r"conv1\.weight.*small_stem"):
        create_backbone("tv:resnet18", pretrained_weights=tmp_path / "small.safetensors")


def test_unexpected_and_missing_keys_are_errors(tmp_path: Path) -> None:
    state = dict(source_model().state_dict())
    state["projector.weight"] = torch.zeros(2, 2)
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"not in the model: projector\.weight"):
        create_backbone("look_resnet_tiny", pretrained_weights=tmp_path / "extra.safetensors")

    del state["projector.weight"], state["stem.conv.weight"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing from the file: stem\.conv\.weight"):
        create_backbone("look_resnet_tiny", pretrained_weights=tmp_path / "missing.safetensors")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pth")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="suffix"):
        read_state_dict(tmp_path / "weights.txt")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_weights.pth")
    with pytest.raises(ValueError, match="not a flat state dict"):
        read_state_dict(tmp_path / "no_weights.pth")


def test_files_of_another_format_are_named_in_a_value_error(tmp_path: Path) -> None:
    # A long text makes safetensors read an absurd header length ("header too large").
    text_safetensors = tmp_path / "w.safetensors"
    text_safetensors.write_text("this is a text file, not weights\n" * 10)
    with pytest.raises(ValueError, match=r"'.*w\.safetensors' is not a safetensors file.*header"):
        create_backbone("look_resnet_tiny", pretrained_weights=text_safetensors)

    text_pth = tmp_path / "w.pth"
    text_pth.write_text("hello\n")
    with pytest.raises(ValueError, match=r"'.*w\.pth' is not a PyTorch weights file"):
        create_backbone("look_resnet_tiny", pretrained_weights=text_pth)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a PyTorch weights file"):
        read_state_dict(tmp_path / "empty.pt")

    # The two formats swapped: the message says what the file looks like.
    torch.save(source_model().state_dict(), tmp_path / "torch.safetensors")
    with pytest.raises(ValueError, match=r"looks like a torch\.save file: rename it to \.pth"):
        read_state_dict(tmp_path / "torch.safetensors")
    save_file(source_model().state_dict(), str(tmp_path / "safetensors.pth"))
    with pytest.raises(
        ValueError, match=r"looks like a safetensors file: rename it to \.safetensors"
    ):
        read_state_dict(tmp_path / "safetensors.pth")


def test_run_directory_is_read_through_its_backbone_file(tmp_path: Path) -> None:
    source, _ = create_backbone("look_resnet_tiny")
    run = tmp_path / "runs" / "ce_s0"
    export_backbone(source, "look_resnet_tiny", run / "backbone.safetensors", small_stem=False)

    backbone, _ = create_backbone("look_resnet_tiny", pretrained_weights=run)
    assert_same_backbone_weights(source, backbone)
    assert backbone.pretrained_weights_summary.startswith(
        f"loaded {len(source.state_dict())} tensors from {run / 'backbone.safetensors'}"
    )

    unfinished = tmp_path / "runs" / "look_s0"
    (unfinished / "checkpoints").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError, match=r"no backbone\.safetensors.*look export --checkpoint"
    ):
        create_backbone("look_resnet_tiny", pretrained_weights=unfinished)
    with pytest.raises(FileNotFoundError, match="is a directory, not a weight file"):
        create_backbone("look_resnet_tiny", pretrained_weights=tmp_path / "runs")


def look_training_checkpoint(online: torch.nn.Module, momentum: torch.nn.Module) -> dict:
    """What `look pretrain` saves: the method's state dict under "model", and training state."""
    model_state: dict[str, torch.Tensor] = {}
    for prefix, module in (("backbone.", online), ("ema_backbone.", momentum)):
        model_state.update({prefix + k: v for k, v in module.state_dict().items()})
    model_state["classifier.weight"] = torch.zeros(4, 64)
    model_state["classifier.bias"] = torch.zeros(4)
    model_state["head.0.weight"] = torch.zeros(16, 64)
    return {
        "model": model_state,
        "optimizer": {"state": {}, "param_groups": []},
        "global_step": 40,
        "config": {"model": {"backbone": "look_resnet_tiny", "small_stem": False}},
    }


def test_look_pretrain_checkpoint_gives_its_online_backbone(tmp_path: Path) -> None:
    # Built as look pretrain builds them: no fc, so any classifier complaint would come from the
    # method's own classifier.
    torch.manual_seed(0)
    online, _ = create_backbone("look_resnet_tiny")
    momentum, _ = create_backbone("look_resnet_tiny")
    path = tmp_path / "checkpoints" / "ckpt-000000040.pt"
    path.parent.mkdir()
    torch.save(look_training_checkpoint(online, momentum), path)

    backbone, _ = create_backbone("look_resnet_tiny", pretrained_weights=path)
    assert_same_backbone_weights(online, backbone)  # not the momentum copy
    assert backbone.pretrained_weights_summary == (
        f"loaded {len(backbone.state_dict())} tensors from {path} "
        "(online backbone of a look pretrain checkpoint, step 40)"
    )

    without_backbone = look_training_checkpoint(online, momentum)
    without_backbone["model"] = {"classifier.bias": torch.zeros(4)}
    torch.save(without_backbone, tmp_path / "no_backbone.pt")
    with pytest.raises(ValueError, match="look pretrain checkpoint without backbone tensors"):
        read_state_dict(tmp_path / "no_backbone.pt")


def test_a_look_checkpoint_altered_after_it_was_written_is_refused(tmp_path: Path) -> None:
    from look.engine.checkpoint import CheckpointCorruptError, save_checkpoint

    online, _ = create_backbone("look_resnet_tiny")
    momentum, _ = create_backbone("look_resnet_tiny")
    path = save_checkpoint(tmp_path / "checkpoints", 40, look_training_checkpoint(online, momentum))
    read_state_dict(path)  # as written: listed in the manifest, and its sha256 agrees
    content = bytearray(path.read_bytes())
    content[-100] ^= 0xFF  # one flipped byte that torch.load might not notice
    path.write_bytes(bytes(content))
    with pytest.raises(CheckpointCorruptError, match="sha256"):
        read_state_dict(path)


def test_summary_says_what_was_loaded(tmp_path: Path) -> None:
    source = source_model()
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    backbone, _ = create_backbone("look_resnet_tiny", pretrained_weights=path)
    loaded = len(source.state_dict()) - 2  # all but the classifier
    assert backbone.pretrained_weights_summary == (
        f"loaded {loaded} tensors from {path} (ignored: fc.bias, fc.weight)"
    )
    assert load_backbone_weights(create_backbone("look_resnet_tiny")[0], path).summary == (
        backbone.pretrained_weights_summary
    )
    # Without pretrained_weights the attribute exists and says nothing was loaded.
    assert create_backbone("look_resnet_tiny")[0].pretrained_weights_summary is None


@pytest.mark.parametrize("prefix", ["model.", "module.encoder_q."])
def test_a_prefix_every_key_shares_is_removed_when_the_rest_fits(
    tmp_path: Path, prefix: str
) -> None:
    """Lightning saves its module as `model.`, MoCo its query encoder as `module.encoder_q.`."""
    source = source_model()
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {prefix + k: v for k, v in source.state_dict().items()}}, path)
    backbone, _ = create_backbone("look_resnet_tiny", pretrained_weights=path)
    assert_same_backbone_weights(source, backbone)
    removed = prefix.removeprefix("module.")  # ("module." is a known wrapper prefix)
    assert f"prefix {removed!r} removed" in backbone.pretrained_weights_summary


def test_two_backbones_under_prefixes_are_named_not_chosen_between(tmp_path: Path) -> None:
    """A whole MoCo checkpoint holds the query and the key encoder, and the queue."""
    state = source_model().state_dict()
    wrapped = {f"module.encoder_{q}.{k}": v for q in "qk" for k, v in state.items()}
    wrapped["module.queue"] = torch.zeros(16, 8)
    torch.save({"state_dict": wrapped}, tmp_path / "moco.pth")
    with pytest.raises(
        ValueError,
        match=r"keys under 'encoder_k\.' and 'encoder_q\.' hold this backbone beside other "
        r"weights: save them without that prefix",
    ):
        create_backbone("look_resnet_tiny", pretrained_weights=tmp_path / "moco.pth")


def test_a_one_channel_first_conv_is_spread_over_the_three_channels_look_feeds(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    grey = timm.create_model("look_resnet_tiny", in_chans=1, num_classes=0).eval()
    save_file(grey.state_dict(), str(tmp_path / "grey.safetensors"))
    backbone, _ = create_backbone(
        "look_resnet_tiny", pretrained_weights=tmp_path / "grey.safetensors"
    )
    assert "stem.conv.weight: 1 input channel spread over 3" in backbone.pretrained_weights_summary
    # A grey image as look feeds it (its channel repeated) gives the 1-channel model's features.
    images = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(
            backbone.eval()(images.repeat(1, 3, 1, 1)), grey(images), atol=1e-5, rtol=1e-4
        )


def test_a_first_conv_of_other_channels_is_explained_without_in_chans(tmp_path: Path) -> None:
    """look's commands have no in_chans: the message says what look feeds instead."""
    two_channels = timm.create_model("look_resnet_tiny", in_chans=2, num_classes=0)
    save_file(two_channels.state_dict(), str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError) as caught:
        create_backbone("look_resnet_tiny", pretrained_weights=tmp_path / "two.safetensors")
    message = str(caught.value)
    assert "stem.conv.weight takes 2 input channels, the model's 3: look feeds every image" in (
        message
    )
    assert "in_chans" not in message


def test_a_file_weights_only_refuses_is_one_line_naming_what_it_refused(tmp_path: Path) -> None:
    """timm's train.py saves its argparse arguments beside the weights; torch's message is two
    lines of advice with terminal colour codes and names the refused class only at its end."""
    import argparse

    path = tmp_path / "timm_train.pth"
    torch.save(
        {"state_dict": source_model().state_dict(), "args": argparse.Namespace(lr=0.1)}, path
    )
    with pytest.raises(ValueError) as caught:
        create_backbone("look_resnet_tiny", pretrained_weights=path)
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message
    assert "weights_only=False" not in message
    assert "Weights only load failed (unsupported global: argparse.Namespace)" in message
    assert "its 'state_dict' entry" in message and "safetensors.torch.save_file" in message


def test_describe_torch_load_error_keeps_one_clean_line() -> None:
    error = pickle.UnpicklingError(
        "Weights only load failed. This file can still be loaded, \x1b[1mdo those steps only if "
        "you trust the source\x1b[0m. \n\t(1) advice\n\tWeightsUnpickler error: Unsupported "
        "operand 149. More text\n\nCheck the documentation"
    )
    assert describe_torch_load_error(error) == (
        "UnpicklingError: Weights only load failed (Unsupported operand 149)"
    )
    torn = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central")
    assert describe_torch_load_error(torn) == f"RuntimeError: {torn}"
