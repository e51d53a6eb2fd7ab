"""JPEG decoding through libjpeg-turbo's TurboJPEG API (simplejpeg): the fast path of
:func:`sepconv.preprocess.load`.

Pillow decodes JPEG with libjpeg-turbo too. Asked for the same DCT scale and the same output
colour space, the two give the same pixels bit for bit (tests/test_jpeg_decoders.py checks it on
photos, thumbnails, grey, rotated, progressive and multi-picture files), so which of them runs
is no part of the preprocessing contract: simplejpeg is only cheaper per image (no Pillow plugin
machinery, no chunked reads into a suspending decoder; ``python -m bench.decoders`` measures
it). Everything it cannot decode the way Pillow would (CMYK and YCCK, a file libjpeg warns about,
any other format) goes to Pillow, which also words the errors.
"""

from __future__ import annotations

import io

from PIL import Image

try:
    import simplejpeg
except ImportError:  # Pillow then decodes the same pixels, only slower
    simplejpeg = None

#: Formats whose first (or only) picture is a JPEG stream starting at byte 0: MPO is what
#: many phones write (the photo, then a preview or depth picture).
_FORMATS = ("JPEG", "MPO")

#: EXIF orientation -> the transpose that turns the stored pixels upright, as in
#: ``PIL.ImageOps.exif_transpose``.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def available() -> bool:
    return simplejpeg is not None


def dct_scale(width: int, height: int, floor: int) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) for an image that must keep both sides at least
    ``floor``: what Pillow's ``Image.draft(mode, (floor, floor))`` picks, and 1 when the shorter
    side is under twice the floor (no scale would reduce anything)."""
    if min(width, height) < 2 * floor:
        return 1
    fits = min(width // floor, height // floor)
    return next(s for s in (8, 4, 2) if fits >= s)


def orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) orientation Pillow's ``exif_transpose`` would apply; 1 when none."""
    return img.getexif().get(0x0112, 1)


def decode(img: Image.Image, *, gray: bool, floor: int) -> Image.Image | None:
    """An opened, not yet loaded JPEG, decoded at :func:`dct_scale` and turned upright: mode L
    when ``gray`` (the JPEG's luma plane, as Pillow's ``draft("L")`` gives it) or the file is
    greyscale, RGB otherwise. None when simplejpeg is missing or cannot decode the file exactly
    as Pillow would; the caller then decodes it with Pillow."""
    if (
        simplejpeg is None
        or img.format not in _FORMATS
        or img.mode not in ("L", "RGB")  # CMYK and YCCK: Pillow inverts Adobe's CMYK
        or not isinstance(img.fp, io.BytesIO)
    ):
        return None
    width, height = img.size
    scale = dct_scale(width, height, floor)
    size = (-(-width // scale), -(-height // scale))
    colorspace = "gray" if gray or img.mode == "L" else "rgb"
    try:
        # strict: libjpeg's warnings (a truncated file, stray bytes) are errors here, so such a
        # file takes Pillow's path, which decides whether it decodes and says why not.
        pixels = simplejpeg.decode_jpeg(
            img.fp.getvalue(), colorspace, min_width=size[0], min_height=size[1], strict=True
        )
    except ValueError:
        return None
    # TurboJPEG also has 3/8, 5/8 ... scales; the minimum size above rules them out, and this
    # makes sure no other scale ever slips through.
    if pixels.shape[:2] != (size[1], size[0]):
        return None
    out = Image.fromarray(pixels[:, :, 0] if colorspace == "gray" else pixels)
    method = _UPRIGHT.get(orientation(img))
    return out if method is None else out.transpose(method)
