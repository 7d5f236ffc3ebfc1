"""Data: stratified splits, channel conversion, the Debian copy, batch augmentation, image decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA_ROOT, needs_fashion
from PIL import Image

from fcclass.config.sections import AugmentConfig, DataConfig
from fcclass.data import BatchPreprocess, augment_batch, convert_channels, load_dataset, load_image, make_loader, stratified_take
from fcclass.errors import DataError


def test_stratified_take_keeps_class_proportions_and_is_seeded() -> None:
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    taken, rest = stratified_take(labels, 100, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[taken]).tolist() == [60, 30, 10]
    assert len(set(taken.tolist()) & set(rest.tolist())) == 0 and len(taken) + len(rest) == 1000
    again, _ = stratified_take(labels, 100, torch.Generator().manual_seed(0))
    other, _ = stratified_take(labels, 100, torch.Generator().manual_seed(1))
    assert torch.equal(taken, again) and not torch.equal(taken, other)


@needs_fashion
def test_fashion_mnist_splits_are_real_stratified_and_disjoint() -> None:
    ds = load_dataset(DataConfig(root=str(DATA_ROOT), download=False, limit_train=2000, limit_test=300), seed=0)
    assert ds.info.class_names[0] == "T-shirt/top" and ds.info.class_names[-1] == "Ankle boot"
    assert ds.info.input_shape == (1, 28, 28)
    assert len(ds.train) == 1800 and len(ds.val) == 200 and len(ds.test) == 300
    assert ds.info.train_counts == [180] * 10 and ds.info.val_counts == [20] * 10
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.float().std() > 50  # real pictures, not blanks
    train_rows = {bytes(img.numpy()) for img in ds.train.images}
    assert not any(bytes(img.numpy()) in train_rows for img in ds.val.images)


@needs_fashion
def test_resize_and_channel_options_apply_to_the_data() -> None:
    ds = load_dataset(DataConfig(root=str(DATA_ROOT), download=False, limit_train=100, limit_test=10,
                                 image_size=[32, 32], channels=3), seed=0, splits=("test",))
    assert ds.test.images.shape == (10, 3, 32, 32)
    assert torch.equal(ds.test.images[:, 0], ds.test.images[:, 2])


def test_missing_dataset_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found under .*To get it.*(internet|data.root)"):
        load_dataset(DataConfig(dataset="kmnist", root=str(tmp_path), download=False), seed=0)


def test_debian_copy_is_unpacked_for_torchvision(tmp_path: Path) -> None:
    from fcclass.config.registries import DATASETS
    from fcclass.data import unpack_debian_copy

    source = DATASETS["fashion_mnist"]
    if not Path(source.debian_dir).is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    unpack_debian_copy(source, tmp_path)
    raw = tmp_path / "FashionMNIST" / "raw"
    assert (raw / "t10k-labels-idx1-ubyte").stat().st_size == 10008  # 8-byte header + 10,000 labels


def test_channel_conversion_uses_luma_and_repeats_gray() -> None:
    rgb = torch.tensor([255, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    assert convert_channels(rgb, 1).item() == round(0.299 * 255)
    gray = torch.full((2, 1, 4, 4), 7, dtype=torch.uint8)
    assert convert_channels(gray, 3).shape == (2, 3, 4, 4)


def test_augmentation_changes_training_batches_only() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 12, 12)
    flipped = augment_batch(x, AugmentConfig(horizontal_flip=True), gen)
    same = [(torch.equal(a, b)) for a, b in zip(flipped, x)]
    mirrored = [(torch.equal(a, b.flip(2))) for a, b in zip(flipped, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54
    cropped = augment_batch(x, AugmentConfig(random_crop_padding=2), gen)
    assert cropped.shape == x.shape and not torch.equal(cropped, x)
    rotated = augment_batch(x, AugmentConfig(rotation=30), gen)
    assert rotated.shape == x.shape and not torch.allclose(rotated, x)
    prep = BatchPreprocess([0.5], [0.25], AugmentConfig(horizontal_flip=True), gen)
    u8 = (x * 255).to(torch.uint8)
    assert torch.equal(prep(u8, train=False), prep(u8, train=False))  # eval is deterministic
    assert torch.allclose(prep(u8[:1], train=False), (u8[:1].float() / 255 - 0.5) / 0.25)


def test_balanced_sampler_oversamples_minority_classes() -> None:
    from fcclass.data import Split

    labels = torch.tensor([0] * 900 + [1] * 100)
    split = Split(labels, torch.zeros(1000, 1, 2, 2, dtype=torch.uint8))
    seen = torch.cat([y for _, y in make_loader(split, 100, True, 0, 1, (2, 2), balanced=True)])
    assert len(seen) == 1000 and 400 < int((seen == 1).sum()) < 600
    plain = torch.cat([y for _, y in make_loader(split, 100, True, 0, 1, (2, 2))])
    assert int((plain == 1).sum()) == 100


def test_image_decoding_converts_modes_and_honours_exif(tmp_path: Path) -> None:
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (6, 4), (255, 0, 0, 255)).save(rgba)
    assert load_image(rgba, 1).shape == (1, 4, 6)
    assert load_image(rgba, 3)[:, 0, 0].tolist() == [255, 0, 0]
    deep = tmp_path / "16bit.png"
    Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16)).save(deep)
    assert load_image(deep, 1).max().item() == 255
    rotated = tmp_path / "exif.jpg"
    img = Image.new("RGB", (8, 4), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    img.save(rotated, exif=exif)
    assert load_image(rotated, 1).shape == (1, 8, 4)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_broken_files_are_named_in_the_error(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(content)
    with pytest.raises(DataError, match="broken.png"):
        load_image(bad, 1)


def test_truncated_png_is_reported(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good)
    bad = tmp_path / "truncated.png"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(DataError, match="truncated.png"):
        load_image(bad, 1)


# ----------------------------------------------------------------------------- rotation keeps the picture's shape
def test_rotation_of_a_non_square_image_does_not_stretch_it() -> None:
    """A 90-degree turn of a wide image with a centred square must give the same square, as torchvision rotates it
    (the old affine grid, in per-axis normalised coordinates, turned the square into a 2:1 bar)."""
    import math

    from torchvision.transforms.v2 import functional as TF

    from fcclass.data import rotate

    x = torch.zeros(1, 1, 20, 40)
    x[:, :, 6:14, 16:24] = 1.0  # an 8x8 square in the middle
    ours = rotate(x, torch.tensor([math.pi / 2]))
    theirs = TF.rotate(x, 90.0, interpolation=TF.InterpolationMode.BILINEAR)
    flipped = TF.rotate(x, -90.0, interpolation=TF.InterpolationMode.BILINEAR)
    assert min((ours - theirs).abs().max(), (ours - flipped).abs().max()) < 1e-4
    rows, cols = (ours[0, 0] > 0.5).nonzero().unbind(1)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (8, 8)


# ----------------------------------------------------------------------------- hostile files
def _bomb_png(path: Path, side: int = 10_000) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 100 million pixels: over the limit, under Pillow's 2x error
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


def test_the_decompression_bomb_guard_holds_on_many_threads(tmp_path: Path) -> None:
    """predict decodes on threads. The guard used to switch warnings to errors with warnings.catch_warnings(), whose
    process-wide save and restore races between threads: some bombs then slipped through to the decoder."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image as PILImage

    bomb, fine = tmp_path / "bomb.png", tmp_path / "fine.png"
    _bomb_png(bomb)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(fine)
    before = PILImage.MAX_IMAGE_PIXELS

    def load(i: int) -> str:
        try:
            load_image(bomb if i % 2 else fine, 1)
            return "ok"
        except DataError as e:
            return "bomb" if "decompression bomb" in str(e) else str(e)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(load, range(400)))
    assert results == ["ok", "bomb"] * 200
    assert PILImage.MAX_IMAGE_PIXELS == before  # no process-wide setting was touched


