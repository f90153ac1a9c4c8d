from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from look.data.datasets import build_eval_dataset, build_train_dataset
from look.data.sources import (
    DIGITS_CLASSES,
    FASHION_MNIST_CLASSES,
    CorruptImageError,
    UnsupportedImageError,
    decode_image_file,
    load_source,
    read_digits,
    read_idx_dataset,
    read_image_folder,
)
from look.data.spec import DataSpec

FASHION_MNIST_DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")


# ---- (Fashion-)MNIST from IDX files ---------------------------------------------------------


@pytest.mark.parametrize(
    ("compress", "subfolder"),
    [(True, ""), (False, ""), (True, "FashionMNIST/raw"), (False, "FashionMNIST/raw")],
)
def test_idx_dataset_in_both_layouts(
    tmp_path: Path, make_idx_dataset, compress: bool, subfolder: str
) -> None:
    written = make_idx_dataset(tmp_path / subfolder, compress=compress)
    for split in ("train", "test"):
        source = read_idx_dataset("fashion_mnist", tmp_path, split)
        images, labels = written[split]
        assert len(source) == len(images)
        assert source.class_names == FASHION_MNIST_CLASSES
        assert source.native_size == 28
        assert source.labels.dtype == torch.int64
        np.testing.assert_array_equal(source.labels.numpy(), labels)
        loaded = source.load(3)
        assert loaded.dtype == torch.uint8 and loaded.shape == (1, 28, 28)
        np.testing.assert_array_equal(loaded[0].numpy(), images[3])


def test_mnist_uses_its_own_torchvision_folder(tmp_path: Path, make_idx_dataset) -> None:
    make_idx_dataset(tmp_path / "MNIST" / "raw", compress=True)
    source = read_idx_dataset("mnist", tmp_path, "train")
    assert source.class_names[0] == "0 - zero"
    with pytest.raises(FileNotFoundError):
        read_idx_dataset("fashion_mnist", tmp_path, "train")


