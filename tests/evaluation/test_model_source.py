from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from look.engine.export import export_from_checkpoint
from look.evaluation import FeatureModel, ModelSource, evaluate, load_model, state_fingerprint
from look.models import create_backbone, export_backbone, read_export_metadata
from tests.evaluation.conftest import SYNTHETIC_SPEC


def test_run_dir_checkpoint_file_and_export_give_the_same_backbone(pretrained_run: Path) -> None:
    checkpoint_file = sorted((pretrained_run / "checkpoints").glob("ckpt-*.pt"))[-1]
    from_dir = load_model(ModelSource(checkpoint=pretrained_run))
    from_file = load_model(ModelSource(checkpoint=checkpoint_file))
    from_export = load_model(ModelSource(checkpoint=pretrained_run / "backbone.safetensors"))
    fingerprints = {state_fingerprint(m.backbone) for m in (from_dir, from_file, from_export)}
    assert len(fingerprints) == 1
    assert from_dir.identity["source"] == "checkpoint"
    assert from_dir.identity["path"] == str(checkpoint_file.resolve())
    assert from_export.identity["source"] == "export"
    for loaded in (from_dir, from_export):  # the export reads the run's config.yaml
        assert loaded.backbone_name == "look_resnet_tiny"
        assert loaded.pretraining is not None
        assert loaded.pretraining["labels"] == "coarse"
        assert loaded.pretraining["image_size"] == 16
        assert loaded.pretraining["dataset"] == "synthetic"


def test_head_gives_the_normalised_embedding(pretrained_run: Path) -> None:
    loaded = load_model(ModelSource(checkpoint=pretrained_run), use_head=True)
    assert loaded.head is not None and loaded.head_dim == 16
    model = FeatureModel(loaded.backbone, loaded.head).eval()
    with torch.no_grad():
        embedding = model(torch.randn(3, 3, 16, 16))
    assert embedding.shape == (3, 16)
    assert torch.allclose(embedding.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="holds no projection head"):
        load_model(ModelSource(checkpoint=pretrained_run / "backbone.safetensors"), use_head=True)
    with pytest.raises(ValueError, match="--head needs a look checkpoint"):
        load_model(ModelSource(timm="look_cnn_small"), use_head=True)


def test_timm_random_init_is_seeded() -> None:
    first = state_fingerprint(load_model(ModelSource(timm="look_cnn_small"), seed=1).backbone)
    again = state_fingerprint(load_model(ModelSource(timm="look_cnn_small"), seed=1).backbone)
    other = state_fingerprint(load_model(ModelSource(timm="look_cnn_small"), seed=2).backbone)
    assert first == again != other


def test_timm_weights_file_is_loaded(tmp_path: Path) -> None:
    backbone, _ = create_backbone("look_cnn_small")
    path = tmp_path / "weights.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in backbone.state_dict().items()}, path)
    loaded = load_model(ModelSource(timm="look_cnn_small", weights=path))
    assert state_fingerprint(loaded.backbone) == state_fingerprint(backbone)
    assert loaded.identity["weights"] == str(path.resolve())
    with pytest.raises(ValueError, match=r"cannot load --weights .* into 'look_resnet_tiny'"):
        load_model(ModelSource(timm="look_resnet_tiny", weights=path))
    # A run directory is read through its exported backbone.
    (tmp_path / "run").mkdir()
    save_file(backbone.state_dict(), tmp_path / "run" / "backbone.safetensors")
    from_run = load_model(ModelSource(timm="look_cnn_small", weights=tmp_path / "run"))
    assert state_fingerprint(from_run.backbone) == state_fingerprint(backbone)