def test_special_files_are_refused_without_blocking(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        load_image(fifo, 1)  # opening a FIFO would block forever


def test_hidden_and_apple_double_files_are_not_images(tmp_path: Path) -> None:
    from fcclass.data import list_images

    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / ".hidden" / "b.png")
    assert [p.name for p in list_images(tmp_path)] == ["a.png"]


def test_pixel_data_that_fails_mid_epoch_names_every_bad_file(tmp_path: Path) -> None:
    """Truncated pixel data passes the header check made before training; the loader then lists all such files."""
    from fcclass.data import Split

    files = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32), dtype=np.uint8)).save(path)
        if i in (3, 7, 11):
            path.write_bytes(path.read_bytes()[:200])
        files.append(path)
    loader = make_loader(Split(torch.zeros(12, dtype=torch.long), files=files), 4, False, 0, 1, (32, 32), num_workers=0)
    with pytest.raises(DataError, match=r"Cannot read 3 image\(s\): .*3\.png.*7\.png.*11\.png"):
        list(loader)


def test_each_epoch_order_depends_only_on_seed_and_epoch() -> None:
    from fcclass.data import Split

    split = Split(torch.arange(50), torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1))
    a, b = make_loader(split, 8, True, 3, 1, (1, 1)), make_loader(split, 8, True, 3, 1, (1, 1))
    a.set_epoch(2)
    list(a)  # iterating another epoch first changes nothing
    b.set_epoch(5)
    list(b)
    b.set_epoch(2)
    order = lambda loader: torch.cat([y for _, y in loader]).tolist()  # noqa: E731
    assert order(a) == order(b) and sorted(order(a)) == list(range(50))
    a.set_epoch(3)
    assert order(a) != order(b)


