"""The metadata contract and the shared preprocessing."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from PIL import Image

from sepconv.preprocess import ImageError, ImageTooLargeError, decode, normalize, prepare
from sepconv.spec import ModelSpec, SpecError, read_spec

from .conftest import TINY_LABELS, png_bytes


def _spec(**kw) -> ModelSpec:
    base = dict(labels=["a", "b"], input_size=4, color_mode="L", mean=[0.5], std=[0.25], alpha=1.0)
    return ModelSpec(**(base | kw))


def test_metadata_round_trip_through_onnx_file(tiny_model_path):
    spec = read_spec(str(tiny_model_path))
    assert spec.labels == TINY_LABELS
    assert (spec.input_size, spec.color_mode, spec.stem_stride, spec.alpha) == (28, "L", 1, 0.25)
    assert spec.onnx_opset == 18 and spec.torch_version and spec.build_date
    proto = onnx.load(str(tiny_model_path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert ModelSpec.from_metadata(props) == spec
    # compute nodes carry the paper's layer names, for the cost report and profiles
    names = [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert names[:3] == ["stem", "block1.depthwise", "block1.pointwise"]
    assert names[-2:] == ["block13.pointwise", "classifier"] and len(names) == 28


def test_a_model_file_from_before_jpeg_gray_greys_jpegs_as_it_was_trained():
    spec = _spec()
    assert spec.jpeg_gray == "y-plane"  # what a build writes now
    md = spec.to_metadata()
    assert md["sepconv.jpeg_gray"] == "y-plane"
    assert ModelSpec.from_metadata(md) == spec
    older = {k: v for k, v in md.items() if k != "sepconv.jpeg_gray"}
    assert ModelSpec.from_metadata(older).jpeg_gray == "rgb"
    with pytest.raises(SpecError, match="sepconv.jpeg_gray"):
        ModelSpec.from_metadata(md | {"sepconv.jpeg_gray": "cmyk"})


def test_spec_errors_name_the_key():
    md = _spec().to_metadata()
    with pytest.raises(SpecError, match="no sepconv metadata"):
        ModelSpec.from_metadata({})
    with pytest.raises(SpecError, match="sepconv.labels"):
        ModelSpec.from_metadata(md | {"sepconv.labels": "[]"})
    with pytest.raises(SpecError, match="not valid JSON"):
        ModelSpec.from_metadata(md | {"sepconv.mean": "[0.5"})
    with pytest.raises(SpecError, match="schema"):
        ModelSpec.from_metadata(md | {"sepconv.schema": "99"})
    with pytest.raises(ValueError, match="mean/std"):
        _spec(color_mode="RGB")


def test_normalize_matches_formula_and_layout():
    spec = _spec(color_mode="RGB", mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.25])
    px = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    out = normalize(px, spec)
    assert out.shape == (2, 3, 4, 4) and out.dtype == np.float32
    expected = (px[1, 2, 3, 1] / 255 - 0.2) / 0.5
    assert out[1, 1, 2, 3] == pytest.approx(expected, rel=1e-6)


def test_prepare_resizes_with_center_crop_and_stretch():
    img = Image.fromarray(np.zeros((10, 20), np.uint8))
    assert prepare(img, _spec(input_size=5)).shape == (5, 5, 1)
    wide = np.zeros((10, 20), np.uint8)
    wide[:, :5] = 255  # only the left quarter is bright: centre-crop cuts it away
    assert prepare(Image.fromarray(wide), _spec(input_size=10)).max() == 0
    assert prepare(Image.fromarray(wide), _spec(input_size=10, resize="stretch")).max() > 0


@pytest.mark.parametrize(
    "mode, pixel",
    [("I;16", 65535), ("RGBA", (255, 255, 255, 0)), ("P", 3), ("CMYK", (0, 0, 0, 0)), ("1", 1)],
)
def test_unusual_modes_decode_to_model_mode(mode, pixel):
    img = Image.new(mode, (6, 6), pixel)
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    spec = _spec(input_size=6)
    arr = prepare(decode(buf.getvalue(), spec, max_pixels=10_000), spec)
    assert arr.shape == (6, 6, 1)
    expected = {"I;16": 255, "RGBA": 0, "CMYK": 255, "1": 255}
    if mode in expected:
        assert int(arr[0, 0, 0]) == expected[mode]


def test_exif_orientation_is_applied():
    img = Image.new("L", (8, 4), 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert decode(buf.getvalue(), _spec(), max_pixels=1000).size == (4, 8)


def test_decode_errors():
    good = png_bytes(np.zeros((50, 50), np.uint8))
    spec = _spec()
    with pytest.raises(ImageError, match="empty"):
        decode(b"", spec, max_pixels=10_000)
    with pytest.raises(ImageError, match="identify"):
        decode(b"not an image at all", spec, max_pixels=10_000)
    with pytest.raises(ImageError):
        decode(good[: len(good) // 2], spec, max_pixels=10_000)
    with pytest.raises(ImageTooLargeError, match="2500 pixels"):
        decode(good, spec, max_pixels=2499)


@pytest.mark.parametrize(
    ("size", "threaded"),
    [
        (28, False),
        (256, False),  # 65,536 pixels: the default limit, still inline
        (257, True),
        (2000, True),  # a flat 2000x2000 PNG is a few kB: bytes would say "small"
    ],
)
def test_decode_goes_to_a_thread_by_pixels_not_bytes(size, threaded):
    import asyncio

    from service.engine import decode as pipeline
    from service.settings import Settings

    calls = []

    class SpyPool(pipeline.DecodePool):
        def submit(self, fn, *args):
            calls.append(fn)
            return super().submit(fn, *args)

    pool = SpyPool(2)
    blob = png_bytes(np.zeros((size, size), np.uint8))
    assert len(blob) < 16_384
    spec = _spec()
    try:
        out = asyncio.run(
            pipeline.preprocess_images_async(
                [blob],
                spec,
                max_pixels=10**8,
                inline_max_pixels=Settings().inline_decode_max_pixels,
                pool=pool,
            )
        )
    finally:
        pool.close()
    assert out.shape == (1, 1, spec.input_size, spec.input_size)
    assert bool(calls) is threaded


def test_header_errors_are_raised_before_any_decoding():
    from service.engine import decode as pipeline

    small = png_bytes(np.zeros((28, 28), np.uint8))
    with pytest.raises(ImageTooLargeError, match="image b.png: image is 50x50"):
        pipeline.preprocess_images(
            [small, png_bytes(np.zeros((50, 50), np.uint8))],
            _spec(),
            max_pixels=2499,
            names=["a.png", "b.png"],
        )
