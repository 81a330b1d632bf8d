"""Training: profiles, feature sources, the loop, and ``train_on_cases`` (cases → checkpoint)."""

from __future__ import annotations

from dermcir._lazy import lazy_exports

# The public names, by the module that defines them. They load on first use (PEP 562) instead of here, because the
# loop and the feature sources import torch (seconds): so ``dermcir.training.profiles`` can be imported alone, and
# the command line checks ``--profile`` and ``--set`` before torch loads.
_MODULES = {
    "dermcir.training.pipeline": ("default_device", "frozen_parts", "prepare_inputs", "train_on_cases"),
    "dermcir.training.profiles": ("PROFILES", "get_profile"),
    "dermcir.training.trainer": ("FitResult", "Inputs", "fit"),
}

__all__ = [  # the same names, written out for tools that read them without running this module
    "PROFILES", "FitResult", "Inputs", "default_device", "fit", "frozen_parts", "get_profile", "prepare_inputs",
    "train_on_cases",
]

_DEFINED_IN, __getattr__, __dir__ = lazy_exports(__name__, globals(), _MODULES)
