"""Training data: Fashion-MNIST IDX files or an image folder, as uint8 arrays prepared once.

Every image goes through :mod:`sepconv.preprocess` (``decode`` -> ``prepare``) here and
through ``normalize`` per batch in :mod:`model.train`, so the network is trained on exactly the
pixels the service will feed it. Nothing is downloaded: Fashion-MNIST comes from Debian's
``dataset-fashion-mnist`` package.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sepconv import preprocess
from sepconv.preprocess import Preprocessing

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

#: IDX type byte -> big-endian numpy dtype (the IDX format's own table).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
#: Decompression-bomb guard for the image folder: far above any photo a user would train on.
MAX_PIXELS = 100_000_000


class DataError(ValueError):
    """The data is missing, corrupt or unusable; the message names the file."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, H, W, C), already at the model's input size
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, limit: int | None, seed: int) -> Split:
        """A seeded random subset of at most ``limit`` images (all of them when ``None``)."""
        if limit is None or limit >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:limit])
        return Split(self.images[idx], self.labels[idx])


@dataclass(frozen=True)
class Dataset:
    name: str
    labels: list[str]
    train: Split
    test: Split
    pixels: Preprocessing  # mean/std measured on the training split

    @property
    def fingerprint(self) -> str:
        """sha256 of exactly what the network is trained and tested on (labels and pixels)."""
        h = hashlib.sha256(json.dumps(self.labels).encode())
        for part in (self.train.images, self.train.labels, self.test.images, self.test.labels):
            h.update(str(part.shape).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        return h.hexdigest()


# ---------------------------------------------------------------------------------- IDX files


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw), checking the magic number and the shape."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip data: {exc}") from exc
    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: bad IDX magic number 0x{raw[:4].hex()}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header says shape {shape} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"{directory / (stem + '.gz')}: no such file (nor {stem} uncompressed); "
        "install Debian's dataset-fashion-mnist package or pass --data-dir"
    )


def _read_idx_split(directory: Path, images_stem: str, labels_stem: str, n_classes: int) -> Split:
    images_path = _find_idx(directory, images_stem)
    labels_path = _find_idx(directory, labels_stem)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) == 0:
        raise DataError(f"{images_path}: holds no images")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(f"{labels_path}: labels must lie in 0..{n_classes - 1}")
    return Split(images[..., None], labels.astype(np.int64))


def _resize_all(images: np.ndarray, pixels: Preprocessing) -> np.ndarray:
    """Resize through the service's ``prepare`` so serving resizes exactly the same way."""
    mode = "L" if images.shape[-1] == 1 else "RGB"
    out = np.empty((len(images), pixels.input_size, pixels.input_size, pixels.channels), np.uint8)
    for i, img in enumerate(images):
        out[i] = preprocess.prepare(
            Image.fromarray(img.squeeze(-1) if mode == "L" else img), pixels
        )
    return out


def load_fashion_mnist(
    directory: str | Path = FASHION_MNIST_DIR, *, input_size: int = 28, color_mode: str = "L"
) -> Dataset:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(
            f"{directory}: no such directory; install Debian's dataset-fashion-mnist package "
            "or pass --data-dir"
        )
    n = len(FASHION_MNIST_LABELS)
    train = _read_idx_split(directory, *FASHION_MNIST_FILES["train"], n)
    test = _read_idx_split(directory, *FASHION_MNIST_FILES["test"], n)
    # Square in, square out: centre-crop equals stretch here, and it is the better policy for
    # the non-square photos the service will be sent.
    pixels = Preprocessing.neutral(input_size, color_mode)
    if input_size != train.images.shape[1] or color_mode != "L":
        train = Split(_resize_all(train.images, pixels), train.labels)
        test = Split(_resize_all(test.images, pixels), test.labels)
    return _with_stats(Dataset("fashion-mnist", list(FASHION_MNIST_LABELS), train, test, pixels))


def progress(iterable, **kwargs):
    """A tqdm bar that redraws often on a terminal and only every few seconds in a log file."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(iterable, mininterval=0.1 if interactive else 5.0, leave=False, **kwargs)


def iter_batches(
    n: int, batch_size: int, *, rng: np.random.Generator | None = None, drop_last: bool = False
) -> list[np.ndarray]:
    """Index arrays covering ``range(n)``: shuffled when ``rng`` is given, in order otherwise."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    # Never drop the only batch: a tiny data set still has to train.
    stop = n - n % batch_size if drop_last and n > batch_size else n
    return [order[start : start + batch_size] for start in range(0, stop, batch_size)]


# ------------------------------------------------------------------------------- image folder


