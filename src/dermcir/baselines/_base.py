"""What every baseline shares: the per-run data, the method interface and the registry (configs: ``configs.py``)."""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from dermcir import devices
from dermcir._lazy import registered
from dermcir.baselines.configs import METHOD_MODULES, PROFILES, BaselineConfig, configure

log = logging.getLogger(__name__)

#: Wording of the two retrieval settings. The seed's protocol gives the query image + text and the database images
#: only; putting metadata on the database side as well is an easier task (shared/REFERENCE.md) and is labelled so.
IMAGE_ONLY_DATABASE = "image-only database (the seed's protocol)"
METADATA_BOTH_SIDES = "metadata on both sides (easier task, NOT the seed's protocol)"


@dataclass
class BaselineData:
    """Everything a baseline may read about the cases of one run; rows follow the order of ``labels``.

    Attributes:
        images: ``(N, S, S, 3)`` uint8 images after border removal and resizing.
        labels: ``(N,)`` category of every case (used only through the training folds' indices).
        metadata: ``(N, D)`` float32 one-hot encoding of the checklist fields (``_metadata.metadata_onehot``).
        cache_dir: folder for feature caches (``None``: keep everything in memory).
        seed: the run's seed; every random choice derives from it.
        progress: show progress bars for the long steps (feature extraction, segmentation).
    """

    images: np.ndarray
    labels: np.ndarray
    metadata: np.ndarray
    cache_dir: Path | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be a (N, S, S, 3) uint8 array, got {self.images.shape} {self.images.dtype}")
        if len(self.images) != n or len(self.metadata) != n:
            raise ValueError(
                f"images ({len(self.images)}), labels ({n}) and metadata ({len(self.metadata)}) must have the same "
                f"length"
            )


def resolve_device(name: str, profile: str) -> torch.device:
    """The torch device for a config's ``device``; the ``gpu`` profile refuses to fall back to a CPU silently."""
    if name == "auto" and profile == "gpu" and not torch.cuda.is_available():
        raise ValueError("profile 'gpu' needs a CUDA device and none was found; use profile 'cpu' (or device='cpu')")
    # every kind the settings check lets through (configs.DEVICE_KINDS), checked here where torch is loaded
    return devices.resolve_device(name)


class Baseline(ABC):
    """A retrieval method run on the protocol's folds.

    Subclasses set ``name``, ``config_class`` and ``profiles`` (a built-in method's come from
    :data:`dermcir.baselines.configs.METHOD_PROFILES`), implement :meth:`prepare` (work that does not depend on the fold,
    e.g. frozen features; may use a disk cache) and :meth:`fold_scores` (fit on the database indices, score the
    queries). ``fold_scores`` returns one ``(n_queries, n_database)`` score matrix per variant, higher = better; the
    first variant is the method's row on the seed's protocol.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[BaselineConfig]]
    profiles: ClassVar[dict[str, BaselineConfig]]

    def __init__(self, config: BaselineConfig, profile: str) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.name}: config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.profile = profile
        self.device = resolve_device(config.device, profile)

    @property
    @abstractmethod
    def display_name(self) -> str:
        """The row's name in tables: honest about substitutes (e.g. the backbone actually used)."""

    @property
    @abstractmethod
    def variants(self) -> dict[str, str]:
        """Variant key -> what the query and database sides carry; the first key is the primary row."""

    @property
    def deviations(self) -> str:
        """One sentence on where this reimplementation differs from the published method."""
        return ""

    def unused_settings(self) -> dict[str, str]:
        """Settings this configuration never reads, with the reason (e.g. ``n_views`` when the whole network trains
        on live images)."""
        return {}

    @property
    def settings(self) -> dict[str, Any]:
        """The settings the run uses, as recorded in ``results.json``: the unused ones are left out, so that the
        record never shows a value that played no part."""
        unused = self.unused_settings()
        return {k: v for k, v in dataclasses.asdict(self.config).items() if k not in unused}

    @abstractmethod
    def prepare(self, data: BaselineData) -> None:
        """Fold-independent work on all cases (never reads labels)."""

    @abstractmethod
    def fold_scores(self, fold: int, db_idx: np.ndarray, q_idx: np.ndarray) -> dict[str, np.ndarray]:
        """Fit on the database cases ``db_idx`` (labels allowed) and score the queries ``q_idx`` against them."""


_REGISTRY: dict[str, type[Baseline]] = {}

B = TypeVar("B", bound=type[Baseline])


def register_baseline(cls: B) -> B:
    """Class decorator: make a baseline buildable by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"baseline {cls.name!r} is registered twice")
    missing = [p for p in PROFILES if p not in cls.profiles]
    if missing:
        raise ValueError(f"baseline {cls.name!r} lacks profile(s) {missing}")
    _REGISTRY[cls.name] = cls
    return cls


def list_baselines() -> list[str]:
    """Method names: the built-in ones and any registered since, sorted."""
    return sorted({*_REGISTRY, *METHOD_MODULES})


def create_baseline(name: str, profile: str = "cpu", **overrides: Any) -> Baseline:
    """Build a registered baseline with its ``profile`` settings, optionally overriding single settings.

    Example:
        >>> create_baseline("resnet50-cossim", "cpu", epochs=5).config.epochs
        5
    """
    cls = registered(name, _REGISTRY, METHOD_MODULES)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; registered baselines: {list_baselines()}")
    config = configure(name, cls.profiles, profile, **overrides)
    baseline = cls(config, profile)
    # Setting a value that the run never reads would look like a change in the record; it is refused instead.
    ignored = {k: why for k, why in baseline.unused_settings().items() if k in overrides}
    if ignored:
        raise ValueError(f"{name} ({profile} profile): setting(s) not used by this configuration: "
                         + "; ".join(f"{k} ({why})" for k, why in sorted(ignored.items())))
    return baseline
