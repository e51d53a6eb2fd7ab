"""Data readers: IDX files, image folders, their errors, and parity with serving."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import (
    FASHION_MNIST_LABELS,
    DataError,
    iter_batches,
    load_fashion_mnist,
    load_image_folder,
    read_idx,
)
from model.evaluate import to_input
from sepconv.preprocess import preprocess_bytes

from .conftest import png_bytes


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, type_code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_fashion_dir(root: Path, n_train: int = 30, n_test: int = 20, gz: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root


# ---------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_gzip_and_raw(tmp_path, compress):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = idx_bytes(arr)
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_handles_big_endian_wider_types(tmp_path):
    arr = np.array([[1, -2], [300, 70000]], dtype=np.int32)
    (tmp_path / "i.idx").write_bytes(idx_bytes(arr, 0x0C))
    np.testing.assert_array_equal(read_idx(tmp_path / "i.idx"), arr)


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x00\x00", "too short"),
        (b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad IDX magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "bad IDX magic"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
        (b"\x00\x00\x08\x02" + struct.pack(">II", 2, 2) + b"\x00" * 3, "holds 3"),
        (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
    ],
)
def test_read_idx_errors_name_the_file(tmp_path, payload, match):
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "nope.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_from_generated_idx_files(tmp_path, gz):
    ds = load_fashion_mnist(write_fashion_dir(tmp_path, gz=gz))
    assert ds.labels == FASHION_MNIST_LABELS and ds.labels[9] == "Ankle boot"
    assert ds.train.images.shape == (30, 28, 28, 1) and ds.test.images.shape == (20, 28, 28, 1)
    assert ds.train.labels.dtype == np.int64 and ds.train.labels[:3].tolist() == [0, 1, 2]
    assert (ds.pixels.input_size, ds.pixels.color_mode) == (28, "L")
    # mean/std are measured on the training pixels
    assert ds.pixels.mean[0] == pytest.approx(ds.train.images.mean() / 255, abs=1e-4)
    assert ds.pixels.std[0] == pytest.approx(ds.train.images.std() / 255, abs=1e-4)
    assert len(ds.fingerprint) == 64


def test_fingerprint_changes_with_a_single_pixel(tmp_path):
    ds = load_fashion_mnist(write_fashion_dir(tmp_path))
    again = load_fashion_mnist(tmp_path)
    assert ds.fingerprint == again.fingerprint
    ds.train.images[0, 0, 0, 0] ^= 1
    assert ds.fingerprint != again.fingerprint


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_fashion_mnist(tmp_path / "absent")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: no such file"):
        write_fashion_dir(tmp_path)
        (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_count_mismatch_and_bad_labels(tmp_path):
    write_fashion_dir(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(29, np.uint8))))
    with pytest.raises(DataError, match="30 images but .* 29 labels"):
        load_fashion_mnist(tmp_path)
    labels.write_bytes(gzip.compress(idx_bytes(np.full(30, 10, np.uint8))))
    with pytest.raises(DataError, match="labels must lie in 0..9"):
        load_fashion_mnist(tmp_path)


def test_idx_images_resized_exactly_as_the_service_resizes(tmp_path):
    ds28 = load_fashion_mnist(write_fashion_dir(tmp_path))
    ds = load_fashion_mnist(tmp_path, input_size=32)
    assert ds.train.images.shape == (30, 32, 32, 1)
    served = preprocess_bytes(png_bytes(ds28.train.images[4, :, :, 0]), ds.pixels, max_pixels=10**6)
    trained = to_input(ds.train.images[4:5], ds.pixels)[0]
    assert torch.equal(trained, torch.from_numpy(served))


# ------------------------------------------------------------------------------- image folder


def shape_image(kind: str, size: tuple[int, int], seed: int) -> np.ndarray:
    """A bright circle, square or bar on a dark noisy background, RGB uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = h / 2, w / 2, min(h, w) / 3
    mask = {
        "circle": (yy - cy) ** 2 + (xx - cx) ** 2 < r**2,
        "square": (abs(yy - cy) < r) & (abs(xx - cx) < r),
        "bar": abs(xx - cx) < r / 3,
    }[kind]
    img[mask] = (200, 120 + seed % 50, 60)
    return img