def test_missing_or_foreign_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(ModelSource(checkpoint=tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"--weights .* does not exist"):
        load_model(ModelSource(timm="look_cnn_small", weights=tmp_path / "missing.pt"))
    empty_run = tmp_path / "empty_run"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(ModelSource(checkpoint=empty_run))
    plain = tmp_path / "plain.pt"
    torch.save({"conv.weight": torch.zeros(1)}, plain)
    with pytest.raises(ValueError, match="not a `look pretrain` checkpoint"):
        load_model(ModelSource(checkpoint=plain))
    plain_safetensors = tmp_path / "plain.safetensors"
    save_file({"conv.weight": torch.zeros(1)}, plain_safetensors)
    with pytest.raises(ValueError, match="--timm NAME --weights FILE") as caught:
        load_model(ModelSource(checkpoint=plain_safetensors))
    assert ".." not in str(caught.value) and "create_backbone" not in str(caught.value)


def test_model_source_needs_exactly_one_model() -> None:
    with pytest.raises(ValueError, match="exactly one model"):
        ModelSource()
    with pytest.raises(ValueError, match="exactly one model"):
        ModelSource(checkpoint="run", timm="resnet18")
    with pytest.raises(ValueError, match="go with --timm"):
        ModelSource(checkpoint="run", small_stem=True)


def test_export_records_the_pretraining_data_and_old_exports_still_load(
    pretrained_run: Path, tmp_path: Path
) -> None:
    # Exported away from the run directory: no config.yaml beside it, only its metadata.
    exported = export_from_checkpoint(pretrained_run, tmp_path / "elsewhere" / "b.safetensors")
    metadata = read_export_metadata(exported)
    assert (metadata["dataset"], metadata["labels"], metadata["image_size"]) == (
        "synthetic",
        "coarse",
        "16",
    )
    loaded = load_model(ModelSource(checkpoint=exported))
    assert loaded.pretraining is not None
    assert loaded.pretraining["image_size"] == 16 and loaded.pretraining["labels"] == "coarse"
    assert loaded.pretraining["method"] == "look" and loaded.pretraining["seed"] == 0
    report = evaluate(
        exported, "digits", "knn", output_dir=tmp_path / "out", cache_dir=None, progress=False
    )
    assert report["dataset"]["image_size"] == 16, "the pre-training size, not digits' 32"
    assert report["labels"]["pretraining"] == "coarse"

    # An export written before these entries existed: it loads, without a pre-training summary.
    old = export_backbone(
        loaded.backbone, "look_resnet_tiny", tmp_path / "old" / "b.safetensors", small_stem=False
    )
    old_model = load_model(ModelSource(checkpoint=old))
    assert old_model.pretraining is None
    assert state_fingerprint(old_model.backbone) == state_fingerprint(loaded.backbone)
    plain = evaluate(
        old, SYNTHETIC_SPEC, "knn", output_dir=tmp_path / "old_out", cache_dir=None, progress=False
    )
    assert plain["dataset"]["image_size_from"] == "dataset default"


def test_an_export_beside_another_runs_config_keeps_its_own_record(
    pretrained_run: Path, tmp_path: Path
) -> None:
    """Copied into another run's folder (same backbone, other labels and image size), an export
    must not be credited with that run's pre-training: its own metadata wins, with a warning."""
    import shutil

    import yaml

    elsewhere = tmp_path / "other_run"
    elsewhere.mkdir()
    config = yaml.safe_load((pretrained_run / "config.yaml").read_text())
    config["data"]["labels"], config["data"]["image_size"] = "fine", 12
    (elsewhere / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(pretrained_run / "backbone.safetensors", elsewhere / "b.safetensors")
    with pytest.warns(RuntimeWarning, match=r"describes another run .*labels: 'fine' vs 'coarse'"):
        loaded = load_model(ModelSource(checkpoint=elsewhere / "b.safetensors"))
    assert loaded.pretraining is not None
    assert (loaded.pretraining["labels"], loaded.pretraining["image_size"]) == ("coarse", 16)


def test_a_finished_run_whose_final_checkpoint_cannot_be_read_is_not_evaluated_at_an_older_step(
    pretrained_run: Path, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    newest = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
    older = torch.load(newest, weights_only=True)
    older["global_step"] = 1
    torch.save(older, run / "checkpoints" / "ckpt-000000001.pt")  # an earlier step's
    newest.write_bytes(newest.read_bytes()[:-100])  # torn
    with (
        pytest.warns(RuntimeWarning, match="skipping checkpoint"),
        pytest.raises(ValueError, match=r"finished at step \d+, but its newest readable.*step 1"),
    ):
        load_model(ModelSource(checkpoint=run))
    # With no readable checkpoint at all, the message points to the finished backbone.
    (run / "checkpoints" / "ckpt-000000001.pt").unlink()
    with (
        pytest.warns(RuntimeWarning, match="skipping checkpoint"),
        pytest.raises(ValueError, match=r"can be loaded.*backbone\.safetensors"),
    ):
        load_model(ModelSource(checkpoint=run))
    # The finished backbone, named, is what to evaluate instead.
    assert load_model(ModelSource(checkpoint=run / "backbone.safetensors")).feature_dim > 0


def test_an_exports_record_keeps_the_training_subset() -> None:
    # Copied away from its run folder, an export on 512 images and one on 1024 must not read
    # as seeds of one setting (look report compares the subset).
    from look.engine.export import pretraining_metadata
    from look.evaluation.model_source import _pretraining_from_export

    config = {"data": {"dataset": "fashion_mnist", "labels": "coarse", "subset": 512}, "seed": 3}
    metadata = pretraining_metadata(config)
    assert metadata["subset"] == "512"
    # what a user outside look normalises the backbone's inputs with
    assert json.loads(metadata["normalize_mean"]) == [0.2860] * 3
    assert json.loads(metadata["normalize_std"]) == [0.3530] * 3
    assert _pretraining_from_export(metadata)["subset"] == 512  # type: ignore[index]
    del config["data"]["subset"]  # type: ignore[attr-defined]
    assert "subset" not in pretraining_metadata(config)


def test_initial_weights_are_a_setting_by_name_not_by_folder() -> None:
    # Each node may read its own copy of the initial weights: the folder is no setting.
    from look.engine.export import training_settings

    def settings(path: str | None) -> object:
        return training_settings({"model": {"pretrained_weights": path}, "method": {"name": "ce"}})

    assert settings("/nodeA/init.safetensors") == settings("/nodeB/init.safetensors")
    assert settings("/nodeA/init.safetensors") != settings("/nodeA/other.safetensors")
    assert settings(None) != settings("/nodeA/init.safetensors")