def _is_candidate(path: Path) -> bool:
    # Dotfiles are OS litter (.DS_Store, ._foo.jpg); everything else must be an image.
    return path.is_file() and not path.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory; expected one subfolder per class")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(dirs) < 2:
        raise DataError(
            f"{root}: found {len(dirs)} class subfolder(s); an image folder needs one subfolder "
            "per class and at least two classes"
        )
    return dirs


def _detect_color_mode(files: list[Path]) -> str:
    """``L`` when every image is single-channel (read from the headers only), else ``RGB``."""
    for path in files:
        try:
            with Image.open(path) as img:
                if img.mode not in ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"):
                    return "RGB"
        except Exception:  # noqa: BLE001 - the full decode below reports it with the reason
            return "RGB"
    return "L"


def _decode_file(path: Path, pixels: Preprocessing) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    try:
        return preprocess.prepare(preprocess.decode(data, pixels, max_pixels=MAX_PIXELS), pixels)
    except preprocess.ImageError as exc:
        raise DataError(f"{path}: {exc}") from exc


def load_image_folder(
    root: str | Path,
    *,
    input_size: int,
    color_mode: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    resize: str = "center-crop",
) -> Dataset:
    """Read ``root/<class>/<image>``: labels are the folder names (sorted), split per class.

    The held-out split is stratified and depends only on ``seed`` and the file names, so the
    same folder always gives the same split.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = Path(root)
    dirs = _class_dirs(root)
    files_per_class = []
    for d in dirs:
        files = sorted(p for p in d.iterdir() if _is_candidate(p))
        if not files:
            raise DataError(f"{d}: class folder holds no images")
        if len(files) < 2:
            raise DataError(
                f"{d}: class folder holds 1 image; at least 2 are needed for a held-out split"
            )
        files_per_class.append(files)
    all_files = [f for files in files_per_class for f in files]
    mode = color_mode or _detect_color_mode(all_files)
    pixels = Preprocessing.neutral(input_size, mode, resize=resize)
    rng = np.random.default_rng(seed)
    train_idx, test_idx, labels = [], [], []
    offset = 0
    for cls, files in enumerate(files_per_class):
        order = rng.permutation(len(files)) + offset
        n_test = min(len(files) - 1, max(1, round(len(files) * test_fraction)))
        test_idx.extend(order[:n_test].tolist())
        train_idx.extend(order[n_test:].tolist())
        labels.extend([cls] * len(files))
        offset += len(files)
    images = np.empty((len(all_files), input_size, input_size, pixels.channels), np.uint8)
    for i, path in enumerate(progress(all_files, desc="decode", unit="img")):
        images[i] = _decode_file(path, pixels)
    y = np.asarray(labels, np.int64)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    dataset = Dataset(
        name=f"folder:{root.resolve().name}",
        labels=[d.name for d in dirs],
        train=Split(images[train_idx], y[train_idx]),
        test=Split(images[test_idx], y[test_idx]),
        pixels=pixels,
    )
    log.info(
        "%s: %d classes, %d train / %d held-out images, colour %s",
        root,
        len(dirs),
        len(dataset.train),
        len(dataset.test),
        mode,
    )
    return _with_stats(dataset)


def _with_stats(dataset: Dataset) -> Dataset:
    """Fill mean/std with the per-channel statistics of the training pixels."""
    x = dataset.train.images.reshape(-1, dataset.train.images.shape[-1])
    # Summing in chunks keeps memory flat for large folders.
    total = np.zeros(x.shape[1])
    total_sq = np.zeros(x.shape[1])
    for start in range(0, len(x), 1 << 22):
        chunk = x[start : start + (1 << 22)].astype(np.float64) / 255.0
        total += chunk.sum(0)
        total_sq += (chunk**2).sum(0)
    mean = total / len(x)
    std = np.sqrt(np.maximum(total_sq / len(x) - mean**2, 1e-12))
    pixels = dataset.pixels.model_copy(
        update={
            "mean": [round(float(m), 4) for m in mean],
            "std": [round(max(float(s), 1e-3), 4) for s in std],
        }
    )
    return Dataset(dataset.name, dataset.labels, dataset.train, dataset.test, pixels)


def load_data(
    source: str,
    *,
    input_size: int,
    color_mode: str | None = None,
    fashion_dir: str | Path = FASHION_MNIST_DIR,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """``source`` is ``fashion-mnist`` or the path of an image folder."""
    if source == "fashion-mnist":
        return load_fashion_mnist(fashion_dir, input_size=input_size, color_mode=color_mode or "L")
    return load_image_folder(
        source, input_size=input_size, color_mode=color_mode, test_fraction=test_fraction, seed=seed
    )
