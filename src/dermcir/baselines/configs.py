"""The baselines' settings: one config class per method, its ``cpu`` and ``gpu`` profiles, and the checks.

Nothing here imports torch (the methods' modules do, which takes seconds), so the command line checks a baseline's
``--set`` names and values before anything loads, exactly as :func:`dermcir.baselines.create_baseline` checks them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dermcir.settings import Rule, check_settings

PROFILES = ("cpu", "gpu")

#: The backbones :func:`dermcir.baselines._nets.build_backbone` builds.
ARCHITECTURES = ("lite0", "resnet50")

#: Training views of a cached image: the eight symmetries of the square (``dermcir.baselines._features.dihedral``).
N_SYMMETRIES = 8

#: Device kinds a ``device`` setting may name (optionally with an index, ``cuda:1``). Checked by name here; whether
#: the machine has one is checked when the method is built (``resolve_device``).
DEVICE_KINDS = ("cpu", "cuda", "mps", "xpu")


def _is_device(name: str) -> bool:
    kind, sep, index = name.partition(":")
    return name == "auto" or (kind in DEVICE_KINDS and (not sep or index.isdigit()))


@dataclass(frozen=True)
class BaselineConfig:
    """Settings shared by every method; each method extends it with its own fields.

    Every config is checked when it is made (a profile, or ``create_baseline``'s overrides through
    ``dataclasses.replace``): each setting's type from its annotation, then the ranges of :meth:`rules` and
    :meth:`check_together`. A bad value is a ``ValueError`` naming the setting before any image is read; otherwise it
    would surface as a traceback deep in a run, or as a finished run of nonsense (e.g. ``epochs=-3``).
    """

    image_size: int = 224  # square input side after border removal
    device: str = "auto"  # "auto": CUDA when available, else CPU; or "cpu", "cuda", "cuda:1", ...
    batch_size: int = 32  # images per forward pass (feature extraction and training)

    def __post_init__(self) -> None:
        check_settings(self, self.rules())
        self.check_together()

    def rules(self) -> dict[str, Rule]:
        """Range checks, setting name -> rule; subclasses extend their parent's."""
        return {
            # the backbones' last map has stride 32; past the Derm7pt images' own size (768 x 512) upscaling only
            # costs time and memory
            "image_size": (lambda v: 32 <= v <= 1024, "an integer in 32..1024"),
            "device": (_is_device, "'auto' or a torch device: 'cpu', 'cuda', 'cuda:1', 'mps' or 'xpu'"),
            "batch_size": (lambda v: v >= 1, "an integer >= 1"),
        }

    def check_together(self) -> None:
        """Checks that involve several settings; raise ``ValueError`` naming them."""


@dataclass(frozen=True)
class BackboneConfig(BaselineConfig):
    """Settings of a method that runs an ImageNet CNN (:func:`dermcir.baselines._nets.build_backbone`)."""

    backbone: str = "lite0"  # "lite0" (offline ImageNet weights) or "resnet50" (needs backbone_weights)
    backbone_weights: str | None = None  # local checkpoint; None = lite0's offline ImageNet weights
    pretrained: bool = True  # False = random weights (tests only)

    def rules(self) -> dict[str, Rule]:
        return super().rules() | {
            "backbone": (lambda v: v in ARCHITECTURES, f"one of {list(ARCHITECTURES)}"),
        }

    def check_together(self) -> None:
        super().check_together()
        # Found here rather than when the backbone is built, which comes after preprocessing every image.
        if self.backbone_weights is not None:
            if not self.pretrained:
                raise ValueError(f"setting backbone_weights={self.backbone_weights!r} with pretrained=False: random "
                                 f"weights would be used and the file ignored; drop one of the two")
            if not Path(self.backbone_weights).is_file():
                raise ValueError(f"setting backbone_weights={self.backbone_weights!r}: expected an existing weights "
                                 f"file (.safetensors/.pth)")
        elif self.backbone == "resnet50" and self.pretrained:
            raise ValueError("setting backbone='resnet50': expected backbone_weights=PATH too (a local ImageNet "
                             "checkpoint; resnet50 has no offline weights), or the default backbone lite0")

    @property
    def backbone_label(self) -> str:
        """How tables and deviations name the CNN actually used, e.g. ``EfficientNet-Lite0``."""
        return BACKBONE_LABELS.get(self.backbone, (self.backbone, self.backbone))[0]

    @property
    def backbone_short(self) -> str:
        """The same, short enough for a row's name, e.g. ``Lite0``."""
        return BACKBONE_LABELS.get(self.backbone, (self.backbone, self.backbone))[1]


