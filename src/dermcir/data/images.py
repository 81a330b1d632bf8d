"""Reading untrusted image files safely, and the dermoscopy preprocessing (border removal, resize).

Every reader error becomes :class:`ImageError`, which names the file and says what was wrong, so callers can report
bad files by name and carry on.
"""

from __future__ import annotations

import functools
import io
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Refuse images that declare more pixels than this (decompression bombs). A 768×512 scan is 0.4 MP.
MAX_PIXELS = 40_000_000

#: Smallest side we accept; anything smaller carries no usable dermoscopic detail but is upsampled, not refused.
MIN_SIDE = 1


#: The formats an image may be read as: those cameras, dermoscopes and image software write photographs in. An
#: allow-list, not "all Pillow reads": for EPS Pillow runs Ghostscript, an interpreter with a history of remote code
#: execution bugs, on the uploaded file, and other readers (WMF, PSD, FITS, GRIB, MPEG, ...) add attack surface
#: for formats no lesion photo comes in. The icon containers (ICO, ICNS) were already out: their frames are decoded
#: before their real size is known, so MAX_PIXELS could not be checked first. Anything else is "not a recognised
#: image format", naming these.
IMAGE_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF", "JPEG2000", "AVIF")

#: The longest side may be at most this many times the shortest. An image is resized to a square, so a strip is
#: no lesion photo; and resizing one at the pixel limit (1 × 40,000,000) took 1.8 GB and 23 s, against 0.7 GB and
#: 7 s for a square one of as many pixels.
MAX_ASPECT_RATIO = 10


