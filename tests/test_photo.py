"""Photo-sized inputs: reduced decoding, its parity between training and serving, the decode
pool that spreads a request's large images over the cores, and the bench's photo workload."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from bench.photos import photo_jpeg
from model.data import load_image_folder
from sepconv.hardware import available_cores
from sepconv.preprocess import ImageError, Preprocessing, decode, normalize, prepare
from service.engine import decode as pipeline

from .conftest import png_bytes

ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS = 10**8
RGB_224 = Preprocessing.neutral(224, "RGB")
L_28 = Preprocessing.neutral(28, "L")


def reference(data: bytes, spec: Preprocessing) -> np.ndarray:
    """What preprocessing did before reduced decoding: a full decode, then ImageOps.fit.
    A grey model's colour JPEG is decoded to its luma plane unless ``jpeg_gray="rgb"``."""
    img = Image.open(io.BytesIO(data))
    if spec.color_mode == "L" and spec.jpeg_gray == "y-plane":
        img.draft("L", None)  # a no-op for other formats and for greyscale JPEGs
    img.load()
    ImageOps.exif_transpose(img, in_place=True)
    img = img if img.mode == spec.color_mode else img.convert(spec.color_mode)
    size = (spec.input_size, spec.input_size)
    if spec.resize == "center-crop":
        img = ImageOps.fit(img, size, method=Image.Resampling.BILINEAR)
    else:
        img = img.resize(size, Image.Resampling.BILINEAR)
    arr = np.asarray(img)
    return arr[:, :, None] if arr.ndim == 2 else arr


