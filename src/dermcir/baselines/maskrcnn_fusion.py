"""MaskRCNN-Fusion (Iqbal et al., IEEE Access 2023): the lesion is segmented, then hand-crafted textural features and
deep visual features of the segmented lesion are fused into one descriptor; the database is ranked by its
similarity to the query's descriptor. Queries are images only.

Mask R-CNN cannot be had here (no weights offline, and Derm7pt has no lesion masks to train one), so the lesion mask
comes from the closest classical substitute: Otsu thresholding of the smoothed lightness, morphological clean-up,
hole filling and the most central large component (falling back to a central disc when that fails). The row's name
says so. On that mask:
- texture: uniform LBP histograms (P=8, R=1 and P=16, R=2) of the lesion pixels and grey-level co-occurrence
  properties (contrast, dissimilarity, homogeneity, energy, correlation, ASM) of the lesion, via scikit-image;
- colour: mean, standard deviation and skewness of the lesion's RGB and HSV values;
- shape: area fraction, eccentricity, solidity, extent and compactness of the mask;
- deep: the frozen ImageNet penultimate features of EfficientNet-Lite0 (or the ``backbone`` setting's CNN) on the
  lesion's bounding box.
Fusion: each block is z-scored (statistics of the database), divided by the square root of its width so that
every block weighs the same, weighted, concatenated; ranking by cosine similarity.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import color, filters, measure, morphology, transform
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
from tqdm.auto import tqdm

from dermcir.baselines._base import IMAGE_ONLY_DATABASE, Baseline, BaselineData, register_baseline
from dermcir.baselines._features import content_key, cosine_scores, frozen_features
from dermcir.baselines._nets import build_backbone
from dermcir.baselines.configs import METHOD_PROFILES, FusionConfig
from dermcir.data.cache import read_entry, settings_key, write_entry

log = logging.getLogger(__name__)

HANDCRAFTED_BLOCKS = ("texture", "colour", "shape")
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
LBP_SETTINGS = ((8, 1.0), (16, 2.0))
GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 3)
FEATURES_VERSION = "fusion-v1"


def _load_handcrafted(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The hand-crafted blocks and lesion crops cached by ``MaskRcnnFusion._handcrafted``."""
    with np.load(path) as cached:
        return {b: cached[b] for b in HANDCRAFTED_BLOCKS}, cached["crops"]