#: Backbone -> (full name, short name) in rows and deviations: a row must name the CNN that actually ran.
BACKBONE_LABELS = {"lite0": ("EfficientNet-Lite0", "Lite0"), "resnet50": ("ResNet50", "ResNet50")}


@dataclass(frozen=True)
class TrainedConfig(BackboneConfig):
    """Settings of a baseline that trains a CNN on the database folds."""

    train_backbone: bool = False  # False: stages frozen and cached, tail + head trained (CPU); True: end to end (GPU)
    n_views: int = 4  # symmetries cached per image for the frozen stages (training augmentation); 1..8
    epochs: int = 30
    lr: float = 1e-3  # head (and tail) learning rate
    backbone_lr: float = 1e-4  # backbone stages, when trained
    weight_decay: float = 1e-5
    amp: bool = True  # bf16 autocast on CUDA

    def rules(self) -> dict[str, Rule]:
        return super().rules() | {
            # batch norm cannot train on one sample: batches of 1 are skipped, and nothing would train
            "batch_size": (lambda v: v >= 2, "an integer >= 2"),
            "n_views": (lambda v: 1 <= v <= N_SYMMETRIES, f"an integer in 1..{N_SYMMETRIES}"),
            "epochs": (lambda v: v >= 1, "an integer >= 1"),
            "lr": (lambda v: v > 0, "a number > 0"),
            "backbone_lr": (lambda v: v > 0, "a number > 0"),
            "weight_decay": (lambda v: v >= 0, "a number >= 0"),
        }


@dataclass(frozen=True)
class CosSimConfig(TrainedConfig):
    """ResNet50-CosSim settings (see :class:`TrainedConfig`)."""

    dropout: float = 0.2  # before the classifier, as usual when fine-tuning ImageNet CNNs on small sets

    def rules(self) -> dict[str, Rule]:
        return super().rules() | {"dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)")}


@dataclass(frozen=True)
class SnfConfig(BackboneConfig):
    """SNF-DCA settings (the backbone gives the image features)."""

    image_pca: int = 64  # image features are z-scored and reduced to this many components (fitted on the database);
    # the affinity step z-scores them again over all the fold's nodes (the module's docstring)
    k: int = 20  # neighbours of the affinity kernel and of SNF's local graph (snfpy's K)
    mu: float = 0.5  # width of the affinity kernel (snfpy's mu)
    t: int = 20  # SNF iterations
    community_k: int = 20  # neighbours per node in the graph whose communities are detected
    resolution: float = 1.0  # Louvain modularity resolution (higher = smaller communities)
    cross_fit: int = 5  # parts for the out-of-fold metadata prediction of database cases

    def rules(self) -> dict[str, Rule]:
        return super().rules() | {
            "image_pca": (lambda v: v >= 1, "an integer >= 1"),
            "k": (lambda v: v >= 1, "an integer >= 1"),
            "mu": (lambda v: v > 0, "a number > 0"),
            "t": (lambda v: v >= 1, "an integer >= 1"),
            "community_k": (lambda v: v >= 1, "an integer >= 1"),
            "resolution": (lambda v: v > 0, "a number > 0"),
            # out-of-fold prediction needs another part to fit on
            "cross_fit": (lambda v: v >= 2, "an integer >= 2"),
        }


@dataclass(frozen=True)
class FusionConfig(BackboneConfig):
    """MaskRCNN-Fusion settings (the backbone gives the deep block)."""

    deep_weight: float = 1.0  # weight of the deep block in the fused descriptor
    handcrafted_weight: float = 1.0  # weight of each hand-crafted block (texture, colour, shape)
    crop_margin: float = 0.1  # margin around the lesion's bounding box for the deep block, as a share of its size

    def rules(self) -> dict[str, Rule]:
        return super().rules() | {
            "deep_weight": (lambda v: v >= 0, "a number >= 0"),
            "handcrafted_weight": (lambda v: v >= 0, "a number >= 0"),
            "crop_margin": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        }

    def check_together(self) -> None:
        super().check_together()
        if self.deep_weight == 0 and self.handcrafted_weight == 0:  # every descriptor would be 0: all ties
            raise ValueError("settings deep_weight=0 and handcrafted_weight=0: expected at least one weight > 0")


