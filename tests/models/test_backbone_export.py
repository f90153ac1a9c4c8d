"""export_backbone / load_exported_backbone: files that timm and torchvision load directly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from look import __version__
from look.models import (
    create_backbone,
    export_backbone,
    load_exported_backbone,
    read_export_metadata,
)


def perturb_batch_norm_statistics(model: nn.Module) -> None:
    """Make buffers differ from their initial values, so a test fails if they are not exported."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(
                torch.rand(module.running_var.shape, generator=generator) + 0.5
            )


def features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18", "look_cnn_small"])
def test_standard_export_loads_into_the_library_model(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    backbone, feature_dim = create_backbone(name)
    perturb_batch_norm_statistics(backbone)
    path = export_backbone(backbone, name, tmp_path / "backbone.safetensors", small_stem=False)

    if name.startswith("tv:"):
        library_model = torchvision.models.get_model(name.removeprefix("tv:"))
    else:
        library_model = timm.create_model(name)
    result = library_model.load_state_dict(load_file(str(path)), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []

    library_model.fc = nn.Identity()  # pooled features of the library model
    images = torch.randn(2, 3, 32, 32)
    reference = features(backbone, images)
    assert reference.shape == (2, feature_dim)
    torch.testing.assert_close(features(library_model, images), reference, rtol=0, atol=0)


def test_small_stem_round_trip_through_metadata(tmp_path: Path) -> None:
    backbone, feature_dim = create_backbone("resnet18", small_stem=True)
    perturb_batch_norm_statistics(backbone)
    path = export_backbone(
        backbone,
        "resnet18",
        tmp_path / "nested" / "out.safetensors",
        small_stem=True,
        extra_metadata={"method": "look", "epoch": "3"},
    )
    metadata = read_export_metadata(path)
    assert metadata["name"] == "resnet18"
    assert metadata["small_stem"] == "true"
    assert metadata["feature_dim"] == "512"
    assert metadata["look_version"] == __version__
    assert metadata["method"] == "look" and metadata["epoch"] == "3"
    assert [p.name for p in path.parent.iterdir()] == ["out.safetensors"]  # no temporary left

    reloaded, reloaded_dim = load_exported_backbone(path)
    assert reloaded_dim == feature_dim
    assert reloaded.conv1.kernel_size == (3, 3)
    images = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(
        features(reloaded, images), features(backbone, images), rtol=0, atol=0
    )


def test_small_net_round_trip_with_in_chans(tmp_path: Path) -> None:
    backbone, _ = create_backbone("look_resnet_tiny", in_chans=1)
    path = export_backbone(
        backbone, "look_resnet_tiny", tmp_path / "tiny.safetensors", small_stem=False, in_chans=1
    )
    reloaded, feature_dim = load_exported_backbone(path)
    assert feature_dim == 128
    images = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(
        features(reloaded, images), features(backbone, images), rtol=0, atol=0
    )


def test_shared_tensors_are_exported(tmp_path: Path) -> None:
    backbone, _ = create_backbone("tv:resnet18")
    block = backbone.layer1[0]
    # Tied weights: safetensors refuses shared storage unless the export copies them.
    block.conv2.weight = block.conv1.weight
    path = export_backbone(backbone, "tv:resnet18", tmp_path / "tied.safetensors", small_stem=False)
    exported = load_file(str(path))
    assert torch.equal(exported["layer1.0.conv1.weight"], exported["layer1.0.conv2.weight"])


def test_export_refuses_a_backbone_that_does_not_match_the_name(tmp_path: Path) -> None:
    backbone, _ = create_backbone("look_resnet_tiny")
    with pytest.raises(ValueError, match="does not match"):
        export_backbone(backbone, "look_cnn_small", tmp_path / "x.safetensors", small_stem=False)
    small, _ = create_backbone("tv:resnet18", small_stem=True)
    with pytest.raises(ValueError, match=r"conv1\.weight"):
        export_backbone(small, "tv:resnet18", tmp_path / "x.safetensors", small_stem=False)


def test_export_argument_checks(tmp_path: Path) -> None:
    backbone, _ = create_backbone("look_resnet_tiny")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_backbone(backbone, "look_resnet_tiny", tmp_path / "x.pth", small_stem=False)
    with pytest.raises(ValueError, match="reserved"):
        export_backbone(
            backbone,
            "look_resnet_tiny",
            tmp_path / "x.safetensors",
            small_stem=False,
            extra_metadata={"name": "other"},
        )
    with pytest.raises(ValueError, match="str to str"):
        export_backbone(
            backbone,
            "look_resnet_tiny",
            tmp_path / "x.safetensors",
            small_stem=False,
            extra_metadata={"epoch": 3},  # type: ignore[dict-item]
        )


def test_loading_a_plain_file_points_to_pretrained_weights(tmp_path: Path) -> None:
    backbone, _ = create_backbone("look_resnet_tiny")
    save_file(backbone.state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="pretrained_weights") as caught:
        load_exported_backbone(tmp_path / "plain.safetensors")
    # One sentence for the command line, not the Python API.
    assert "look evaluate --timm NAME --weights FILE" in str(caught.value)
    assert "create_backbone" not in str(caught.value)
    with pytest.raises(FileNotFoundError):
        load_exported_backbone(tmp_path / "absent.safetensors")


def test_compiled_backbone_is_unwrapped(tmp_path: Path) -> None:
    backbone, _ = create_backbone("look_resnet_tiny")
    compiled = torch.compile(backbone)  # lazy: nothing is compiled until it is called
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    path = export_backbone(
        compiled, "look_resnet_tiny", tmp_path / "c.safetensors", small_stem=False
    )
    assert load_file(str(path)).keys() == backbone.state_dict().keys()


def test_a_file_of_another_format_is_named_in_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "backbone.safetensors"
    path.write_text("not an export, just text\n" * 10)
    with pytest.raises(ValueError, match=r"'.*backbone\.safetensors' is not a safetensors file"):
        load_exported_backbone(path)


def test_export_refuses_weights_holding_nan_by_name(tmp_path: Path) -> None:
    """A diverged run's export would be refused by every later evaluation: refused here."""
    backbone, _ = create_backbone("look_cnn_small")
    with torch.no_grad():
        backbone.stem.conv.weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    with pytest.raises(ValueError, match=r"NaN or infinite values in stem\.conv\.weight"):
        export_backbone(backbone, "look_cnn_small", path, small_stem=False)
    assert not path.exists()


def test_the_same_backbone_exported_by_two_processes_gives_the_same_bytes(tmp_path: Path) -> None:
    """safetensors orders the metadata as a Rust hash map does, differently in every process;
    the export sorts it, so an export's checksum identifies its weights and metadata."""
    script = (
        "import sys, torch\n"
        "from look.models import create_backbone, export_backbone\n"
        "torch.manual_seed(0)\n"
        "backbone, _ = create_backbone('look_resnet_tiny', in_chans=1)\n"
        "extra = {f'entry_{i}': str(i) for i in range(8)}\n"
        "export_backbone(backbone, 'look_resnet_tiny', sys.argv[1], small_stem=False, in_chans=1,\n"
        "                extra_metadata=extra)\n"
    )
    paths = [tmp_path / f"export_{i}.safetensors" for i in range(2)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=120)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    raw = paths[0].read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    metadata = read_export_metadata(paths[0])  # safetensors still reads the rewritten header
    assert [metadata[f"entry_{i}"] for i in range(8)] == [str(i) for i in range(8)]
    reloaded, _ = load_exported_backbone(paths[0])
    assert reloaded is not None
