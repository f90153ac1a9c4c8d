"""Weight files: prefix stripping, pretrained_weights loading, and clear errors for mismatches."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from look.models import (
    create_backbone,
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
