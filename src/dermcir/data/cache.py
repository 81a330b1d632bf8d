"""On-disk caches keyed by content and settings, so a second run does not redo preprocessing or feature extraction.

Keys hash the image file's bytes together with every setting that changes the result, so editing an image or a
setting misses the cache instead of returning stale data. Writes go to a temporary file that is renamed into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from dermcir.data.cases import Case, LoadReport
from dermcir.data.images import ImageError, load_rgb, preprocess
from dermcir.files import atomic_write

log = logging.getLogger(__name__)
#: Names how images are decoded and de-bordered; part of every cache key, and recorded in each checkpoint.
PREPROCESS_VERSION = "border-v3"
#: Versions whose checkpoints this preprocessing serves: border-v2 differs from border-v1 only on images with a dark
#: run at an edge longer than a quarter of its side (a dark lesion there, which v1 cut away as frame), and on none of
#: the 888 Derm7pt images, so a model trained on v1 meets the same images. border-v3 differs from v2 only on images
#: with solid black bars on two opposite edges wider than a quarter of the side (a screen capture), which v2 kept;
#: none of the 888 either.
COMPATIBLE_PREPROCESS_VERSIONS = ("border-v1", "border-v2", "border-v3")
T = TypeVar("T")


def default_cache_dir() -> Path:
    """``$DERMCIR_CACHE`` or ``~/.cache/dermcir``."""
    return Path(os.environ.get("DERMCIR_CACHE", Path.home() / ".cache" / "dermcir"))


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def settings_key(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


# Every cache here costs time, never a case or the run: an entry that cannot be read is computed again, and one that
# cannot be written is used unsaved. These two helpers give the caller the reason, for its one warning.
def read_entry(path: Path, load: Callable[[Path], T]) -> tuple[T | None, Exception | None]:
    """A cache entry read with ``load``: ``(value, None)``; ``(None, None)`` when there is none; ``(None, error)``
    when it cannot be read (another user's file, a write cut short, another format)."""
    try:
        if not path.is_file():
            return None, None
        return load(path), None
    except Exception as exc:  # noqa: BLE001 (OSError, or numpy's / safetensors' / zipfile's own error types)
        return None, exc


def write_entry(path: Path, write: Callable[[IO[bytes]], Any]) -> OSError | None:
    """Write a cache entry with ``write(file)``, atomically (a temporary file of its own: several processes may fill
    one cache); the error instead of raising it when the cache cannot be written (a full disk, a read-only folder)."""
    try:
        with atomic_write(path, binary=True) as fh:
            write(fh)
    except OSError as exc:
        return exc
    return None


def preprocess_cases(
    cases: Sequence[Case], size: int = 512, cache_dir: Path | None = None, report: LoadReport | None = None,
    progress: bool = True,
) -> tuple[list[Case], np.ndarray]:
    """Decode, de-border and resize every case's image, using the cache.

    Unreadable images are reported (in ``report`` and the log) by file name and left out; the run goes on. A cache
    that cannot be read or written costs time only: the image is preprocessed again, and a warning names the cache.

    Returns:
        The cases whose image could be used, and their images as a ``(N, size, size, 3)`` uint8 array.
    """
    cache = (cache_dir or default_cache_dir()) / "images"
    kept, arrays, unsaved = [], [], []
    for case in tqdm(cases, desc=f"preprocess {size}px", disable=not progress, leave=False):
        try:
            raw = _read_image_file(case.image)
        except ImageError as exc:
            (report or LoadReport()).skip(str(case.image), str(exc))
            continue
        path = cache / f"{settings_key(hashlib.sha1(raw).hexdigest(), size, PREPROCESS_VERSION)}.npy"
        arr = _load_cached(path, size)
        if arr is None:
            try:
                arr = preprocess(load_rgb(raw, name=str(case.image)), size)
            except ImageError as exc:
                (report or LoadReport()).skip(str(case.image), str(exc))
                continue
            error = write_entry(path, lambda fh, arr=arr: np.save(fh, arr))
            if error is not None:  # a full disk or a folder we may not write: the array is good, keep it
                unsaved.append(f"{path} ({error.strerror or error})")
        kept.append(case)
        arrays.append(arr)
    if unsaved:
        log.warning("could not write %d preprocessed image(s) into the cache %s, first %s; they were used uncached",
                    len(unsaved), cache, unsaved[0])
    images = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return kept, images


def _read_image_file(path: Path) -> bytes:
    """The file's bytes (read once: they are both hashed for the cache key and decoded), or ``ImageError``."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc.strerror or exc})") from None


def _load_cached(path: Path, size: int) -> np.ndarray | None:
    """The cached ``(size, size, 3)`` uint8 array at ``path``; None when absent, or (with a warning) unreadable."""
    arr, error = read_entry(path, np.load)
    if error is not None:  # another user's file, a truncated write, not an .npy at all
        log.warning("cache file %s unreadable (%s); preprocessing its image again", path, error)
    if arr is None:
        return None
    if arr.shape != (size, size, 3) or arr.dtype != np.uint8:
        log.warning("cache file %s holds a %s %s array, not (%d, %d, 3) uint8; preprocessing its image again",
                    path, arr.dtype, arr.shape, size, size)
        return None
    return arr
