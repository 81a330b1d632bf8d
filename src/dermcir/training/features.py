"""Inputs for training and evaluation: cached backbone features (CPU profile) or device-resident images (GPU profile).

Both sources answer ``batch(idx, train)`` with the backbone maps of those cases, so the trainer does not care which
profile it runs. The text encoder is frozen in both profiles, so token embeddings are computed once per distinct text.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import timm
import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from dermcir.checkpoint import state_digest
from dermcir.data.cache import default_cache_dir, read_entry, settings_key, write_entry
from dermcir.data.cases import Case
from dermcir.models import ComposedRetrievalModel
from dermcir.training import feature_layout

log = logging.getLogger(__name__)


@torch.no_grad()
def text_tokens(model: ComposedRetrievalModel, texts: Sequence[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen token embeddings ``(N, T, E)`` (padded to the longest text) and padding masks ``(N, T)``."""
    uniq = sorted(set(texts))
    outs, pads = [], []
    for i in range(0, len(uniq), batch_size):
        tok, pad = model.text_features(uniq[i : i + batch_size])
        outs.append(tok.float().cpu())
        pads.append(pad.cpu())
    width = max(t.shape[1] for t in outs)
    tokens = torch.zeros(len(uniq), width, outs[0].shape[2])
    mask = torch.ones(len(uniq), width, dtype=torch.bool)
    row = 0
    for t, p in zip(outs, pads, strict=True):
        tokens[row : row + len(t), : t.shape[1]] = t
        mask[row : row + len(t), : t.shape[1]] = p
        row += len(t)
    where = {t: i for i, t in enumerate(uniq)}
    order = torch.tensor([where[t] for t in texts])
    return tokens[order], mask[order]


class CachedFeatures:
    """CPU profile: frozen-backbone maps of every case (and of its flipped views), cached on disk as safetensors.

    The cache holds maps pooled to at most :attr:`CACHE_GRID` per side, independent of the model's own ``grid``, so
    trying another grid does not redo the backbone passes; the model's grid pooling is applied when loading. That
    two-step pooling equals the one step the index and search take (``pool_maps`` of the native maps) only when the
    grid divides :attr:`CACHE_GRID` and every map larger than it is a multiple of it; other settings are refused.
    """

    VIEWS = feature_layout.VIEWS
    #: Part of every entry's key with timm's version: the same weights give other maps when the code that runs
    #: them changes (the levels tapped, the pooling into the cache, timm's implementation of the backbone). Raise
    #: it with any such change here, so that training never reads maps that search no longer computes.
    FORMAT = "maps-v1"
    CACHE_GRID = feature_layout.CACHE_GRID

    device = torch.device("cpu")  # the maps stay in host memory; batches are copied to the training device

    def __init__(self, maps: list[list[torch.Tensor]]) -> None:
        self.maps = maps  # views × levels × (N, C, g, g) float16

    @classmethod
    def build(
        cls, model: ComposedRetrievalModel, cases: Sequence[Case], images: np.ndarray, n_views: int = 1,
        cache_dir: Path | None = None, batch_size: int = 2, progress: bool = True,
    ) -> CachedFeatures:
        cache = (cache_dir or default_cache_dir()) / "features"
        cfg = model.config
        feature_layout.check_cached_grid(cfg.grid, cls.CACHE_GRID)
        weights = state_digest(model.backbone)
        # the digest of the preprocessed pixels the backbone sees, not of the image file: a change of preprocessing
        # (its code, PREPROCESS_VERSION, the size) then misses this cache as it misses the image cache
        pixels = [hashlib.sha1(np.ascontiguousarray(image)).hexdigest() for image in images]
        if len(pixels) != len(cases):
            raise ValueError(f"{len(cases)} cases but {len(pixels)} images; preprocess_cases gives one per case")
        if not cases:
            raise ValueError("no cases to compute backbone features for (every image was left out?)")
        views = []
        for view in cls.VIEWS[:n_views]:
            keys = [settings_key(digest, images.shape[1:], cfg.backbone, weights, cfg.image_size, cls.CACHE_GRID, view,
                                 cls.FORMAT, timm.__version__)
                    for digest in pixels]
            # A cache that cannot be read or written costs time, never the run (as for the image cache): a damaged
            # entry is computed again, and maps that cannot be saved are kept in memory for this run.
            found: list[dict[str, torch.Tensor] | None] = []
            unreadable: list[str] = []
            for k in keys:
                entry, error = read_entry(cache / f"{k}.safetensors", lambda p: load_file(str(p)))
                found.append(entry)
                if error is not None:
                    unreadable.append(f"{cache / k}.safetensors: {error}")
            if unreadable:
                log.warning("%d cached backbone feature file(s) could not be read, e.g. %s; computing them again",
                            len(unreadable), unreadable[0])
            todo = [i for i, entry in enumerate(found) if entry is None]
            write_error: OSError | None = None
            n_unsaved = 0
            if todo:
                bar = tqdm(total=len(todo), desc=f"backbone features ({view})", disable=not progress, leave=False)
                with torch.inference_mode():
                    for s in range(0, len(todo), batch_size):
                        chunk = todo[s : s + batch_size]
                        # small batches: at 512 px they stay in cache and ran 2x faster per image than 16 here
                        x = model.normalize(_apply_view(images[chunk], view))
                        maps = model.backbone(x.contiguous(memory_format=torch.channels_last))
                        _check_sides(maps, cls.CACHE_GRID, cfg)
                        # one transfer per batch and level, not one per case (each a host sync on a GPU)
                        maps = [torch.nn.functional.adaptive_avg_pool2d(m, min(cls.CACHE_GRID, m.shape[-1])).half().cpu()
                                for m in maps]
                        for j, i in enumerate(chunk):
                            found[i] = {f"level{l}": m[j].contiguous() for l, m in enumerate(maps)}
                            if write_error is None:  # after one failure the cache is not tried again this run
                                write_error = write_entry(cache / f"{keys[i]}.safetensors",
                                                          lambda fh, maps=found[i]: fh.write(save(maps)))
                            n_unsaved += write_error is not None
                        bar.update(len(chunk))
                bar.close()
            if write_error is not None:
                log.warning("could not write backbone features into the cache %s (%s): %d case(s) were used without "
                            "being saved, and the next run will compute them again", cache, write_error, n_unsaved)
            stacked = [torch.stack([d[f"level{l}"] for d in found]) for l in range(len(found[0]))]
            views.append([m.half() for m in model.pool_maps([m.float() for m in stacked])])
        return cls(views)

    def __len__(self) -> int:
        return self.maps[0][0].shape[0]

    def batch(self, idx: torch.Tensor, train: bool, device: torch.device) -> list[torch.Tensor]:
        if train and len(self.maps) > 1:
            # One random view per case: a cheap stand-in for image augmentation when the backbone is frozen.
            view = torch.randint(len(self.maps), (len(idx),))
            out = []
            for level in range(len(self.maps[0])):
                stacked = torch.stack([self.maps[v][level][i] for v, i in zip(view.tolist(), idx.tolist(), strict=True)])
                out.append(stacked.to(device).float())
            return out
        return [m[idx].to(device).float() for m in self.maps[0]]


