"""Training: profiles, feature sources, the loop, and ``train_on_cases`` (cases → checkpoint)."""

from dermcir.training.pipeline import default_device, frozen_parts, prepare_inputs, train_on_cases
from dermcir.training.profiles import PROFILES, get_profile
from dermcir.training.trainer import FitResult, Inputs, fit

__all__ = [
    "PROFILES", "FitResult", "Inputs", "default_device", "fit", "frozen_parts", "get_profile", "prepare_inputs",
    "train_on_cases",
]