@functools.cache
def _formats() -> tuple[str, ...]:
    """The ``IMAGE_FORMATS`` this Pillow can read (AVIF needs a Pillow built with it). Computed on first use."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


def load_rgb(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Decode an image into an ``(H, W, 3)`` uint8 RGB array.

    Handles EXIF orientation, grayscale, CMYK, palette, 16-bit and alpha images (alpha is composited on black, the
    colour of a scanner border, which preprocessing removes anyway).

    Args:
        source: a path or the raw bytes of the file.
        name: how to call the file in error messages (defaults to the path).

    Raises:
        ImageError: missing, truncated, corrupt, non-image or oversized (decompression bomb) input.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<uploaded image>")
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found") from None
    except OSError as exc:
        raise ImageError(f"{label}: cannot read file ({exc.strerror or exc})") from None
    if not raw:
        raise ImageError(f"{label}: file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw), formats=_formats()) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{label}: declares {w}x{h} pixels, more than the limit of {MAX_PIXELS:,}")
                if max(w, h) > MAX_ASPECT_RATIO * max(1, min(w, h)):
                    raise ImageError(f"{label}: is {w}x{h} pixels, one side more than {MAX_ASPECT_RATIO} times the "
                                     "other; a lesion photo is resized to a square, so a strip cannot be used")
                img.load()  # decode now so truncation is caught here, not later
                img = _upright(img)
                return _to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{label}: image too large (decompression bomb guard): {exc}") from None
    except UnidentifiedImageError:
        accepted = ", ".join(_formats()).replace("JPEG2000", "JPEG 2000").replace("WEBP", "WebP")
        raise ImageError(f"{label}: not a recognised image format (accepted: {accepted})") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001
        # A damaged file makes Pillow's decoders raise more than OSError/SyntaxError/ValueError (TypeError from a
        # text EXIF tag, struct.error, NotImplementedError...): each is this file's fault, and must cost this image
        # (a 400, a skipped case), not the request or the run
        raise ImageError(f"{label}: corrupt or truncated image ({exc})") from None


#: EXIF orientation -> the transpose that turns the pixels upright
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says."""
    try:
        return ImageOps.exif_transpose(img)
    except (TypeError, ValueError, struct.error):
        # Pillow turns the pixels, then rewrites the EXIF block, and fails on a malformed tag (a resolution written
        # as text by some software); the pixels are intact and only they matter here, so turn them without the rest.
        method = _ORIENTATION.get(img.getexif().get(0x0112))  # 0x0112: the orientation tag
        return img.transpose(method) if method is not None else img


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # float32 and in place: a small upload may declare up to MAX_PIXELS 16-bit pixels, and float64 temporaries
        # of that size took about 1 GB (a uniform 6300x6300 PNG is 92 kB)
        # np.array, not asarray: a float image ("F") needs no conversion, and asarray returned Pillow's read-only
        # buffer, which the scaling below cannot write (every float TIFF was refused as corrupt)
        arr = np.array(img, dtype=np.float32)
        np.nan_to_num(arr, copy=False, nan=0.0, posinf=0.0, neginf=0.0)  # a float image may hold NaN or inf
        hi = float(arr.max()) if arr.size else 1.0
        arr *= 255.0 / (hi if hi > 0 else 1.0)
        gray = np.clip(arr, 0, 255, out=arr).astype(np.uint8)
        del arr
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def remove_black_border(
    rgb: np.ndarray, threshold: int = 40, dark_fraction: float = 0.9, max_edge_fraction: float = 0.25
) -> np.ndarray:
    """Crop the black scanner frame, edge by edge.

    A row (column) belongs to the border while at least ``dark_fraction`` of its pixels have every channel below
    ``threshold``. Each edge is trimmed independently, so uneven frames are handled; an image without a frame is
    returned unchanged. An edge whose dark run is longer than ``max_edge_fraction`` of its side is not trimmed at all:
    that is a dark lesion reaching the edge (a blue-black one wider than the field of view), not a frame, and trimming
    it cut most of the lesion away. (On the 888 Derm7pt images the widest frame edge is 17.6 % of its side, so none
    is affected.) The exception is a pair of bars: runs of solid black (every pixel below ``BAR_LEVEL``) on two
    opposite edges, of equal width, as a screen capture puts around a picture of another shape; they are trimmed
    whatever their width (a portrait photo on a 16:9 screen has bars of 31 % of the width each, and the lesion, kept
    in them, was squeezed into a third of the view: the case itself came at a median rank of 155 of 888); the
    picture inside them then loses its own frame by the rules above. Bars are looked for only where an edge's dark
    run is too long for a frame, so no other image changes. If trimming would keep less than a quarter of a side (a
    very dark image rather than a frame), the image is returned unchanged.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {rgb.shape}")
    brightest = rgb.max(axis=2)
    dark = brightest < threshold
    rows = dark.mean(axis=1) >= dark_fraction
    cols = dark.mean(axis=0) >= dark_fraction
    h, w = dark.shape
    if any(_run_length(flags) > max_edge_fraction * flags.size for flags in (rows, rows[::-1], cols, cols[::-1])):
        solid = brightest < BAR_LEVEL
        (top, bottom), (left, right) = _bars(solid.all(axis=1)), _bars(solid.all(axis=0))
        if top + bottom + left + right and h - top - bottom >= max(1, h // 4) and w - left - right >= max(1, w // 4):
            # the picture inside the bars, with its own frame (if any) removed by the same rules
            return remove_black_border(rgb[top : h - bottom, left : w - right], threshold, dark_fraction,
                                       max_edge_fraction)
    top, bottom = (_frame_run(flags, max_edge_fraction) for flags in (rows, rows[::-1]))
    left, right = (_frame_run(flags, max_edge_fraction) for flags in (cols, cols[::-1]))
    if h - top - bottom < max(1, h // 4) or w - left - right < max(1, w // 4):
        return rgb
    return rgb[top : h - bottom, left : w - right]


#: A bar's pixels: all channels below this (screen black; JPEG noise stays under it).
BAR_LEVEL = 16


def _bars(solid: np.ndarray) -> tuple[int, int]:
    """Solid rows (columns) at two opposite edges, when both have them, of equal width (within 2 % of the side)."""
    a, b = _run_length(solid), _run_length(solid[::-1])
    return (a, b) if a and b and abs(a - b) <= max(2, 0.02 * solid.size) else (0, 0)


def _frame_run(flags: np.ndarray, max_fraction: float) -> int:
    """The rows (columns) to trim at one edge: its run of dark ones, or none when the run is too long for a frame."""
    run = _run_length(flags)
    return run if run <= max_fraction * flags.size else 0


def _run_length(flags: np.ndarray) -> int:
    """Number of leading True values."""
    off = np.flatnonzero(~flags)
    return int(off[0]) if off.size else int(flags.size)


def preprocess(rgb: np.ndarray, size: int = 512, crop_border: bool = True) -> np.ndarray:
    """Border removal then a resize to ``size``×``size`` (bicubic, antialiased); returns uint8 ``(size, size, 3)``."""
    if crop_border:
        rgb = remove_black_border(rgb)
    img = Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)
