"""On-disk caches keyed by content and settings, so a second run does not redo preprocessing or feature extraction.

Keys hash the image file's bytes together with every setting that changes the result, so editing an image or a
setting misses the cache instead of returning stale data. Writes go to a temporary file that is renamed into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dermcir.data.cases import Case, LoadReport
from dermcir.data.images import ImageError, load_rgb, preprocess

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npy")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def preprocess_cases(
    cases: Sequence[Case], size: int = 512, cache_dir: Path | None = None, report: LoadReport | None = None,
    progress: bool = True,
) -> tuple[list[Case], np.ndarray]:
    """Decode, de-border and resize every case's image, using the cache.

    Unreadable images are reported (in ``report`` and the log) by file name and left out; the run goes on.

    Returns:
        The cases whose image could be used, and their images as a ``(N, size, size, 3)`` uint8 array.
    """
    cache = (cache_dir or default_cache_dir()) / "images"
    kept, arrays = [], []
    for case in tqdm(cases, desc=f"preprocess {size}px", disable=not progress, leave=False):
        try:
            key = settings_key(file_digest(case.image), size, PREPROCESS_VERSION)
            path = cache / f"{key}.npy"
            if path.is_file():
                arr = np.load(path)
            else:
                arr = preprocess(load_rgb(case.image), size)
                atomic_save_npy(path, arr)
        except (ImageError, OSError) as exc:
            (report or LoadReport()).skip(str(case.image), str(exc))
            continue
        kept.append(case)
        arrays.append(arr)
    images = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return kept, images