# ----------------------------------------------------------------------------- train.class_weight keys
def test_class_weight_keys_are_label_names_or_keras_indices_unless_labels_are_numbers() -> None:
    from fcclass.data import DataInfo, class_weights

    fashion = DataInfo(["T-shirt/top", "Trouser", "Pullover"], (1, 28, 28))
    assert class_weights({"0": 5.0}, fashion).tolist() == [5.0, 1.0, 1.0]  # Keras: {0: 5.0} is the first label
    assert class_weights({"Pullover": 2.0, "1": 3.0}, fashion).tolist() == [1.0, 3.0, 2.0]
    digits = DataInfo(["3", "8"], (1, 28, 28))
    assert class_weights({"8": 5.0}, digits).tolist() == [1.0, 5.0]  # labels that are numbers: the folder name, not index 8
    cases = [
        (fashion, {"3": 2.0}, ["index 3 is out of range", "0 to 2", "0: T-shirt/top, 1: Trouser, 2: Pullover"]),
        (fashion, {"-1": 2.0}, ["index -1 is out of range"]),
        (fashion, {"0": 2.0, "T-shirt/top": 3.0}, ["'0' and 'T-shirt/top' both name label 'T-shirt/top'"]),
        (fashion, {"Shirts": 2.0, "Coat": 1.0}, ["unknown label 'Shirts'", "unknown label 'Coat'", "T-shirt/top, Trouser, Pullover",
                                                 "or their indices, 0 to 2"]),
        (digits, {"0": 2.0}, ["'0' is not a label", "the labels are 3, 8", "never by index"]),
        (DataInfo(["cat", "7"], (3, 8, 8)), {"1": 2.0}, ["'1' is not a label", "some of them are numbers (7)"]),
    ]
    for info, spec, parts in cases:
        with pytest.raises(DataError) as caught:
            class_weights(spec, info)
        assert str(caught.value).startswith("train.class_weight: ")
        for part in parts:
            assert part in str(caught.value), (spec, str(caught.value))
