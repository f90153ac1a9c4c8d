"""torchvision models whose weight files need more than key matching: ViT's own ``encoder.``,
GoogLeNet/Inception's auxiliary classifiers, MNASNet's layout version."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models.vision_transformer import VisionTransformer

from look.evaluation import ModelSource, load_model, state_fingerprint
from look.models import (
    create_backbone,
    export_backbone,
    load_backbone_state,
    load_backbone_weights,
    load_exported_backbone,
)


@pytest.fixture(autouse=True)
def single_cpu_thread() -> object:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: extra threads only add contention
    yield
    torch.set_num_threads(previous)


def tiny_vit() -> VisionTransformer:
    """torchvision's ViT class at a test's size: the keys of every tv:vit_* model."""
    return VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16
    )


@pytest.mark.parametrize("wrapper", ["", "module."])
def test_a_vit_keeps_its_own_encoder_prefix(tmp_path: Path, wrapper: str) -> None:
    """ "encoder." is also a wrapper prefix, but torchvision's ViT keeps its transformer under it
    (encoder.pos_embedding, encoder.layers...): its own weights were refused."""
    torch.manual_seed(0)
    source = tiny_vit()
    path = tmp_path / "vit.pth"
    torch.save({wrapper + k: v for k, v in source.state_dict().items()}, path)
    backbone = tiny_vit()
    backbone.heads = torch.nn.Identity()  # as create_backbone removes the classifier
    report = load_backbone_weights(backbone, path, classifier_prefixes=("heads.head",))
    assert report.ignored_keys == ("heads.head.bias", "heads.head.weight")
    assert "encoder.pos_embedding" in report.loaded_keys
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


@pytest.mark.parametrize(
    ("name", "aux_prefixes"), [("googlenet", ("aux1.", "aux2.")), ("inception_v3", ("AuxLogits.",))]
)
def test_published_layouts_with_auxiliary_classifiers_load(
    tmp_path: Path, name: str, aux_prefixes: tuple[str, ...]
) -> None:
    """torchvision's published weights carry the auxiliary classifiers look builds without."""
    torch.manual_seed(0)
    source = torchvision.models.get_model(name, weights=None, aux_logits=True, init_weights=True)
    path = tmp_path / f"{name}.pth"
    torch.save(source.state_dict(), path)
    backbone, _ = create_backbone(f"tv:{name}", pretrained_weights=path)
    assert all(
        torch.equal(value, source.state_dict()[key]) for key, value in backbone.state_dict().items()
    )
    summary = backbone.pretrained_weights_summary
    assert all(f"{prefix}* (" in summary for prefix in aux_prefixes), summary


def test_mnasnet_loads_from_files_without_a_layout_version(tmp_path: Path) -> None:
    """MNASNet refuses a state dict without `_metadata` ("version should be set to 1 or 2
    instead of None"): safetensors files and rebuilt dicts have none."""
    torch.manual_seed(0)
    source, _ = create_backbone("tv:mnasnet0_5")
    plain = dict(source.state_dict())  # no _metadata, as load_file or a comprehension gives

    copy, _ = create_backbone("tv:mnasnet0_5")
    load_backbone_state(copy, plain)
    assert state_fingerprint(copy) == state_fingerprint(source)
    assert not hasattr(plain, "_metadata"), "the caller's dict is left as it was"

    weights = tmp_path / "mnasnet.safetensors"
    save_file(plain, str(weights))
    from_weights, _ = create_backbone("tv:mnasnet0_5", pretrained_weights=weights)
    assert state_fingerprint(from_weights) == state_fingerprint(source)

    exported = export_backbone(
        source, "tv:mnasnet0_5", tmp_path / "export.safetensors", small_stem=False
    )
    assert state_fingerprint(load_exported_backbone(exported)[0]) == state_fingerprint(source)

    # A look pretrain checkpoint: its backbone is taken out of the method's state dict.
    checkpoint = tmp_path / "ckpt-000000001.pt"
    torch.save(
        {
            "model": {"backbone." + k: v for k, v in plain.items()},
            "config": {"model": {"backbone": "tv:mnasnet0_5", "small_stem": False}},
            "global_step": 1,
        },
        checkpoint,
    )
    loaded = load_model(ModelSource(checkpoint=checkpoint))
    assert state_fingerprint(loaded.backbone) == state_fingerprint(source)