def lesion_mask(image: np.ndarray) -> np.ndarray:
    """Boolean lesion mask of an ``(S, S, 3)`` uint8 dermoscopy image (the Mask R-CNN substitute; module docstring)."""
    side = image.shape[0]
    lightness = filters.gaussian(color.rgb2lab(image)[..., 0], sigma=max(1.0, side / 112))
    fallback = _central_disc(image.shape[:2])
    if np.ptp(lightness) < 1e-6:
        return fallback
    dark = lightness < filters.threshold_otsu(lightness)
    dark = ndimage.binary_opening(dark, structure=morphology.disk(max(1, side // 75)))
    dark = ndimage.binary_fill_holes(dark)
    regions = measure.regionprops(measure.label(dark))
    if not regions:
        return fallback
    centre = np.array(image.shape[:2]) / 2.0
    # Large and central wins: dermoscopy centres the lesion, while dark corners (vignetting, hair) hug the edges.
    best = max(regions, key=lambda r: r.area / (1.0 + np.linalg.norm(np.array(r.centroid) - centre) / side * 4))
    mask = np.zeros(image.shape[:2], bool)
    mask[tuple(best.coords.T)] = True
    if not 0.01 <= mask.mean() <= 0.95:
        return fallback
    return mask


def _central_disc(shape: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 <= (0.35 * min(shape)) ** 2


def texture_features(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """LBP histograms of the lesion pixels and GLCM properties of the lesion (co-occurrences inside the mask only)."""
    parts = []
    for points, radius in LBP_SETTINGS:
        codes = local_binary_pattern(gray, points, radius, method="uniform")[mask]
        hist, _ = np.histogram(codes, bins=points + 2, range=(0, points + 2))
        parts.append(hist / max(hist.sum(), 1))
    # Level 0 marks the background; its co-occurrences are dropped so that only lesion texture counts.
    levels = np.where(mask, 1 + (gray.astype(np.int64) * (GLCM_LEVELS - 1)) // 255, 0).astype(np.uint8)
    angles = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
    glcm = graycomatrix(levels, GLCM_DISTANCES, angles, levels=GLCM_LEVELS + 1, symmetric=True)[1:, 1:].astype(float)
    glcm /= np.maximum(glcm.sum(axis=(0, 1), keepdims=True), 1e-12)
    parts.append(np.concatenate([graycoprops(glcm, p).mean(axis=1) for p in GLCM_PROPS]))
    return np.concatenate(parts)


def colour_features(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean, standard deviation and skewness of the lesion's RGB and HSV values."""
    pixels = np.concatenate([image[mask] / 255.0, color.rgb2hsv(image)[mask]], axis=1)
    mean, std = pixels.mean(axis=0), pixels.std(axis=0)
    # A flat channel has no defined skewness; call it 0 rather than let a 0/0 through.
    safe = np.where(std > 1e-6, std, 1.0)
    skew = np.where(std > 1e-6, (((pixels - mean) / safe) ** 3).mean(axis=0), 0.0)
    return np.concatenate([mean, std, skew])


def shape_features(mask: np.ndarray) -> np.ndarray:
    """Area fraction, eccentricity, solidity, extent and compactness (perimeter² / 4π·area) of the mask."""
    props = measure.regionprops(mask.astype(np.uint8))[0]
    compact = props.perimeter ** 2 / (4 * np.pi * max(props.area, 1))
    return np.array([mask.mean(), props.eccentricity, props.solidity, props.extent, compact], dtype=np.float64)


def lesion_crop(image: np.ndarray, mask: np.ndarray, margin: float) -> np.ndarray:
    """The lesion's bounding box (plus ``margin``), resized back to the image's size, as uint8."""
    rows, cols = np.nonzero(mask)
    side = image.shape[0]
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    pad_r, pad_c = int((r1 - r0) * margin), int((c1 - c0) * margin)
    r0, r1 = max(0, r0 - pad_r), min(side, r1 + pad_r)
    c0, c1 = max(0, c0 - pad_c), min(image.shape[1], c1 + pad_c)
    crop = transform.resize(image[r0:r1, c0:c1], image.shape[:2], order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(crop), 0, 255).astype(np.uint8)


def handcrafted_and_crops(
    images: np.ndarray, margin: float, progress: bool = True
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every image's hand-crafted blocks (``{block: (N, F)}``) and its lesion crop (``(N, S, S, 3)`` uint8)."""
    blocks: dict[str, list[np.ndarray]] = {b: [] for b in HANDCRAFTED_BLOCKS}
    crops = np.empty_like(images)
    for i, image in enumerate(tqdm(images, desc="segment + texture", disable=not progress, leave=False)):
        mask = lesion_mask(image)
        gray = np.rint(color.rgb2gray(image) * 255).astype(np.uint8)
        blocks["texture"].append(texture_features(gray, mask))
        blocks["colour"].append(colour_features(image, mask))
        blocks["shape"].append(shape_features(mask))
        crops[i] = lesion_crop(image, mask, margin)
    return {b: np.stack(v).astype(np.float32) for b, v in blocks.items()}, crops


def fuse_blocks(blocks: dict[str, np.ndarray], weights: dict[str, float], fit_idx: np.ndarray) -> np.ndarray:
    """Z-score every block on the ``fit_idx`` rows, give it unit expected norm times its weight, concatenate."""
    parts = []
    for name, x in blocks.items():
        mean, std = x[fit_idx].mean(axis=0), x[fit_idx].std(axis=0)
        z = (x - mean) / np.where(std > 1e-8, std, 1.0)
        parts.append(weights[name] * z / np.sqrt(x.shape[1]))
    return np.concatenate(parts, axis=1)


@register_baseline
class MaskRcnnFusion(Baseline):
    """See the module docstring."""

    name = "maskrcnn-fusion"
    config_class = FusionConfig
    profiles = METHOD_PROFILES[name]
    config: FusionConfig

    @property
    def display_name(self) -> str:
        return ("Otsu-Fusion (MaskRCNN-Fusion protocol; Otsu lesion mask instead of Mask R-CNN; LBP/GLCM + "
                f"{self.config.backbone_short})")

    @property
    def variants(self) -> dict[str, str]:
        return {"main": f"image-only query, {IMAGE_ONLY_DATABASE}"}

    @property
    def deviations(self) -> str:
        return ("Classical Otsu segmentation instead of Mask R-CNN (no weights or lesion masks offline); frozen "
                f"{self.config.backbone_label} deep features; LBP/GLCM/colour/shape as the hand-crafted set; equal-weight "
                "z-scored concatenation as the fusion.")

    def prepare(self, data: BaselineData) -> None:
        self.data = data
        handcrafted, crops = self._handcrafted(data)
        backbone = build_backbone(self.config.backbone, self.config.backbone_weights, self.config.pretrained)
        deep = frozen_features(backbone, crops, self.device, self.config.batch_size, data.cache_dir, data.progress)
        self.blocks = {**handcrafted, "deep": deep}
        cfg = self.config
        self.weights = {**{b: cfg.handcrafted_weight for b in HANDCRAFTED_BLOCKS}, "deep": cfg.deep_weight}

    def _handcrafted(self, data: BaselineData) -> tuple[dict[str, np.ndarray], np.ndarray]:
        key = settings_key(content_key(data.images), self.config.crop_margin, FEATURES_VERSION)
        path = data.cache_dir / "baselines" / f"fusion-{key}.npz" if data.cache_dir else None
        # a cache that cannot be read or written costs time, never the run: a damaged entry is computed again
        if path is not None:
            cached, error = read_entry(path, _load_handcrafted)
            if cached is not None:
                return cached
            if error is not None:
                log.warning("%s: unreadable cached features (%s); computing them again", path, error)
        blocks, crops = handcrafted_and_crops(data.images, self.config.crop_margin, data.progress)
        if path is not None:
            error = write_entry(path, lambda fh: np.savez(fh, crops=crops, **blocks))
            if error is not None:
                log.warning("could not write features into the cache %s (%s); they were used without being saved",
                            path.parent, error)
        return blocks, crops

    def fold_scores(self, fold: int, db_idx: np.ndarray, q_idx: np.ndarray) -> dict[str, np.ndarray]:
        fused = fuse_blocks(self.blocks, self.weights, db_idx)
        return {"main": cosine_scores(fused[q_idx], fused[db_idx])}
