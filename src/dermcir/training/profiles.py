"""The two training profiles, as named pairs of configs.

* ``cpu``: frozen ImageNet backbone whose multi-level maps are cached once (pooled to a 4×4 grid per level) with two
  views (identity, horizontal flip) for augmentation; only the text layers, cross-modal transformers and mask heads
  train, as two independently initialised head sets whose descriptors are averaged (small heads on frozen features
  vary a lot from seed to seed; see docs/method.md). Sized for the whole 5-fold benchmark in under 20 minutes on 2
  idle CPU cores (16–20 min measured on one machine; 25 min on a 1.4 times slower one: docs/method.md).
* ``gpu``: the backbone fine-tuned end to end at 512 px with the seed's optimiser settings, native-resolution maps,
  device-resident images and augmentation, bf16 autocast; plus a companion (``ModelConfig.companion``): the cpu
  profile's heads over a frozen copy of the backbone, trained as the cpu profile trains, its score joined with
  weight 0.5.
"""

from __future__ import annotations

from dataclasses import replace

from dermcir.config import ModelConfig, TrainConfig
from dermcir.models.registry import WEIGHTS_SETTING, require_local_weights
from dermcir.training.feature_layout import VIEWS, check_cached_grid

_CPU_MODEL = ModelConfig(grid=4, dim=64, token_dropout=0.3, members=2)
#: The gpu profile's companion: the cpu profile's heads over the frozen backbone (``ModelConfig.companion``).
_CPU_HEADS = {k: getattr(_CPU_MODEL, k) for k in ("grid", "dim", "heads", "token_dropout", "members")}

PROFILES: dict[str, tuple[ModelConfig, TrainConfig, int]] = {
    # name: (model config, train config, cached views)
    "cpu": (
        _CPU_MODEL,
        TrainConfig(profile="cpu", head_lr=3e-3, batch_size=128),
        2,
    ),
    "gpu": (
        # the companion (frozen ImageNet backbone, the cpu profile's heads, trained as the cpu profile trains) keeps
        # the top results hedging; at 128 px on five test folds it raised Acc@4 by 5.3 and mAP by 1.2 (docs/method.md)
        ModelConfig(grid=None, dim=256, heads=8, token_dropout=0.3, companion=dict(_CPU_HEADS), companion_weight=0.5),
        # the backbone at the seed's lr 1e-4; the heads start from scratch and get 1e-3 (a 12-epoch probe of this
        # recipe at 128 px on fold 0 reached validation mAP 83.4 with 1e-3 against 78.1 with 1e-4; docs/method.md)
        TrainConfig(profile="gpu", head_lr=1e-3, batch_size=48, full_batches=True),
        1,
    ),
}


#: ModelConfig fields a run sets for itself, and where from: an override would be overwritten without a word, or (the
#: text template) written into a checkpoint that no dermcir loads
DERIVED_SETTINGS = {
    "categories": "the cases' categories",
    "mean": "the backbone's weights",
    "std": "the backbone's weights",
    "template_version": "this dermcir's query-text template",
}


def get_profile(name: str, **overrides) -> tuple[ModelConfig, TrainConfig, int]:
    """Fresh copies of a profile's configs; ``overrides`` may set any ``ModelConfig``/``TrainConfig`` field.

    Every setting's name and value is checked here, without torch: the command line calls this before it loads the
    cases and the model, so a mistyped ``--set`` is refused at once.
    """
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    if "profile" in overrides:  # the cpu model's settings trained as the gpu profile trains would be neither profile
        raise ValueError(f"profile={overrides['profile']!r}: a profile is chosen by its name ({sorted(PROFILES)}), "
                         f"not overridden")
    derived = sorted(set(overrides) & set(DERIVED_SETTINGS))
    if derived:
        raise ValueError("; ".join(f"{k}: set by the run from {DERIVED_SETTINGS[k]}, not a setting" for k in derived))
    model_cfg, train_cfg, views = PROFILES[name]
    m_fields, t_fields = set(model_cfg.__dataclass_fields__), set(train_cfg.__dataclass_fields__)
    unknown = set(overrides) - m_fields - t_fields - {"views"}
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; model: {sorted(m_fields)}; train: {sorted(t_fields)}")
    model_cfg = replace(model_cfg, **{k: v for k, v in overrides.items() if k in m_fields})
    if model_cfg.companion is not None and "companion" not in overrides:
        model_cfg.companion = dict(model_cfg.companion)  # a copy: the profile's own dict must never change
    train_cfg = replace(train_cfg, **{k: v for k, v in overrides.items() if k in t_fields})
    _check_settings_that_act(name, model_cfg, overrides)
    _check_frozen_grids(name, model_cfg)
    _check_weight_sources(model_cfg)
    return model_cfg, train_cfg, _check_views(overrides.get("views", views))