def _check_sides(maps: Sequence[torch.Tensor], cache_grid: int, cfg) -> None:
    """Refuse maps that pooling to ``cache_grid`` and then to ``cfg.grid`` would average unevenly (see ``check_cached_grid``)."""
    bad = sorted({m.shape[-1] for m in maps if m.shape[-1] > cache_grid and m.shape[-1] % cache_grid})
    if bad:
        raise ValueError(
            f"image_size={cfg.image_size}: backbone {cfg.backbone!r} gives maps of side {bad}; cached features need "
            f"every map side up to {cache_grid} or a multiple of it (e.g. image_size 128, 256 or 512), or pooling "
            f"them to grid={cfg.grid} would differ from what the index and search compute"
        )


def _apply_view(images: np.ndarray, view: str) -> np.ndarray:
    if view == "hflip":
        return np.ascontiguousarray(images[:, :, ::-1])
    if view == "vflip":
        return np.ascontiguousarray(images[:, ::-1])
    if view == "rot180":
        return np.ascontiguousarray(images[:, ::-1, ::-1])
    return images


class DeviceImages:
    """GPU profile: uint8 images resident on the device; augmentation runs there too, without host round trips."""

    def __init__(self, model: ComposedRetrievalModel, images: np.ndarray, device: torch.device, augment: bool = True):
        self.model = model
        self.images = torch.as_tensor(images).to(device)  # (N, H, W, 3) uint8
        self.augment = augment

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, idx: torch.Tensor, train: bool, device: torch.device) -> list[torch.Tensor]:
        x = self.images[idx.to(self.images.device)]
        if train and self.augment:
            x = augment_on_device(x)
        return self.model.image_features(x)


def augment_on_device(x: torch.Tensor) -> torch.Tensor:
    """Random flips, 90° rotations and brightness/contrast jitter of a uint8 ``(B, H, W, 3)`` batch, on its device.

    Dermoscopy has no canonical orientation, so the dihedral group is a free augmentation.
    """
    b = x.shape[0]
    dev = x.device
    flip_h = torch.rand(b, device=dev) < 0.5
    flip_v = torch.rand(b, device=dev) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(2), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(1), x)
    if x.shape[1] == x.shape[2]:
        rot = torch.rand(b, device=dev) < 0.5
        x = torch.where(rot[:, None, None, None], x.transpose(1, 2), x)
    xf = x.float()
    gain = 1.0 + 0.2 * (torch.rand(b, 1, 1, 1, device=dev) - 0.5)
    bias = 20.0 * (torch.rand(b, 1, 1, 1, device=dev) - 0.5)
    mean = xf.mean(dim=(1, 2, 3), keepdim=True)
    xf = (xf - mean) * gain + mean + bias
    return xf.clamp_(0, 255).to(torch.uint8)
