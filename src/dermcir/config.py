"""Typed configs, saved as JSON beside every checkpoint so that loading restores everything needed to encode."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dermcir.files import write_json_atomic
from dermcir.models.registry import list_backbones, list_text_encoders
from dermcir.settings import check_settings

T = TypeVar("T")

#: What early stopping may maximise (``TrainConfig.select_by``): validation mAP, or the mean of all four figures.
SELECTION = {"mAP": ("mAP",), "all": ("mAP", "Acc@1", "Acc@2", "Acc@4")}


@dataclass
class ModelConfig:
    """Everything that defines a composed-retrieval model and its preprocessing."""

    backbone: str = "lite0"  # registered vision backbone name (dermcir.models.list_backbones())
    backbone_weights: str | None = None  # local checkpoint path or hub name; None = the backbone's offline default
    text_encoder: str = "minilm"  # registered text encoder name (dermcir.models.list_text_encoders())
    text_weights: str | None = None  # local Hugging Face folder or hub name; None = the encoder's offline default
    image_size: int = 512  # square input side after border removal
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # input normalisation (restored from the backbone)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    grid: int | None = None  # pool every level's map to grid×grid before fusion (None = native resolution)
    dim: int = 128  # shared visual embedding width D of each level after projection
    heads: int = 4  # attention heads of the cross-modal transformer
    fusion_layers: int = 1  # cross-modal transformer layers per level
    text_layers: int = 1  # trainable self-attention layers over the (frozen) text tokens, shared by the levels
    # training-time dropout on the projected image features (elementwise, not whole tokens; targets and queries
    # alike): keeps the image path from memorising the cases
    token_dropout: float = 0.0
    n_masks: int = 8  # k spatial attention masks per level (Eq. 6)
    beta: float = 0.6  # weight of the local term in Eq. 9
    # Independently initialised and trained head sets over the same frozen encoders; their unit descriptors are
    # averaged (an ensemble inside one checkpoint: same embedding size, same Eq. 9, less seed-to-seed variance).
    members: int = 1
    # A companion: a second model of the same kind whose backbone stays frozen at its ImageNet weights (its own heads,
    # set by these ModelConfig overrides, e.g. {"grid": 4, "dim": 64, "members": 2}). Its fused score is added to the
    # main one with weight companion_weight: s = (1 - w) s_main + w s_companion, still one inner product. A fine-tuned
    # backbone sorts whole categories; the frozen one keeps near neighbours of other categories in the top results
    # (docs/method.md). None: no companion.
    companion: dict[str, Any] | None = None
    companion_weight: float = 0.5
    max_text_tokens: int = 96
    template_version: str = "meta-report-v1"
    categories: list[str] = field(default_factory=list)  # training categories, in proxy order

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(self.mean), tuple(self.std)  # JSON gives lists
        for name in ("backbone_weights", "text_weights"):
            value = getattr(self, name)
            if isinstance(value, str) and value and Path(value).exists():
                # a checkpoint's config is read from other folders than the training's: a relative path would point
                # nowhere there (or, taken for a hub name, at a model that does not exist)
                setattr(self, name, str(Path(value).resolve()))
        # companion_weight and the companion's own settings by check_companion, after the main model's
        check_settings(self, {
            "backbone": (lambda v: v in list_backbones(), f"a registered backbone: {', '.join(list_backbones())}"),
            "text_encoder": (lambda v: v in list_text_encoders(),
                             f"a registered text encoder: {', '.join(list_text_encoders())}"),
            "members": (lambda v: v >= 1, "an integer >= 1"),
            "image_size": (lambda v: v >= 32, "an integer >= 32 (the backbones' last map has stride 32)"),
            "grid": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
            "heads": (lambda v: v >= 1, "an integer >= 1"),  # before dim, which it divides
            "dim": (lambda v: v >= 1 and v % self.heads == 0, f"an integer >= 1 divisible by heads={self.heads}"),
            # without a cross-modal layer the text never reaches the image: composed queries would equal
            # image-only ones and every text-only query the same (at first zero) vector
            "fusion_layers": (lambda v: v >= 1, "an integer >= 1 (the layers that inject the text)"),
            "text_layers": (lambda v: v >= 0, "an integer >= 0"),
            "token_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
            "n_masks": (lambda v: v >= 1, "an integer >= 1"),
            "beta": (lambda v: 0 <= v <= 1, "a number in [0, 1] (the local term's weight in Eq. 9)"),
            "max_text_tokens": (lambda v: v >= 1, "an integer >= 1"),
        })
        check_companion(self)


#: What a companion may set differently from its main model: the heads only. The backbone kind, the input size and
#: normalisation, the text encoder and β are shared, so one preprocessed image and one text serve both.
COMPANION_FIELDS = frozenset({"grid", "dim", "heads", "fusion_layers", "text_layers", "token_dropout", "n_masks",
                              "members"})


def check_companion(config: ModelConfig) -> None:
    """Refuse a ``companion`` that is not a dict of head settings, or a ``companion_weight`` outside (0, 1)."""
    if config.companion is None:
        return
    if not isinstance(config.companion, dict):
        # a ValueError like every other bad setting (the CLI reports those in one line)
        raise ValueError(f"companion must be a dict of model settings or None, got {config.companion!r}")  # noqa: TRY004
    unknown = set(config.companion) - COMPANION_FIELDS
    if unknown:
        raise ValueError(f"companion: setting(s) {sorted(unknown)} cannot differ from the main model; a companion "
                         f"may set {sorted(COMPANION_FIELDS)}")
    if not 0.0 < config.companion_weight < 1.0:
        raise ValueError(f"companion_weight must lie strictly between 0 and 1, got {config.companion_weight}")
    try:  # its settings as a model of its own, now rather than when the companion is built after preprocessing
        dataclasses.replace(config, **config.companion, companion=None)
    except ValueError as exc:
        raise ValueError(f"companion: {exc}") from None


@dataclass
class TrainConfig:
    """Optimisation settings (defaults follow the seed: Adam, lr 1e-4, weight decay 1e-5, ≤100 epochs, patience 30)."""

    profile: str = "cpu"  # "cpu": frozen backbone on cached features; "gpu": backbone fine-tuned end to end
    epochs: int = 100
    patience: int = 30
    lr: float = 1e-4
    head_lr: float = 1e-3  # fusion/mask heads start from scratch and may learn faster than a pretrained backbone
    weight_decay: float = 1e-5
    batch_size: int = 64
    val_fraction: float = 0.15
    # After early stopping picks the epoch, train this many more epochs on the whole database (train + validation
    # split): the protocol's database *is* the training folds, so every database case should be fitted.
    refit_epochs: int = 10
    # Which validation figure picks the kept epoch and drives patience: "mAP", or "all" (the mean of mAP and
    # Acc@1/2/4: mAP alone keeps training while the top results stop hedging; docs/method.md).
    select_by: str = "mAP"
    temperature: float = 0.1
    proxy_weight: float = 1.0
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA
    augment: bool = True
    # Every batch the same size: the last training batch of an epoch is topped up with cases from the epoch's first
    # batch, and evaluation pads its last batch. On the GPU each new batch shape costs seconds of one-off kernel
    # preparation (measured on an H100: a fold's first epoch took 40-107 s instead of 1.5 s; docs/method.md).
    full_batches: bool = False
    # Epochs of a companion (ModelConfig.companion), which otherwise trains as the cpu profile does (up to 100 epochs,
    # patience 30, the refit); a cap for smoke tests and quick probes.
    companion_epochs: int | None = None

    def __post_init__(self) -> None:
        check_settings(self, {
            "profile": (lambda v: v in ("cpu", "gpu"), "'cpu' or 'gpu'"),
            "epochs": (lambda v: v >= 1, "an integer >= 1"),
            "patience": (lambda v: v >= 1, "an integer >= 1"),
            "lr": (lambda v: v > 0, "a number > 0"),
            "head_lr": (lambda v: v > 0, "a number > 0"),
            "weight_decay": (lambda v: v >= 0, "a number >= 0"),
            "batch_size": (lambda v: v >= 2, "an integer >= 2 (the loss compares the cases of a batch)"),
            "val_fraction": (lambda v: 0 < v < 1, "a number in (0, 1)"),
            "refit_epochs": (lambda v: v >= 0, "an integer >= 0"),
            "select_by": (lambda v: v in SELECTION, " or ".join(repr(k) for k in SELECTION)),
            "temperature": (lambda v: v > 0, "a number > 0"),
            "proxy_weight": (lambda v: v >= 0, "a number >= 0"),
            "companion_epochs": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
        })


def to_json(obj: Any, path: str | Path) -> None:
    write_json_atomic(path, dataclasses.asdict(obj))


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build a dataclass from a dict, rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for {cls.__name__}; known: {sorted(names)}")
    try:
        return cls(**data)
    except ValueError as exc:  # a value's check: say which file holds it, or it reads like a --set mistake
        raise ValueError(f"{where}: {exc}") from None