def test_missing_idx_files_name_the_folders_and_the_fixes(tmp_path: Path) -> None:
    spec = DataSpec("fashion_mnist", root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as caught:
        build_train_dataset(spec, num_views=1, seed=0)
    message = str(caught.value)
    assert str(tmp_path / "nowhere") in message
    assert str(tmp_path / "nowhere" / "FashionMNIST" / "raw") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.root" in message and "data.download" in message


def test_unknown_split_is_a_value_error(tmp_path: Path, make_idx_dataset) -> None:
    make_idx_dataset(tmp_path, compress=True)
    with pytest.raises(ValueError, match="'val' does not exist"):
        read_idx_dataset("fashion_mnist", tmp_path, "val")


def test_cifar_missing_root_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.*data\.download"):
        load_source(DataSpec("cifar100", root=str(tmp_path)), "train")


@pytest.fixture(scope="module")
def real_fashion_mnist():
    if not (FASHION_MNIST_DEBIAN_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not installed in {FASHION_MNIST_DEBIAN_ROOT}")
    spec = DataSpec("fashion_mnist", labels="coarse")
    train, train_info = build_train_dataset(spec, num_views=2, seed=0)
    test, test_info = build_eval_dataset(spec, "test", labels="coarse")
    return train, train_info, test, test_info


def test_real_fashion_mnist_sizes_and_coarse_labels(real_fashion_mnist) -> None:
    train, train_info, test, test_info = real_fashion_mnist
    assert (len(train), len(test)) == (60000, 10000)
    assert (train_info.num_samples, test_info.num_samples) == (60000, 10000)
    assert train_info.fine_class_names == FASHION_MNIST_CLASSES
    assert len(train_info.fine_class_names) == 10 and train_info.num_classes == 4
    assert train_info.image_size == 28
    fine_labels = torch.tensor(train_info.fine_labels)
    assert torch.bincount(fine_labels).tolist() == [6000] * 10
    expected = {
        "T-shirt/top": "Tops", "Pullover": "Tops", "Coat": "Tops", "Shirt": "Tops",
        "Trouser": "Trousers and dresses", "Dress": "Trousers and dresses",
        "Sandal": "Footwear", "Sneaker": "Footwear", "Ankle boot": "Footwear", "Bag": "Bags",
    }  # fmt: skip
    for fine_index, coarse_index in enumerate(train_info.fine_to_coarse):
        fine_name = train_info.fine_class_names[fine_index]
        assert train_info.class_names[coarse_index] == expected[fine_name]
    mapping = torch.tensor(train_info.fine_to_coarse)
    assert torch.equal(train_info.labels, mapping[fine_labels])
    assert torch.equal(train.labels, train_info.labels)
    assert torch.bincount(train_info.labels).tolist() == [24000, 12000, 18000, 6000]


def test_real_fashion_mnist_items(real_fashion_mnist) -> None:
    train, _, test, _ = real_fashion_mnist
    views, label, index = train[59999]
    assert index == 59999 and 0 <= label < 4
    assert len(views) == 2 and all(
        v.shape == (3, 28, 28) and v.dtype == torch.float32 for v in views
    )
    image, label = test[0]
    assert image.shape == (3, 28, 28) and label == 2  # first test image is an ankle boot (footwear)
    assert torch.equal(image[0], image[1])


# ---- digits ---------------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_disjoint() -> None:
    train = read_digits("train", 32)
    test = read_digits("test", 32)
    assert (len(train), len(test)) == (1257, 540)
    assert train.class_names == DIGITS_CLASSES and train.native_size == 32
    train_fraction = torch.bincount(train.labels, minlength=10) / (
        torch.bincount(train.labels, minlength=10) + torch.bincount(test.labels, minlength=10)
    )
    assert torch.all((train_fraction - 0.7).abs() < 0.02)
    train_pixels = train.images.flatten(1)
    test_pixels = test.images.flatten(1)
    # No test image also appears in the training split (digits has no exact duplicates).
    assert not (train_pixels[:, None, :] == test_pixels[None, :200, :]).all(dim=2).any()
    again = read_digits("train", 32)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)


def test_digits_native_size_and_upsampling() -> None:
    native = read_digits("train", 8)
    upsampled = read_digits("train", 32)
    assert native.images.shape[-2:] == (8, 8) and upsampled.images.shape[-2:] == (32, 32)
    assert int(native.images.max()) == 255  # 16 → 255
    # Bilinear upsampling keeps the mean brightness.
    ratio = upsampled.images.float().mean() / native.images.float().mean()
    assert abs(float(ratio) - 1.0) < 0.02


# ---- ImageFolder ----------------------------------------------------------------------------


def test_image_folder_reads_train_and_val(image_folder: Path) -> None:
    train = read_image_folder(image_folder, "train", "train", corrupt_images="fail")
    val = read_image_folder(image_folder, "train", "val", corrupt_images="fail")
    assert train.class_names == ("cat", "dog") and len(train) == 6 and len(val) == 2
    image = train.load(4)
    assert image.shape == (3, 20, 20) and image.dtype == torch.uint8
    assert image[:, 0, 0].tolist() == [30, 30, 200] and int(train.labels[4]) == 1
    # "test" falls back to val/ when there is no test/ folder.
    assert (
        read_image_folder(image_folder, "train", "test", corrupt_images="fail").paths == val.paths
    )


def test_image_folder_root_itself_is_the_training_set(tmp_path: Path, make_png) -> None:
    for name in ("a", "b"):
        make_png(tmp_path / name / "0.png", (1, 2, 3))
    source = read_image_folder(tmp_path, "train", "train", corrupt_images="fail")
    assert source.class_names == ("a", "b")
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        read_image_folder(tmp_path, "train", "test", corrupt_images="fail")


def test_empty_class_folder_is_named(image_folder: Path) -> None:
    empty = image_folder / "train" / "bird"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
        read_image_folder(image_folder, "train", "train", corrupt_images="fail")


def test_an_empty_class_folder_of_another_split_is_warned_about_like_a_missing_one(
    image_folder: Path,
) -> None:
    # A small validation set may lack a class: an empty folder there says the same.
    classes = read_image_folder(image_folder, "train", "train", corrupt_images="fail").class_names
    empty = image_folder / "val" / classes[0]
    shutil.rmtree(empty, ignore_errors=True)
    empty.mkdir(parents=True)
    with pytest.warns(UserWarning, match=r"1 empty class folder"):
        source = read_image_folder(image_folder, "train", "val", corrupt_images="fail")
    assert 0 not in source.labels.tolist()


def test_val_class_folder_unknown_to_train_is_rejected(image_folder: Path, make_png) -> None:
    make_png(image_folder / "val" / "horse" / "0.png", (0, 0, 0))
    with pytest.raises(ValueError, match="horse"):
        read_image_folder(image_folder, "train", "val", corrupt_images="fail")


@pytest.mark.parametrize("dataset", ["imagefolder", "fashion_mnist", "cifar10"])
def test_root_that_is_a_file_is_named_as_such(tmp_path: Path, dataset: str) -> None:
    a_file = tmp_path / "images.zip"
    a_file.write_bytes(b"PK")
    with pytest.raises(ValueError, match=rf"root {re.escape(str(a_file))} is a file, not a folder"):
        load_source(DataSpec(dataset, root=str(a_file)), "train")


def test_hidden_folders_are_not_classes(image_folder: Path, make_png) -> None:
    for split in ("train", "val"):
        make_png(image_folder / split / ".ipynb_checkpoints" / "0.png", (9, 9, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train = read_image_folder(image_folder, "train", "train", corrupt_images="fail")
        val = read_image_folder(image_folder, "train", "val", corrupt_images="fail")
    assert train.class_names == ("cat", "dog") and (len(train), len(val)) == (6, 2)
    assert not any(".ipynb_checkpoints" in path for path in (*train.paths, *val.paths))
    # Also when the root itself is the training split.
    root_only = read_image_folder(image_folder / "train", "train", "train", corrupt_images="fail")
    assert root_only.class_names == ("cat", "dog")


def test_val_split_lacking_train_classes_warns_naming_them(image_folder: Path, make_png) -> None:
    birds = [f"bird_{i:02d}" for i in range(12)]
    for name in birds:
        make_png(image_folder / "train" / name / "0.png", (0, 200, 0))
    with pytest.warns(UserWarning, match="lacks 12 of the 14 class folders") as caught:
        val = read_image_folder(image_folder, "train", "val", corrupt_images="fail")
    message = str(caught[0].message)
    assert "'bird_09'" in message and "'bird_10'" not in message and "and 2 more" in message
    assert val.class_names[:2] == ("bird_00", "bird_01") and len(val) == 2


def test_missing_image_folder_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent"))):
        load_source(DataSpec("imagefolder", root=str(tmp_path / "absent")), "train")
    with pytest.raises(ValueError, match=r"data\.root is required"):
        load_source(DataSpec("imagefolder"), "train")


def test_corrupt_image_fails_naming_the_file(image_folder: Path, make_truncated_png) -> None:
    bad = make_truncated_png(image_folder / "train" / "cat" / "1.png")
    dataset, _ = build_train_dataset(
        DataSpec("imagefolder", root=str(image_folder)), num_views=1, seed=0
    )
    dataset[0]  # a readable one
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        dataset[1]


def test_sixteen_bit_images_are_scaled_and_float_images_refused(
    image_folder: Path, tmp_path: Path
) -> None:
    """``convert("RGB")`` clipped every 16-bit value above 255 to white (a microscope's or a
    scanner's images trained as blank ones); a float image's range is unknown, so it is refused,
    also where unreadable files are skipped (each such file would be)."""
    from PIL import Image

    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    for suffix in ("png", "tif"):
        Image.fromarray(ramp).save(tmp_path / f"ramp.{suffix}")
        decoded = decode_image_file(str(tmp_path / f"ramp.{suffix}"))
        assert decoded.shape == (3, 16, 16) and decoded.dtype == torch.uint8
        expected = torch.from_numpy((ramp.astype(np.int64) * 255 + 32767) // 65535).to(torch.uint8)
        assert torch.equal(decoded[0], expected) and torch.equal(decoded[2], expected)
    assert float(decoded.float().mean()) == pytest.approx(127.5, abs=0.5)

    float_image = image_folder / "train" / "cat" / "1.tif"
    Image.fromarray(ramp.astype(np.float32) / 65535).save(float_image)
    spec = DataSpec("imagefolder", root=str(image_folder), image_size=16, corrupt_images="skip")
    dataset, _ = build_train_dataset(spec, num_views=1, seed=0)
    index = dataset.source.file_paths.index(str(float_image))
    with pytest.raises(UnsupportedImageError, match=r"1\.tif has floating-point pixels"):
        dataset[index]


def test_corrupt_image_is_skipped_deterministically_and_counted(
    image_folder: Path, make_truncated_png
) -> None:
    bad = make_truncated_png(image_folder / "train" / "cat" / "1.png")
    (image_folder / "train" / "dog" / "2.png").write_bytes(b"this is not a png")
    spec = DataSpec("imagefolder", root=str(image_folder), image_size=16, corrupt_images="skip")
    dataset, info = build_train_dataset(spec, num_views=1, seed=0)
    assert dataset.num_skipped_files == 0
    with pytest.warns(RuntimeWarning, match=r"1\.png"):
        _, label, index = dataset[1]
    assert (label, index) == (0, 1)  # label and index of the requested sample are kept
    # The substitute is the next readable image of the same class: cat/2.png, (200, 30, 30).
    source = dataset.source
    assert torch.equal(source.load(1), source.load(2))
    assert dataset.num_skipped_files == 1 and dataset.skipped_files == (str(bad),)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset[1]  # a known bad file warns only once
    # Unreadable files found in DataLoader workers are counted in the main process too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(DataLoader(dataset, batch_size=2, num_workers=2))
    assert sum(len(b[1]) for b in batches) == 6
    assert dataset.num_skipped_files == 2
    assert info.num_samples == 6


def test_whole_class_unreadable_is_an_error(tmp_path: Path, make_truncated_png, make_png) -> None:
    make_truncated_png(tmp_path / "train" / "a" / "0.png")
    make_truncated_png(tmp_path / "train" / "a" / "1.png")
    make_png(tmp_path / "train" / "b" / "0.png", (0, 0, 0))
    source = read_image_folder(tmp_path, "train", "train", corrupt_images="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CorruptImageError, match="no readable image left in class 'a'"):
            source.load(0)


@pytest.mark.parametrize(
    ("folders", "named"),
    [
        (("Train/cat", "Train/dog", "Val/cat", "Val/dog"), "Train/, Val/"),
        (("Training/cat", "Testing/cat"), "Testing/, Training/"),
        (("cat", "dog", "val/cat", "val/dog"), "val/"),
    ],
)
def test_split_folders_under_other_names_are_not_taken_for_classes(
    tmp_path: Path, make_png, folders: tuple[str, ...], named: str
) -> None:
    """Without an exact train/, the root's sub-folders are the classes: split folders spelled
    otherwise would become classes, mixing the test images into training, without a word."""
    for folder in folders:
        make_png(tmp_path / "root" / folder / "0.png", (10, 20, 30))
    spec = DataSpec("imagefolder", root=str(tmp_path / "root"))
    with pytest.raises(ValueError, match=rf"no train/ folder.*but {re.escape(named)} look like"):
        build_train_dataset(spec, num_views=1, seed=0)


def test_the_listing_keeps_torchvisions_order_and_leaves_out_litter_and_link_loops(
    tmp_path: Path, make_png
) -> None:
    """Hidden files at any depth are tools' litter; a link back up (``cat/up -> ..``) listed
    every class's images as cats and one into another class mislabelled its images; a broken
    class link and images Pillow reads under another extension were dropped without a word."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    train = tmp_path / "root" / "train"
    for name in ("cat", "dog"):
        for i in range(2):
            make_png(train / name / f"{i}.png", (10, 20, 30))
        make_png(train / name / "nested" / "deeper" / "2.PNG", (10, 20, 30))
    expected = make_dataset(str(train), {"cat": 0, "dog": 1}, extensions=IMG_EXTENSIONS)
    spec = DataSpec("imagefolder", root=str(tmp_path / "root"))

    def listed() -> list[tuple[str, int]]:
        source, _ = build_train_dataset(spec, num_views=1, seed=0)
        return list(zip(source.source.file_paths, source.source.labels.tolist(), strict=True))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert listed() == expected  # the same images in the same order as before

    (train / "cat" / "._0.png").write_bytes(b"macOS metadata")
    make_png(train / "dog" / ".ipynb_checkpoints" / "0-checkpoint.png", (10, 20, 30))
    (train / "cat" / "up").symlink_to("..")
    (train / "cat" / "dogs").symlink_to(train / "dog")
    (train / "bird").symlink_to(tmp_path / "nowhere")
    make_png(train / "dog" / "3.png", (10, 20, 30))
    (train / "dog" / "3.png").rename(train / "dog" / "3.gif")
    with pytest.warns(UserWarning) as caught:
        assert listed() == expected
    messages = "\n".join(str(w.message) for w in caught)
    assert "bird is a link to nothing" in messages
    assert "left out 2 linked folder(s)" in messages and "cat/up" in messages
    assert "left out 1 file(s)" in messages and ".gif: 1" in messages


def test_class_names_in_another_unicode_form_are_the_same_class(tmp_path: Path, make_png) -> None:
    """macOS tools write names decomposed (NFD); a grouping typed by hand, or another split, has
    them composed (NFC). They look identical, and were reported as missing and unknown at once."""
    import unicodedata

    composed = unicodedata.normalize("NFC", "crème_brûlée")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    root = tmp_path / "root"
    for split, name in (("train", decomposed), ("val", composed)):
        for other in (name, "tart"):
            make_png(root / split / other / "0.png", (10, 20, 30))
    grouping = tmp_path / "desserts.json"
    grouping.write_text(f'{{"{composed}": "cream", "tart": "pastry"}}', encoding="utf-8")
    spec = DataSpec("imagefolder", root=str(root), labels=str(grouping))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no split "lacks" the class
        test, info = build_eval_dataset(spec, "val", str(grouping))
    assert info.fine_class_names == (decomposed, "tart")  # the training folder's names
    assert info.class_names == ("cream", "pastry") and test.labels.tolist() == [0, 1]


def test_two_class_folders_of_one_name_in_two_unicode_forms_are_refused(
    tmp_path: Path, make_png
) -> None:
    # Merged, they made one class of both folders' images and an empty class beside it, under
    # the same-looking name twice.
    import unicodedata

    composed = unicodedata.normalize("NFC", "café")
    decomposed = unicodedata.normalize("NFD", composed)
    root = tmp_path / "root"
    for name in (composed, decomposed, "tea"):
        make_png(root / "train" / name / "0.png", (10, 20, 30))
    if len({p.name for p in (root / "train").iterdir()}) < 3:
        pytest.skip("this file system stores one Unicode form of a name")
    with pytest.raises(
        ValueError, match=r"differ only in their Unicode form.*'cafe\\u0301' and 'caf\\xe9'"
    ):
        build_train_dataset(DataSpec("imagefolder", root=str(root)), num_views=1, seed=0)


@pytest.mark.parametrize(("dataset", "brightness", "warned"), [
    ("mnist", 73, True), ("fashion_mnist", 73, False), ("fashion_mnist", 33, True),
    ("mnist", 33, False),
])  # fmt: skip
def test_official_size_idx_files_that_look_like_the_other_dataset_are_warned_about(
    tmp_path: Path, dataset: str, brightness: int, warned: bool
) -> None:
    # MNIST and Fashion-MNIST ship files of the same names: a root of one read as the other
    # would train on the wrong images under the wrong class names. Mean intensities: 0.13, 0.29.
    from look.data.idx import write_idx

    rng = np.random.default_rng(0)
    images = rng.integers(0, 2 * brightness + 1, size=(10_000, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", (np.arange(10_000) % 10).astype(np.uint8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_idx_dataset(dataset, tmp_path, "test")
    messages = [str(w.message) for w in caught if "look like" in str(w.message)]
    assert bool(messages) == warned, messages
    if warned:
        assert f"is read as {dataset}" in messages[0] and "check data.root" in messages[0]


def test_class_members_are_each_classs_indices_in_order() -> None:
    from look.data.sources import class_members

    labels = np.random.default_rng(0).integers(0, 7, size=500)
    labels[labels == 3] = 4  # class 3 absent
    members = class_members(labels, 8)  # class 7 beyond the labels
    assert len(members) == 8
    for c in range(8):
        assert np.array_equal(members[c], np.flatnonzero(labels == c))


def test_a_file_name_that_is_no_valid_utf8_is_listed_identified_and_fingerprinted(
    image_folder: Path,
) -> None:
    # Names copied from an old Windows or Samba share keep latin-1 bytes: the whole dataset
    # used to be refused by an encode error that named no file.
    import os

    from look.data import training_data_identity
    from look.evaluation.features import data_files_fingerprint

    odd = os.fsdecode(bytes(image_folder / "train" / "cat") + b"/caf\xe9.png")
    shutil.copy(image_folder / "train" / "cat" / "0.png", odd)
    spec = DataSpec(dataset="imagefolder", root=str(image_folder))
    train, info = build_train_dataset(spec, num_views=1, seed=0)
    assert odd in train.source.file_paths
    assert len(training_data_identity(train, info)["sha256"]) == 64
    assert data_files_fingerprint(spec, train.source) is not None


def test_an_image_folders_paths_are_one_buffer_read_back_exactly() -> None:
    """The paths live in one NUL-separated buffer (no object per image for forked workers to
    copy): each comes back as it was given, a name that is not UTF-8 included."""
    from look.data.sources import ImageFolderSource

    odd = "/data/train/cat/" + os.fsdecode(b"caf\xe9.png")
    samples = [("/data/train/cat/0.png", 0), (odd, 0), ("/data/train/dog/é 1.png", 1)]
    source = ImageFolderSource(samples, ["cat", "dog"], corrupt_images="fail", description="t")
    assert source.paths == tuple(path for path, _ in samples) == source.file_paths
    assert [source.path(i) for i in range(3)] == [path for path, _ in samples]
    assert source.labels.tolist() == [0, 0, 1]
    rebuilt = ImageFolderSource.from_encoded_paths(
        source.encoded_paths, source.labels, source.class_names, corrupt_images="skip",
        description="t",
    )  # fmt: skip
    assert rebuilt.paths == source.paths and rebuilt.corrupt_images == "skip"
    empty = ImageFolderSource([], ["cat"], corrupt_images="fail", description="t")
    assert len(empty) == 0 and empty.paths == () and empty.skipped_files == ()
    with pytest.raises(ValueError, match="NUL"):
        ImageFolderSource([("a\0b.png", 0)], ["cat"], corrupt_images="fail", description="t")
    with pytest.raises(ValueError, match="2 labels for 1 image paths"):
        ImageFolderSource.from_encoded_paths(
            b"a.png", torch.tensor([0, 0]), ["cat"], corrupt_images="fail", description="t"
        )


def test_inside_each_folder_listed_once_a_split_read_again_reuses_its_listing(
    image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from look.data.sources import each_folder_listed_once
    from tests.listing import count_listings

    listed = count_listings(monkeypatch)
    with each_folder_listed_once():
        first = read_image_folder(image_folder, "train", "train", corrupt_images="fail")
        with each_folder_listed_once():  # nested: the outer scope's listings
            again = read_image_folder(image_folder, "train", "train", corrupt_images="skip")
        read_image_folder(image_folder, "train", "val", corrupt_images="fail")
    assert listed == ["train", "val"]
    # Its own source: its policy, and unreadable files of its own.
    assert again is not first and again.paths == first.paths and again.corrupt_images == "skip"
    assert torch.equal(again.labels, first.labels) and again.labels is not first.labels
    again.record_unreadable([again.paths[0]])
    assert again.num_skipped_files == 1 and first.num_skipped_files == 0
    # Outside: every read lists (the folder may have changed since).
    read_image_folder(image_folder, "train", "train", corrupt_images="fail")
    assert listed == ["train", "val", "train"]


def test_packed_paths_read_back_as_a_sequence_of_strings() -> None:
    from look.data.sources import PackedPaths

    names = ["/a/0.png", "/a/" + os.fsdecode(b"caf\xe9.png"), "/b/é 1.png"]
    packed = PackedPaths(names)
    assert len(packed) == 3 and list(packed) == names and packed.as_tuple() == tuple(names)
    assert packed[-1] == names[-1] and packed[1:] == tuple(names[1:]) and packed[::2] == (
        names[0], names[2],
    )  # fmt: skip
    assert PackedPaths(packed.encoded).as_tuple() == tuple(names)
    with pytest.raises(IndexError):
        packed[3]
    for bad in ([""], ["a.png", "b\0c.png"]):
        with pytest.raises(ValueError, match="a path is empty or holds a NUL character"):
            PackedPaths(bad)
    assert (
        len(PackedPaths([])) == 0
        and PackedPaths([]).as_tuple() == ()
        and list(PackedPaths([])) == []
    )


def test_a_listing_moves_below_another_root_only_at_the_start_of_each_path() -> None:
    from look.data.sources import PackedPaths, rerooted_listing

    latin_1 = os.fsdecode(b"caf\xe9.png")
    paths = [
        "/data/a/train/cat/1.png",
        f"/data/a/train/dog/{latin_1}",
        "/data/a/train/dog/data/a/2.png",
    ]
    payload = (
        "classes",
        PackedPaths(paths).encoded,
        "labels",
        "imagefolder train from /data/a/train",
    )
    moved = rerooted_listing(payload, "/data/a", "/local/copy")
    assert PackedPaths(moved[1]).as_tuple() == (
        "/local/copy/train/cat/1.png",
        f"/local/copy/train/dog/{latin_1}",
        "/local/copy/train/dog/data/a/2.png",
    )
    assert moved[3] == "imagefolder train from /local/copy/train"
    assert rerooted_listing(payload, "/data/a", "/data/a") is payload


def test_an_image_past_pillows_size_guard_is_unsupported_not_corrupt(
    tmp_path: Path, make_png, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reported as corrupt, with the advice to skip it: every large image of a folder would then
    # have been swapped for another image of its class.
    from PIL import Image

    from look.data.sources import UnsupportedImageError, decode_image_file

    path = make_png(tmp_path / "big.png", (10, 20, 30), size=20)  # 400 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the error comes past twice that
    with pytest.raises(UnsupportedImageError, match=r"big\.png is not decoded.*resize it"):
        decode_image_file(str(path))


def test_a_photo_with_an_exif_orientation_comes_out_upright(tmp_path: Path) -> None:
    from PIL import Image

    from look.data.sources import decode_image_file

    stored = Image.new("RGB", (48, 16), (200, 30, 30))  # stored sideways, as a phone does
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    stored.save(tmp_path / "photo.jpg", exif=exif)
    assert tuple(decode_image_file(str(tmp_path / "photo.jpg")).shape) == (3, 48, 16)


def test_images_beside_the_class_folders_and_camera_formats_are_named_not_dropped(
    tmp_path: Path, make_png
) -> None:
    root = tmp_path / "root"
    for name in ("cat", "dog"):
        make_png(root / "train" / name / "0.png", (10, 20, 30))
    make_png(root / "train" / "stray.png", (10, 20, 30))
    (root / "train" / "cat" / "IMG_0001.HEIC").write_bytes(b"\0" * 16)
    with pytest.warns(UserWarning) as caught:
        build_train_dataset(DataSpec("imagefolder", root=str(root)), num_views=1, seed=0)
    messages = " | ".join(str(w.message) for w in caught)
    assert "left out 1 image(s) lying in" in messages and "stray.png" in messages
    assert ".heic: 1" in messages
