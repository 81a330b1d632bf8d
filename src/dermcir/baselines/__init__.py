"""The seed paper's comparison methods, re-run on the same folds, images and metrics as the composed model.

Each method is a registered :class:`Baseline` built by name with ``cpu`` or ``gpu`` profile settings (all of them
in :mod:`dermcir.baselines.configs`, which needs no torch):

- ``resnet50-cossim``: ResNet50-CosSim (Tschandl et al. 2019) — :mod:`dermcir.baselines.resnet_cossim`
- ``snf-dca``: SNF-DCA (Wang et al. 2022) — :mod:`dermcir.baselines.snf_dca`
- ``maskrcnn-fusion``: MaskRCNN-Fusion (Iqbal et al. 2023) — :mod:`dermcir.baselines.maskrcnn_fusion`
- ``dahnet``: DAHNET (Jiang et al. 2024) — :mod:`dermcir.baselines.dahnet`

Example:
    >>> from pathlib import Path
    >>> from dermcir.data import load_derm7pt
    >>> cases, _ = load_derm7pt("../shared/derm7pt/release_v0")  # doctest: +SKIP
    >>> doc = run_baseline_cv("maskrcnn-fusion", cases, Path("runs/baselines/maskrcnn-fusion"))  # doctest: +SKIP
    >>> round(doc["mean"]["mAP"], 1)  # doctest: +SKIP
"""

from __future__ import annotations

from dermcir._lazy import lazy_exports

# The public names, by the module that defines them. They load on first use (PEP 562) instead of here, because the
# methods import torch (seconds): so the command line can check a baseline's settings (``configs``) before torch
# loads. A method's module is imported, which registers it, when it is first built (``create_baseline``).
_MODULES = {
    "dermcir.baselines.configs": ("BASELINE_NAMES", "PROFILES", "BaselineConfig", "baseline_config"),
    "dermcir.baselines._base": (
        "IMAGE_ONLY_DATABASE", "METADATA_BOTH_SIDES", "Baseline", "BaselineData", "create_baseline", "list_baselines",
        "register_baseline",
    ),
    "dermcir.baselines._runner": ("run_baseline_cv",),
}

__all__ = [  # the same names, written out for tools that read them without running this module
    "BASELINE_NAMES", "IMAGE_ONLY_DATABASE", "METADATA_BOTH_SIDES", "PROFILES", "Baseline", "BaselineConfig",
    "BaselineData", "baseline_config", "create_baseline", "list_baselines", "register_baseline", "run_baseline_cv",
]

_DEFINED_IN, __getattr__, __dir__ = lazy_exports(__name__, globals(), _MODULES)