def make_folder(root: Path, per_class: int = 8, formats=("PNG", "JPEG", "BMP", "WEBP")) -> Path:
    for cls in ("circle", "square", "bar"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            fmt = formats[i % len(formats)]
            size = (24 + 3 * i, 20 + 2 * i)  # non-square, different per image
            Image.fromarray(shape_image(cls, size, i)).save(root / cls / f"{i}.{fmt.lower()}", fmt)
    return root


def test_image_folder_labels_split_and_formats(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "circle" / ".DS_Store").write_bytes(b"\x00junk")  # OS litter is skipped
    ds = load_image_folder(root, input_size=16, seed=3)
    assert ds.labels == ["bar", "circle", "square"]  # folder names, sorted
    assert ds.pixels.color_mode == "RGB" and ds.pixels.channels == 3
    assert ds.train.images.shape[1:] == (16, 16, 3) and ds.train.images.dtype == np.uint8
    assert len(ds.train) + len(ds.test) == 24
    # stratified: 20% of each class of 8 is held out
    assert np.bincount(ds.test.labels).tolist() == [2, 2, 2]
    again = load_image_folder(root, input_size=16, seed=3)
    np.testing.assert_array_equal(again.test.images, ds.test.images)
    assert again.fingerprint == ds.fingerprint
    other = load_image_folder(root, input_size=16, seed=4)
    assert other.fingerprint != ds.fingerprint


def test_greyscale_folder_is_detected_as_L(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("L", (10, 12), 40 * i).save(tmp_path / cls / f"{i}.png")
    ds = load_image_folder(tmp_path, input_size=8)
    assert ds.pixels.color_mode == "L" and ds.train.images.shape[-1] == 1
    assert load_image_folder(tmp_path, input_size=8, color_mode="RGB").pixels.channels == 3


def test_folder_images_are_the_tensors_the_service_computes(tmp_path):
    """Training and serving preprocessing are one code path: identical tensors, bit for bit."""
    root = make_folder(tmp_path / "imgs", per_class=5)
    # A phone photo: the pixels are stored sideways and EXIF says how to turn them.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(shape_image("bar", (30, 18), 9)).save(root / "bar" / "z.jpg", exif=exif)
    ds = load_image_folder(root, input_size=20, seed=0)
    trained = torch.cat([to_input(ds.train.images, ds.pixels), to_input(ds.test.images, ds.pixels)])
    served = [
        torch.from_numpy(preprocess_bytes(p.read_bytes(), ds.pixels, max_pixels=10**6))
        for p in sorted(root.glob("*/*"))
    ]
    assert trained.shape == (16, 3, 20, 20) and len(served) == 16
    for tensor in served:
        assert sum(torch.equal(tensor, t) for t in trained) == 1


@pytest.mark.parametrize("case", ["missing", "file", "one-class", "empty-class", "single"])
def test_folder_structure_errors_name_the_path(tmp_path, case):
    root = tmp_path / "data"
    if case == "file":
        root.write_bytes(b"not a dir")
        match = "not a directory"
    elif case == "one-class":
        make_folder(root, per_class=2)
        for cls in ("square", "bar"):
            for f in (root / cls).iterdir():
                f.unlink()
            (root / cls).rmdir()
        match = "1 class subfolder"
    elif case == "empty-class":
        make_folder(root, per_class=2)
        (root / "zeta").mkdir()
        match = "zeta: class folder holds no images"
    elif case == "single":
        make_folder(root, per_class=2)
        (root / "bar" / "1.jpeg").unlink()
        match = "bar: class folder holds 1 image"
    else:
        match = "no such directory"
    with pytest.raises(DataError, match=match) as info:
        load_image_folder(root, input_size=8)
    assert str(root) in str(info.value)


@pytest.mark.parametrize(
    "name, payload, match",
    [
        ("notes.txt", b"hello", "cannot identify image format"),
        ("cut.png", None, "cannot decode image"),
        ("empty.jpg", b"", "empty image body"),
    ],
)
def test_corrupt_image_errors_name_the_file(tmp_path, name, payload, match):
    root = make_folder(tmp_path / "imgs", per_class=2)
    if payload is None:
        noise = np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)
        payload = png_bytes(noise)[:800]  # cut off in the middle of the pixel data
    bad = root / "square" / name
    bad.write_bytes(payload)
    with pytest.raises(DataError, match=match) as info:
        load_image_folder(root, input_size=8)
    assert str(bad) in str(info.value)


def test_iter_batches_covers_everything_once_and_drops_only_when_asked():
    rng = np.random.default_rng(0)
    got = np.concatenate(iter_batches(10, 3, rng=rng))
    assert sorted(got.tolist()) == list(range(10)) and got.tolist() != list(range(10))
    assert [len(b) for b in iter_batches(10, 3, drop_last=True)] == [3, 3, 3]
    assert [len(b) for b in iter_batches(2, 3, drop_last=True)] == [2]