def ours(data: bytes, spec: Preprocessing) -> np.ndarray:
    return prepare(decode(data, spec, max_pixels=MAX_PIXELS), spec)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rotated(jpeg: bytes) -> bytes:
    """The same photo stored sideways, as a phone does: EXIF says turn 90 degrees clockwise."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.open(io.BytesIO(jpeg)), "JPEG", quality=90, exif=exif.tobytes())


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return photo_jpeg(4000, 3000, seed=1)


@pytest.fixture(scope="module")
def mid_jpeg() -> bytes:
    return photo_jpeg(2000, 1500, seed=2)


@pytest.fixture(scope="module")
def big_png(mid_jpeg) -> bytes:
    return encode(Image.open(io.BytesIO(mid_jpeg)), "PNG", compress_level=1)


# ------------------------------------------------------------------ reduced decoding


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("resize", ["center-crop", "stretch"])
@pytest.mark.parametrize("size", [(32, 32), (17, 23), (64, 48), (48, 64), (64, 64), (127, 120)])
def test_images_up_to_2x_the_input_decode_bit_for_bit_as_before(fmt, resize, size):
    # (127, 120): under 4x on both sides neither the draft nor the reduction applies either.
    spec = Preprocessing.neutral(32, "RGB", resize=resize)
    data = encode(Image.open(io.BytesIO(photo_jpeg(*size, seed=3))), fmt)
    assert decode(data, spec, max_pixels=MAX_PIXELS).size == size  # no draft
    np.testing.assert_array_equal(ours(data, spec), reference(data, spec))
    for jpeg_gray in ("y-plane", "rgb"):
        grey = Preprocessing.neutral(32, "L", resize=resize, jpeg_gray=jpeg_gray)
        np.testing.assert_array_equal(ours(data, grey), reference(data, grey))


@pytest.mark.parametrize(
    ("spec", "drafted"),
    [
        (RGB_224, (1000, 750)),  # 1/4: 1/8 would leave 375 < 2 x 224
        (Preprocessing.neutral(224, "RGB", resize="stretch"), (1000, 750)),
        (L_28, (500, 375)),  # 1/8, the largest DCT scale; reducing_gap does the rest
    ],
)
@pytest.mark.parametrize("decoder", ["simplejpeg", "pillow"])
def test_large_jpeg_decodes_reduced_and_close_to_a_full_decode(big_jpeg, spec, drafted, decoder):
    img = decode(big_jpeg, spec, max_pixels=MAX_PIXELS, decoder=decoder)
    assert img.size == drafted
    assert min(img.size) >= 2 * spec.input_size
    diff = np.abs(prepare(img, spec).astype(np.int16) - reference(big_jpeg, spec))
    # Grey levels out of 255: measured 0.16-0.47 mean, 2 at most; the bound leaves room for
    # other libjpeg builds without letting a wrong crop or orientation through.
    assert diff.mean() < 1.0
    assert diff.max() <= 12


def test_rotated_jpeg_is_drafted_then_turned_upright(mid_jpeg):
    data = rotated(mid_jpeg)
    img = decode(data, RGB_224, max_pixels=MAX_PIXELS)
    assert img.size == (750, 1000)  # stored 2000x1500 sideways, drafted 1/2, then turned
    stretch = Preprocessing.neutral(224, "RGB", resize="stretch")
    for spec in (RGB_224, stretch):
        diff = np.abs(ours(data, spec).astype(np.int16) - reference(data, spec))
        assert diff.mean() < 1.0
    # Turned the wrong way it would be far off: the check above can fail.
    unturned = np.asarray(Image.fromarray(reference(data, stretch)).transpose(Image.ROTATE_180))
    assert np.abs(ours(data, stretch).astype(np.int16) - unturned).mean() > 10


def test_large_png_is_box_reduced_first_and_close_to_a_plain_resize(big_png):
    img = decode(big_png, L_28, max_pixels=MAX_PIXELS)
    assert img.size == (2000, 1500)  # no draft outside JPEG
    diff = np.abs(ours(big_png, L_28).astype(np.int16) - reference(big_png, L_28))
    assert 0 < diff.mean() < 1.0  # reduced (not identical), and close


def test_normalize_into_a_given_batch_slice():
    spec = Preprocessing(input_size=2, color_mode="RGB", mean=[0.1, 0.2, 0.3], std=[1, 2, 3])
    pixels = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    batch = np.zeros((3, 3, 2, 2), np.float32)
    normalize(pixels, spec, out=batch[1:])
    np.testing.assert_array_equal(batch[1:], normalize(pixels, spec))
    assert not batch[0].any()
    with pytest.raises(ValueError, match="out must be float32"):
        normalize(pixels, spec, out=batch)


# ------------------------------------------------------------------ training = serving


def test_training_and_serving_give_identical_tensors_for_photos(tmp_path, big_jpeg, big_png):
    """model.data's folder decode and the service's decode path, on photos large enough for
    the draft (JPEG), the box reduction (PNG) and EXIF rotation: the same tensors, bit for bit."""
    small = png_bytes(np.full((30, 40, 3), 90, np.uint8))
    files = {
        "a/big.jpg": big_jpeg,
        "a/big.png": big_png,
        "b/sideways.jpg": rotated(photo_jpeg(1600, 1200, seed=5)),
        "b/small.png": small,
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    ds = load_image_folder(tmp_path, input_size=64, test_fraction=0.5)
    trained = normalize(np.concatenate([ds.train.images, ds.test.images]), ds.pixels)

    pool = pipeline.DecodePool(2)
    try:
        served = asyncio.run(
            pipeline.preprocess_images_async(
                list(files.values()),
                ds.pixels,
                max_pixels=MAX_PIXELS,
                inline_max_pixels=256 * 256,
                pool=pool,
            )
        )
    finally:
        pool.close()
    assert served.shape == (4, 3, 64, 64)
    for row in served:
        assert sum(np.array_equal(row, t) for t in trained) == 1
    inline = pipeline.preprocess_images(list(files.values()), ds.pixels, max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(served, inline)  # request order kept


# ------------------------------------------------------------------ decode pool


def test_split_jobs_gives_large_images_a_job_each():
    assert pipeline.split_jobs([300, 10, 300, 300], 100) == [(0, 1), (1, 3), (3, 4)]
    assert pipeline.split_jobs([10, 10, 10], 100) == [(0, 3)]
    assert pipeline.split_jobs([10, 10, 200, 5], 100) == [(0, 3), (3, 4)]
    assert pipeline.split_jobs([1, 1, 1], 0) == [(0, 1), (1, 2), (2, 3)]


def test_default_pool_has_one_thread_per_core():
    assert pipeline.DecodePool().threads == available_cores()
    assert pipeline.shared_pool() is pipeline.shared_pool()


class BarrierPool(pipeline.DecodePool):
    """Every job waits until ``parties`` jobs are running at once: if the pool ran a request's
    jobs one after the other, the barrier would break and the request would fail."""

    def __init__(self, parties: int) -> None:
        super().__init__(parties)
        self.barrier = threading.Barrier(parties, timeout=60)
        self.jobs: list[tuple[int, int]] = []

    def submit(self, fn, *args):
        self.jobs.append((args[1], args[2]))

        def together(*job_args):
            self.barrier.wait()
            return fn(*job_args)

        return super().submit(together, *args)


def test_large_images_of_one_request_decode_in_parallel_jobs_in_request_order():
    blobs = [
        photo_jpeg(640, 480, seed=10),
        png_bytes(np.full((30, 40, 3), 200, np.uint8)),  # small: shares the next job
        photo_jpeg(480, 640, seed=11),
        photo_jpeg(600, 600, seed=12),
    ]
    pool = BarrierPool(3)
    try:
        out = asyncio.run(
            pipeline.preprocess_images_async(
                blobs, RGB_224, max_pixels=MAX_PIXELS, inline_max_pixels=65536, pool=pool
            )
        )
    finally:
        pool.close()
    assert pool.jobs == [(0, 1), (1, 3), (3, 4)]
    assert not pool.barrier.broken
    expected = pipeline.preprocess_images(blobs, RGB_224, max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(out, expected)


def test_a_bad_large_image_fails_the_request_naming_it():
    good = photo_jpeg(640, 480, seed=13)
    truncated = good[: len(good) // 3]
    pool = pipeline.DecodePool(2)
    try:
        with pytest.raises(ImageError, match="image b.jpg: cannot decode image"):
            asyncio.run(
                pipeline.preprocess_images_async(
                    [good, truncated],
                    RGB_224,
                    max_pixels=MAX_PIXELS,
                    inline_max_pixels=65536,
                    names=["a.jpg", "b.jpg"],
                    pool=pool,
                )
            )
    finally:
        pool.close()


# ------------------------------------------------------------------ bench workload


def test_bench_photos_are_seeded_and_photo_sized(big_jpeg):
    from service.settings import Settings

    assert photo_jpeg(4000, 3000, seed=1) == big_jpeg
    assert 1_000_000 < len(big_jpeg) < Settings().max_body_bytes  # a few MB, under the limit
    assert photo_jpeg(64, 48, seed=1) != photo_jpeg(64, 48, seed=2)
    img = Image.open(io.BytesIO(big_jpeg))
    assert (img.format, img.size, img.mode) == ("JPEG", (4000, 3000), "RGB")


def test_bench_photo_flags(tmp_path):
    from bench.__main__ import parse_args

    _, args, _ = parse_args(["photos"])
    assert (args.models, args.concurrency, args.duration) == ("224,default", [8], 10.0)
    assert args.sizes == [(1280, 960), (4000, 3000)] and args.compare_tree is None
    assert args.name == "photos"
    assert parse_args(["photos", "--sizes", "64x48"])[1].sizes == [(64, 48)]
    assert parse_args([])[1].models == "default,int8,224"  # the sweep keeps its defaults
    with pytest.raises(SystemExit):
        parse_args(["photos", "--sizes", "64"])
    with pytest.raises(SystemExit):
        parse_args(["photos", "--compare-tree", str(tmp_path)])  # no service/ there


def test_bench_photos_against_a_second_tree(tiny_model_path):
    """Both servers answer every photo; the report pairs the trees and gives the ratio."""
    from bench.__main__ import parse_args
    from bench.models import BenchModel
    from bench.photos import markdown, run_model
    from sepconv.spec import read_spec

    model = BenchModel("default", "tiny", tiny_model_path, read_spec(str(tiny_model_path)), False)
    _, args, _ = parse_args(
        ["photos", "--sizes", "96x64", "--concurrency", "2", "--duration", "30"]
        + ["--warmup", "0", "--max-requests", "6", "--compare-tree", str(ROOT), "--rounds", "1"]
    )
    entry = run_model(model, args, {"SEPCONV_INTRA_OP_THREADS": "1"})
    assert [(p["tree"], p["ok"], p["errors"]) for p in entry["points"]] == [
        (str(ROOT), 6, 0),
        ("this tree", 6, 0),
    ]
    (row,) = entry["summary"]
    assert (row["size"], row["concurrency"]) == ("96x64", 2) and row["ratio"] > 0
    env = {
        "command": "python -m bench photos",
        "date": "today",
        "cpu": "cpu",
        "cores": 2,
        "load_before": "0",
        "server_settings": "defaults",
        "service_module": "service/__init__.py",
        "compare_service_module": "old/service/__init__.py",
        "compare_tree": str(ROOT),
        "rounds": 1,
        "duration_s": 30,
        "warmup_s": 0,
    }
    text = markdown({"environment": env, "models": [entry]})
    size = f"{row['this']['mean_bytes'] / 1e3:.0f} kB"
    assert f"| 96x64 | {size} | 2 | {row['compare']['img_per_s'][0]:,.1f} |" in text
    assert f"**{row['ratio']:.2f}x**" in text


def test_photo_summary_pairs_the_trees_round_by_round():
    from bench.photos import summarize

    def point(tree, rnd, rate):
        return {"round": rnd, "tree": tree, "size": "4000x3000", "concurrency": 8,
                "req_per_s": rate, "p99_ms": 1000 / rate, "errors": 0, "mean_bytes": 3}  # fmt: skip

    points = [
        point("old", 1, 3.0), point("this tree", 1, 7.5),
        point("old", 2, 4.0), point("this tree", 2, 10.0),
        point("old", 3, 4.0), point("this tree", 3, 7.0),
    ]  # fmt: skip
    (row,) = summarize(points, "old")
    assert row["round_ratios"] == [2.5, 2.5, 1.75]
    assert row["ratio"] == 2.5  # the median round, not 7.5 / 4.0 from the medians
    assert (row["this"]["median_img_per_s"], row["compare"]["median_img_per_s"]) == (7.5, 4.0)
