"""On-disk caches keyed by content and settings, so a second run does not redo preprocessing or feature extraction.

Keys hash the image file's bytes together with every setting that changes the result, so editing an image or a
setting misses the cache instead of returning stale data. Writes go to a temporary file that is renamed into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dermcir.data.cases import Case, LoadReport
from dermcir.data.images import ImageError, load_rgb, preprocess
from dermcir.files import atomic_write

log = logging.getLogger(__name__)
PREPROCESS_VERSION = "border-v1"


def default_cache_dir() -> Path:
    """``$DERMCIR_CACHE`` or ``~/.cache/dermcir``."""
    return Path(os.environ.get("DERMCIR_CACHE", Path.home() / ".cache" / "dermcir"))


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def settings_key(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path, binary=True) as fh:  # a file of its own: several processes may fill one cache
        np.save(fh, array)


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
            try:
                atomic_save_npy(path, arr)
            except OSError as exc:  # a full disk or a folder we may not write: the array is good, keep it
                unsaved.append(f"{path} ({exc.strerror or exc})")
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
    try:
        if not path.is_file():
            return None
        arr = np.load(path)
    except (OSError, ValueError, EOFError) as exc:  # another user's file, a truncated write, not an .npy at all
        log.warning("cache file %s unreadable (%s); preprocessing its image again", path, exc)
        return None
    if arr.shape != (size, size, 3) or arr.dtype != np.uint8:
        log.warning("cache file %s holds a %s %s array, not (%d, %d, 3) uint8; preprocessing its image again",
                    path, arr.dtype, arr.shape, size, size)
        return None
    return arr