def _check_settings_that_act(name: str, model_cfg: ModelConfig, overrides: dict) -> None:
    """Refuse settings that this run would never read: they were recorded as used while the run went on unchanged
    (a learning-rate sweep with ``--set lr=...`` on the cpu profile gave the same run every time)."""
    if name == "cpu" and "lr" in overrides:
        raise ValueError("lr: the cpu profile's backbone is frozen, and lr is the backbone's learning rate; the heads "
                         "train at head_lr (--set head_lr=...)")
    if model_cfg.companion is None:
        unread = [k for k in ("companion_weight", "companion_epochs") if k in overrides]
        if unread:
            raise ValueError(f"{', '.join(unread)}: this model has no companion (the gpu profile has one; or "
                             "--set companion=...)")


def _check_weight_sources(model_cfg: ModelConfig) -> None:
    """A pretrained part with no offline default needs its weights named (``--set backbone=swin_t`` alone)."""
    for (part, kind), (setting, what) in WEIGHTS_SETTING.items():
        if getattr(model_cfg, part) == kind and not getattr(model_cfg, setting):
            raise ValueError(f"{part}={kind} has no offline weights: add --set {setting}=... ({what})")
    # lite0 reads its weights from a file only: any value must be one (a typo failed after ~27 s of loading)
    require_local_weights(model_cfg.backbone_weights, "backbone_weights", local_only=model_cfg.backbone == "lite0")
    require_local_weights(model_cfg.text_weights, "text_weights")


def _check_frozen_grids(name: str, model_cfg: ModelConfig) -> None:
    """The grid of each model that trains on cached frozen-backbone maps (the cpu profile's, a companion's), checked
    now, before any image is read, rather than when the cache is built."""
    if name == "cpu":
        check_cached_grid(model_cfg.grid)
    if model_cfg.companion is not None:
        try:
            check_cached_grid(model_cfg.companion.get("grid", model_cfg.grid))
        except ValueError as exc:
            raise ValueError(f"companion: {exc}") from None


def _check_views(views: object) -> int:
    """The number of cached views (``--set views=N``): a whole number from 1 to the views the cache knows. Any other
    value used to be sliced silently (0: no features at all; -3: one view; 9: four)."""
    known = len(VIEWS)
    if isinstance(views, bool) or not isinstance(views, int) or not 1 <= views <= known:
        raise ValueError(f"setting views={views!r}: expected a whole number from 1 to {known} "
                         f"({', '.join(VIEWS)})")
    return views


def companion_training(main: TrainConfig) -> tuple[TrainConfig, int]:
    """How the companion of a model trained with ``main`` trains: as the cpu profile does (its heads over cached
    frozen-backbone maps), with the same seed and validation split, at most ``main.companion_epochs`` epochs.

    Always in float32 (``amp=False``): CPU workers train it so, and the same fold must give the same companion when
    it is fitted in the GPU process instead (no workers, a failed worker, ``dermcir train``)."""
    capped = {} if main.companion_epochs is None else {"epochs": main.companion_epochs}
    _, train_cfg, views = get_profile("cpu", seed=main.seed, val_fraction=main.val_fraction, amp=False, **capped)
    return train_cfg, views
