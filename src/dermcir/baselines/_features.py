"""Frozen-backbone feature maps for the CPU profile, computed once per image and view and cached on disk.

Dermoscopy has no preferred orientation, so the training views are the eight symmetries of the square (flips and
quarter turns); view 0 is the image as it is and is the one used for retrieval.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dermcir.baselines._nets import SplitBackbone
from dermcir.baselines.configs import N_SYMMETRIES
from dermcir.checkpoint import state_digest
from dermcir.data.cache import read_entry, settings_key, write_entry

log = logging.getLogger(__name__)

LEVELS = ("mid", "top")


def dihedral(images: torch.Tensor, view: int) -> torch.Tensor:
    """One of the eight symmetries of ``(B, H, W, C)`` square images: ``view`` in 0..7, 0 is the identity."""
    if not 0 <= view < N_SYMMETRIES:
        raise ValueError(f"view must be in 0..{N_SYMMETRIES - 1}, got {view}")
    out = torch.rot90(images, view % 4, dims=(1, 2))
    return out.flip(2) if view >= 4 else out


def content_key(images: np.ndarray) -> str:
    """A digest of the images' bytes, so that cached features follow the images they came from."""
    return hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()


@torch.inference_mode()
def backbone_maps(
    backbone: SplitBackbone, images: np.ndarray, n_views: int, levels: Sequence[str], device: torch.device,
    batch_size: int = 32, cache_dir: Path | None = None, progress: bool = True,
) -> dict[str, np.ndarray]:
    """The frozen backbone's maps of every image under the first ``n_views`` symmetries.

    Args:
        backbone: the network (put in eval mode here).
        images: ``(N, S, S, 3)`` uint8.
        n_views: how many symmetries (1..8).
        levels: which maps to keep: ``"mid"`` (stride 16) and/or ``"top"`` (stride 32).
        device: where to run.
        batch_size: images per forward pass.
        cache_dir: where to cache the result (``None``: no cache).
        progress: show a progress bar.

    Returns:
        ``{level: (n_views, N, C, H, W) float16}``.
    """
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise ValueError(f"unknown level(s) {unknown}; expected a subset of {list(LEVELS)}")
    # the weights by their content, not by their file's name: other weights at the same path miss the cache
    key = settings_key(content_key(images), backbone.name, state_digest(backbone), n_views, images.shape, "maps-v2")
    paths = {lv: (cache_dir / "baselines" / f"{lv}-{key}.npy") if cache_dir else None for lv in levels}
    if all(p is not None for p in paths.values()):
        # a cache that cannot be read or written costs time, never the run: a damaged entry is computed again
        cached = {lv: read_entry(p, np.load) for lv, p in paths.items()}  # type: ignore[arg-type]
        errors = [str(error) for _, error in cached.values() if error is not None]
        if errors:
            log.warning("backbone maps: unreadable cache entry %s (%s); computing them again", key, errors[0])
        elif all(maps is not None for maps, _ in cached.values()):
            log.info("backbone maps: cache hit (%s)", key)
            return {lv: maps for lv, (maps, _) in cached.items()}
    backbone.eval().to(device)
    out: dict[str, list[list[np.ndarray]]] = {lv: [[] for _ in range(n_views)] for lv in levels}
    steps = [(v, s) for v in range(n_views) for s in range(0, len(images), batch_size)]
    for view, start in tqdm(steps, desc=f"{backbone.name} maps ({n_views} views)", disable=not progress, leave=False):
        batch = dihedral(torch.from_numpy(images[start:start + batch_size]).to(device), view)
        mid, top = backbone.maps(backbone.normalize(batch))
        for lv, arr in (("mid", mid), ("top", top)):
            if lv in out:
                out[lv][view].append(arr.float().cpu().numpy().astype(np.float16))
    # C order, as np.load returns them: the backbone's channels-last maps otherwise keep their strides, and torch
    # then runs the tail's convolutions on another memory layout, with other rounding. A run that computed the maps
    # scored differently from one that loaded them (SNF-DCA's communities moved: mAP 57.69 against 57.77).
    result = {lv: np.ascontiguousarray(np.stack([np.concatenate(chunks) for chunks in per_view]))
              for lv, per_view in out.items()}
    for lv, path in paths.items():
        if path is not None:
            error = write_entry(path, lambda fh, maps=result[lv]: np.save(fh, maps))
            if error is not None:
                log.warning("could not write backbone maps into the cache %s (%s); they were used without being "
                            "saved, and the next run will compute them again", path.parent, error)
                break
    return result


@torch.inference_mode()
def pooled_features(
    backbone: SplitBackbone, top: np.ndarray, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """Global average of the (frozen) tail's map: the ImageNet classifier's penultimate features, ``(N, D)``."""
    backbone.eval().to(device)
    chunks = []
    for start in range(0, len(top), batch_size):
        x = torch.from_numpy(top[start:start + batch_size].astype(np.float32)).to(device)
        chunks.append(backbone.tail(x).mean(dim=(2, 3)).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, backbone.out_channels), np.float32)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def cosine_scores(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """``(n_q, n_db)`` cosine similarities."""
    return l2_normalize(queries.astype(np.float64)) @ l2_normalize(database.astype(np.float64)).T


def frozen_features(
    backbone: SplitBackbone, images: np.ndarray, device: torch.device, batch_size: int = 32,
    cache_dir: Path | None = None, progress: bool = True,
) -> np.ndarray:
    """The frozen ImageNet penultimate features of every image (view 0 only), ``(N, D)`` float32."""
    maps = backbone_maps(backbone, images, 1, ("top",), device, batch_size, cache_dir, progress)
    return pooled_features(backbone, maps["top"][0], device, batch_size)
