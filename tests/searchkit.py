"""Helpers shared by the index / search / service tests: a tiny random checkpoint, synthetic cases and bad inputs.

Every image here is synthesised; no Derm7pt image is read or written.
"""

from __future__ import annotations

import csv
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dermcir.checkpoint import save_checkpoint
from dermcir.config import ModelConfig
from dermcir.data import Case
from dermcir.index import build_index
from dermcir.models import ComposedRetrievalModel

from .conftest import synthetic_lesion

TINY_MODEL = {
    "backbone": "lite0",
    "text_encoder": "bert",
    "image_size": 64,
    "grid": 4,
    "dim": 32,
    "heads": 2,
    "n_masks": 2,
}
COLOURS = {"nevus": (120, 80, 50), "melanoma": (40, 30, 60), "benign keratosis-like": (150, 140, 60)}
CHECKLIST = {
    "nevus": {"pigment_network": "typical", "blue_whitish_veil": "absent"},
    "melanoma": {"pigment_network": "atypical", "blue_whitish_veil": "present", "streaks": "irregular"},
    "benign keratosis-like": {"pigment_network": "absent", "blue_whitish_veil": "absent"},
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run the tiny model on one thread: its ops are too small to gain from two, and on a busy 2-core machine a
    second intra-op thread mostly waits (10x slower). Import this fixture into a test module to apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_checkpoint(folder: Path, seed: int = 0, **settings) -> Path:
    """A tiny random-weight model saved as a checkpoint (seconds on a CPU); a different seed is a different model.
    ``settings``: more ModelConfig fields (e.g. a companion)."""
    torch.manual_seed(seed)
    model = ComposedRetrievalModel(ModelConfig(**{**TINY_MODEL, **settings}), pretrained=False)
    return save_checkpoint(model, folder, frozen=())


def make_cases(folder: Path, n: int = 12, start: int = 0) -> list[Case]:
    """``n`` synthetic cases cycling through three categories, images written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(start, start + n):
        category = list(COLOURS)[i % 3]
        path = folder / f"case{i:03d}.png"
        synthetic_lesion(i, COLOURS[category]).save(path)
        cases.append(Case(f"c{i:03d}", path, category, category, dict(CHECKLIST[category])))
    return cases


def write_case_csv(path: Path, cases: list[Case]) -> Path:
    """A clinic-style archive CSV (id, image, diagnosis, checklist fields) for ``cases``."""
    fields = sorted({k for c in cases for k in c.fields})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", "diagnosis", *fields])
        for c in cases:
            writer.writerow([c.case_id, str(c.image), c.diagnosis, *(c.fields.get(f, "") for f in fields)])
    return path


def make_index(
    tmp: Path, n: int = 12, ckpt: Path | None = None, model: ComposedRetrievalModel | None = None, **kwargs
) -> tuple[Path, Path, list[Case]]:
    """(checkpoint, index root, cases) of a freshly built tiny index (pass a loaded ``model`` to save time)."""
    ckpt = ckpt or make_checkpoint(tmp / "ckpt")
    cases = make_cases(tmp / "images", n)
    build_index(cases, ckpt, tmp / "index", model=model, cache_dir=tmp / "cache", progress=False, **kwargs)
    return ckpt, tmp / "index", cases


def encode(img: Image.Image, fmt: str = "PNG", **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def lesion(seed: int = 99, size: tuple[int, int] = (96, 64)) -> Image.Image:
    return synthetic_lesion(seed, COLOURS["melanoma"], size=size)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width``×``height`` pixels (a decompression bomb without the payload)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def exif_rotated() -> tuple[bytes, np.ndarray]:
    """A PNG stored sideways with EXIF orientation 6, and the upright pixels a viewer (and dermcir) should see."""
    stored = lesion(size=(90, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    upright = np.rot90(np.asarray(stored), k=-1)
    return encode(stored, "PNG", exif=exif), np.ascontiguousarray(upright)


def exif_with_a_text_tag() -> tuple[bytes, np.ndarray]:
    """A JPEG stored sideways (EXIF orientation 6) whose EXIF also writes XResolution as the text "72" (a RATIONAL
    belongs there), as some software does: Pillow's exif_transpose raised TypeError on it. Pixels intact."""
    stored = lesion(size=(90, 60))
    entries = [struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0),  # Orientation, SHORT, 6
               struct.pack("<HHI4s", 0x011A, 2, 3, b"72\0\0")]  # XResolution as ASCII
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    raw = encode(stored, "JPEG", quality=95, exif=b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd)
    decoded = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))  # the JPEG's own pixels, as stored
    return raw, np.ascontiguousarray(np.rot90(decoded, k=-1))


def damaged_dds() -> bytes:
    """A DDS file whose pixel-format flags are unknown: Pillow raises NotImplementedError, not an OSError."""
    raw = bytearray(encode(lesion(size=(16, 16)), "DDS"))
    raw[80:84] = struct.pack("<I", 1)  # the pixel format's flags (DDS header offset 80)
    return bytes(raw)


def good_variants() -> dict[str, bytes]:
    """Unusual but valid images: each must give a normal result."""
    base = lesion()
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    sixteen = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257).convert("I;16")
    return {
        "grayscale": encode(base.convert("L")),
        "cmyk_jpeg": encode(base.convert("CMYK"), "JPEG"),
        "16bit_png": encode(sixteen),
        "png_alpha": encode(rgba),
        "exif_rotated": exif_rotated()[0],
        "10x10": encode(base.resize((10, 10))),
    }


def bad_variants() -> dict[str, bytes]:
    """Unusable files: each must be refused with an error that says what is wrong."""
    jpeg = encode(lesion(), "JPEG", quality=90)
    corrupt = bytearray(jpeg)
    corrupt[200:600] = bytes(400)  # wipe the Huffman tables / scan header
    return {
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "corrupt_jpeg": bytes(corrupt[:20]) + b"garbage" * 50,
        "not_an_image": b"%PDF-1.4 this is a text file with a .jpg name\n" * 20,
        "decompression_bomb": png_declaring(100_000, 100_000),
        "damaged_dds": damaged_dds(),
        # an icon's frame is decoded before its size can be checked against MAX_PIXELS: not read at all
        "icon": encode(lesion(), "ICO"),
    }