@dataclass(frozen=True)
class DahnetConfig(TrainedConfig):
    """DAHNET settings (see :class:`TrainedConfig` for the shared ones)."""

    bits: int = 48  # code length; half global, half local
    n_parts: int = 4  # spatial attention maps of the local branch
    pair_weight: float = 1.0  # weight of the pairwise similarity-preserving loss
    quant_weight: float = 0.1  # weight of the quantisation loss

    def rules(self) -> dict[str, Rule]:
        return super().rules() | {
            # half the bits are global, half local
            "bits": (lambda v: 2 <= v <= 1024 and v % 2 == 0, "an even integer in 2..1024"),
            "n_parts": (lambda v: v >= 1, "an integer >= 1"),
            "pair_weight": (lambda v: v >= 0, "a number >= 0"),
            "quant_weight": (lambda v: v >= 0, "a number >= 0"),
        }


C = TypeVar("C", bound=BaselineConfig)


def with_overrides(config: C, **overrides: Any) -> C:
    """A copy of ``config`` with ``overrides`` applied and checked; unknown names are an error that lists the known
    ones, bad values an error that names the setting (:class:`BaselineConfig`)."""
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for {type(config).__name__}; known: {sorted(known)}")
    return dataclasses.replace(config, **overrides)


#: Each built-in method's settings per profile, and the module whose import registers the method
#: (``dermcir.baselines._base.register_baseline``); a test checks the two tables and the registry agree.
METHOD_PROFILES: dict[str, dict[str, BaselineConfig]] = {
    "resnet50-cossim": {
        "cpu": CosSimConfig(image_size=224, n_views=4, epochs=30, lr=1e-3, batch_size=32),
        "gpu": CosSimConfig(image_size=256, train_backbone=True, epochs=30, lr=1e-3, backbone_lr=1e-4, batch_size=32),
    },
    "snf-dca": {"cpu": SnfConfig(image_size=224), "gpu": SnfConfig(image_size=448)},
    "maskrcnn-fusion": {"cpu": FusionConfig(image_size=224), "gpu": FusionConfig(image_size=448)},
    "dahnet": {
        "cpu": DahnetConfig(image_size=224, n_views=4, epochs=30, lr=1e-3, batch_size=32),
        "gpu": DahnetConfig(image_size=256, train_backbone=True, epochs=30, lr=1e-3, backbone_lr=1e-4, batch_size=32),
    },
}
METHOD_MODULES = {
    "resnet50-cossim": "dermcir.baselines.resnet_cossim",
    "snf-dca": "dermcir.baselines.snf_dca",
    "maskrcnn-fusion": "dermcir.baselines.maskrcnn_fusion",
    "dahnet": "dermcir.baselines.dahnet",
}
BASELINE_NAMES = tuple(METHOD_PROFILES)


def configure(name: str, profiles: dict[str, C], profile: str, **overrides: Any) -> C:
    """``profiles[profile]`` with ``overrides`` applied and checked; every error names the method and the profile."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {list(PROFILES)}")
    try:
        return with_overrides(profiles[profile], **overrides)  # checks every setting (BaselineConfig)
    except ValueError as exc:
        raise ValueError(f"{name} ({profile} profile): {exc}") from None


def baseline_config(name: str, profile: str = "cpu", **overrides: Any) -> BaselineConfig:
    """The settings :func:`dermcir.baselines.create_baseline` would build a built-in method with, checked the same
    way, without importing the method (no torch).

    Example:
        >>> baseline_config("dahnet", "cpu", epochs=5).epochs
        5
    """
    if name not in METHOD_PROFILES:
        raise ValueError(f"unknown method {name!r}; built-in baselines: {sorted(METHOD_PROFILES)}")
    return configure(name, METHOD_PROFILES[name], profile, **overrides)
