"""The seed paper's comparison methods, re-run on the same folds, images and metrics as the composed model.

Each method is a registered :class:`Baseline` built by name with ``cpu`` or ``gpu`` profile settings:

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

from dermcir.baselines import dahnet as _dahnet  # noqa: F401  (registers the method)
from dermcir.baselines import maskrcnn_fusion as _maskrcnn_fusion  # noqa: F401
from dermcir.baselines import resnet_cossim as _resnet_cossim  # noqa: F401
from dermcir.baselines import snf_dca as _snf_dca  # noqa: F401
from dermcir.baselines._base import (
    IMAGE_ONLY_DATABASE,
    METADATA_BOTH_SIDES,
    PROFILES,
    Baseline,
    BaselineConfig,
    BaselineData,
    create_baseline,
    list_baselines,
    register_baseline,
)
from dermcir.baselines._runner import run_baseline_cv

__all__ = [
    "IMAGE_ONLY_DATABASE", "METADATA_BOTH_SIDES", "PROFILES", "Baseline", "BaselineConfig", "BaselineData",
    "create_baseline", "list_baselines", "register_baseline", "run_baseline_cv",
]
