"""simplejpeg and Pillow decode every JPEG to the same pixels, and training and serving produce
the same tensors whichever of them runs; what simplejpeg cannot do falls back to Pillow."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.photos import photo_jpeg
from model.data import load_image_folder
from sepconv import jpeg, preprocess
from sepconv.preprocess import (
    REDUCE_FLOOR,
    ImageError,
    Preprocessing,
    load,
    normalize,
    open_image,
    prepare,
)
from service.engine import decode as pipeline

pytestmark = pytest.mark.skipif(not jpeg.available(), reason="simplejpeg is not installed")

MAX_PIXELS = 10**8
DECODERS = ("simplejpeg", "pillow")
SPECS = {
    "L28": Preprocessing.neutral(28, "L"),
    "L28-rgb": Preprocessing.neutral(28, "L", jpeg_gray="rgb"),
    "RGB224": Preprocessing.neutral(224, "RGB"),
    "RGB32-stretch": Preprocessing.neutral(32, "RGB", resize="stretch"),
}


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def with_orientation(data: bytes, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.open(io.BytesIO(data)), quality=90, exif=exif.tobytes())


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


@pytest.fixture(scope="module")
def photo() -> bytes:
    return photo_jpeg(4000, 3000, seed=7)


@pytest.fixture(scope="module")
def jpegs(photo) -> dict[str, bytes]:
    """Every kind of JPEG the fast path takes: sizes for each DCT scale (and odd ones),
    subsamplings, progressive, greyscale, all EXIF orientations, XMP orientation, MPO."""
    mid = photo_jpeg(1001, 757, seed=8)  # odd sides: the scaled size rounds up
    thumb = photo_jpeg(224, 224, seed=9)
    img = Image.open(io.BytesIO(mid))
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="8"/></rdf:RDF></x:xmpmeta>'
    )
    small = img.resize((96, 72))
    out = {
        "12mp": photo,
        "mid-odd": mid,
        "thumb-224": thumb,
        "thumb-300x200": photo_jpeg(300, 200, seed=10),
        "tiny-20x13": photo_jpeg(20, 13, seed=11),
        "444": encode(img, quality=95, subsampling=0),
        "422": encode(img, quality=80, subsampling=1),
        "progressive": encode(img, quality=90, progressive=True),
        "grey": encode(img.convert("L"), quality=90),
        "grey-thumb": encode(Image.open(io.BytesIO(thumb)).convert("L")),
        "xmp-orientation": encode(img, xmp=xmp),
        "mpo": encode(small, "MPO", save_all=True, append_images=[small.rotate(90)]),
    }
    for o in range(2, 9):
        out[f"exif-{o}"] = with_orientation(mid, o)
    out["12mp-exif-6"] = with_orientation(photo, 6)
    return out


# ------------------------------------------------------------------ same pixels


def test_dct_scale_is_the_one_pillows_draft_picks():
    base = Image.new("RGB", (1, 1))
    for size in [(7, 5), (16, 16), (31, 17), (64, 48), (100, 33), (250, 251), (400, 299)]:
        data = encode(base.resize(size))
        for floor in (1, 2, 3, 7, 8, 15, 16, 25, 56, 100):
            img = Image.open(io.BytesIO(data))
            if min(size) >= 2 * floor:
                img.draft(None, (floor, floor))
            s = jpeg.dct_scale(*size, floor)
            assert img.size == (-(-size[0] // s), -(-size[1] // s)), (size, floor)
            assert min(img.size) >= min(floor, *size)


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_simplejpeg_decodes_every_jpeg_as_pillow_does_bit_for_bit(jpegs, spec_name):
    spec = SPECS[spec_name]
    floor = REDUCE_FLOOR * spec.input_size
    gray = spec.color_mode == "L" and spec.jpeg_gray == "y-plane"
    for name, data in jpegs.items():
        fast = jpeg.decode(open_image(data, max_pixels=MAX_PIXELS), gray=gray, floor=floor)
        assert fast is not None, f"{name}: simplejpeg did not take it"
        slow = load(open_image(data, max_pixels=MAX_PIXELS), spec, decoder="pillow")
        assert (fast.mode, fast.size) == (slow.mode, slow.size), name
        np.testing.assert_array_equal(pixels(fast), pixels(slow), err_msg=name)
        via_load = load(open_image(data, max_pixels=MAX_PIXELS), spec, decoder="simplejpeg")
        np.testing.assert_array_equal(prepare(via_load, spec), prepare(slow, spec), err_msg=name)


def test_orientation_turns_the_decoded_pixels(jpegs):
    """The identity above could hold with both paths wrong: the turn itself, checked apart."""
    spec = SPECS["RGB32-stretch"]
    upright = pixels(load(open_image(jpegs["mid-odd"], max_pixels=MAX_PIXELS), spec))
    turned = pixels(load(open_image(jpegs["exif-6"], max_pixels=MAX_PIXELS), spec))
    assert upright.shape[:2] == turned.shape[1::-1]
    # Re-encoding the sideways file costs a little; the turn must not.
    diff = np.abs(np.rot90(upright, -1).astype(np.int16) - turned).mean()
    assert diff < 2.0
    assert np.abs(upright[::-1, ::-1].astype(np.int16) - turned.transpose(1, 0, 2)).mean() > 10


def test_grey_straight_from_the_decoder_is_the_luma_plane(jpegs):
    """``y-plane`` differs from ``rgb`` (else the option would mean nothing), and only by a
    little on a photo; both are what each decoder gives."""
    full = Preprocessing.neutral(1000, "L")  # no DCT scaling: the largest differences
    legacy = Preprocessing.neutral(1000, "L", jpeg_gray="rgb")
    data = jpegs["mid-odd"]
    y = prepare(load(open_image(data, max_pixels=MAX_PIXELS), full), full).astype(np.int16)
    rgb = prepare(load(open_image(data, max_pixels=MAX_PIXELS), legacy), legacy)
    diff = np.abs(y - rgb)
    assert 0 < diff.mean() < 0.05 and diff.max() <= 12  # measured: 3 at most


# ------------------------------------------------------------------ falls back to Pillow


def cmyk_jpeg() -> bytes:
    return encode(Image.open(io.BytesIO(photo_jpeg(96, 64, seed=12))).convert("CMYK"))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(cmyk_jpeg, id="cmyk"),
        pytest.param(lambda: encode(Image.new("RGB", (80, 60), (9, 99, 199)), "PNG"), id="png"),
        # libjpeg warns about stray bytes before EOI and decodes anyway, as Pillow does; strict
        # simplejpeg refuses, so the file takes Pillow's path instead of a 400.
        pytest.param(
            lambda: (d := photo_jpeg(96, 64, seed=13))[:-2] + b"\x00\x00" + d[-2:], id="warning"
        ),
    ],
)
def test_what_simplejpeg_cannot_decode_goes_to_pillow(make):
    data = make()
    spec = SPECS["L28"]
    fast_path = jpeg.decode(open_image(data, max_pixels=MAX_PIXELS), gray=True, floor=56)
    assert fast_path is None
    by_default = load(open_image(data, max_pixels=MAX_PIXELS), spec)
    by_pillow = load(open_image(data, max_pixels=MAX_PIXELS), spec, decoder="pillow")
    np.testing.assert_array_equal(prepare(by_default, spec), prepare(by_pillow, spec))


def test_without_simplejpeg_pillow_decodes(monkeypatch, jpegs):
    data = jpegs["thumb-224"]
    assert jpeg.decode(open_image(data, max_pixels=MAX_PIXELS), gray=False, floor=56) is not None
    monkeypatch.setattr(jpeg, "simplejpeg", None)
    assert not jpeg.available()
    assert jpeg.decode(open_image(data, max_pixels=MAX_PIXELS), gray=False, floor=56) is None
    spec = SPECS["RGB224"]
    assert prepare(load(open_image(data, max_pixels=MAX_PIXELS), spec), spec).shape == (224, 224, 3)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (lambda d: d[: len(d) // 2], "cannot decode image: image file is truncated"),
        (lambda d: d[:400] + bytes(len(d) - 400), "cannot decode image"),
        (lambda d: d[:2] + b"garbage" * 10, "cannot"),
    ],
)
def test_a_broken_jpeg_is_an_image_error_with_either_decoder(decoder, cut, message):
    data = cut(photo_jpeg(640, 480, seed=14))
    spec = SPECS["RGB224"]
    with pytest.raises(ImageError, match=message):
        load(open_image(data, max_pixels=MAX_PIXELS), spec, decoder=decoder)


# ------------------------------------------------------------------ training = serving


@pytest.fixture(scope="module")
def folder(tmp_path_factory, jpegs) -> tuple[Path, list[bytes]]:
    root = tmp_path_factory.mktemp("jpeg_folder")
    files = {
        "a/photo.jpg": jpegs["12mp"],
        "a/sideways.jpg": jpegs["12mp-exif-6"],
        "a/thumb.jpg": jpegs["thumb-224"],
        "b/grey.jpg": jpegs["grey"],
        "b/grey-thumb.jpg": jpegs["grey-thumb"],
        "b/turned.jpg": jpegs["exif-5"],
        "b/cmyk.jpg": cmyk_jpeg(),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(data)
    return root, list(files.values())


@pytest.mark.parametrize(("color_mode", "input_size"), [("L", 28), ("RGB", 224)])
def test_training_and_serving_give_identical_tensors_with_each_decoder(
    monkeypatch, folder, color_mode, input_size
):
    """model.data's image folder and the service's decode paths (inline and threaded), on
    12 MP photos (DCT scaled), thumbnails, grey, EXIF-turned and CMYK (Pillow) JPEGs."""
    root, blobs = folder
    results = {}
    for decoder in DECODERS:
        monkeypatch.setattr(preprocess, "JPEG_DECODER", decoder)
        ds = load_image_folder(
            root, input_size=input_size, color_mode=color_mode, test_fraction=0.5
        )
        trained = normalize(np.concatenate([ds.train.images, ds.test.images]), ds.pixels)
        served = pipeline.preprocess_images(blobs, ds.pixels, max_pixels=MAX_PIXELS)
        pool = pipeline.DecodePool(2)
        try:
            threaded = asyncio.run(
                pipeline.preprocess_images_async(
                    blobs, ds.pixels, max_pixels=MAX_PIXELS, inline_max_pixels=256 * 256, pool=pool
                )
            )
        finally:
            pool.close()
        np.testing.assert_array_equal(threaded, served)
        assert served.shape == (len(blobs), ds.pixels.channels, input_size, input_size)
        for i, row in enumerate(served):
            assert sum(np.array_equal(row, t) for t in trained) == 1, (decoder, i)
        results[decoder] = served
    np.testing.assert_array_equal(results["simplejpeg"], results["pillow"])


# ------------------------------------------------------------------ the bench


def test_decoder_bench_writes_its_table(monkeypatch, tmp_path, capsys):
    from bench import decoders

    monkeypatch.setattr(decoders, "WORKLOADS", (("tiny", 96, 64, 2, 3),))
    out = tmp_path / "decoders.md"
    assert decoders.main(["--rounds", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out.strip() + "\n"
    rows = [line for line in text.splitlines() if line.startswith("| tiny |")]
    # grey model: 2 decoders x 2 jpeg_gray; RGB model: 2 decoders
    assert len(rows) == 6 and all(row.endswith("| yes |") for row in rows)
    assert rows[0].startswith("| tiny | ") and "| 28 px L | pillow | rgb |" in rows[0]
    assert "| 1.00x |" in rows[0]  # the baseline against itself
    assert "| 224 px RGB | simplejpeg | - |" in rows[-1]
    assert "Generated by `python -m bench.decoders --rounds 2 --out" in text
