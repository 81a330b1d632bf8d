"""Name → builder registries for vision backbones and text encoders (built by name from the config, as in timm)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_BACKBONES: dict[str, Callable[..., Any]] = {}
_TEXT_ENCODERS: dict[str, Callable[..., Any]] = {}


def register_backbone(name: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        _BACKBONES[name] = fn
        return fn

    return deco


def register_text_encoder(name: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        _TEXT_ENCODERS[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def list_text_encoders() -> list[str]:
    return sorted(_TEXT_ENCODERS)


def create_backbone(name: str, weights: str | None = None, pretrained: bool = True, **kwargs: Any) -> Any:
    """Build a registered backbone. ``pretrained=False`` gives random weights (tests, or loading a checkpoint)."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered: {list_backbones()}")
    return _BACKBONES[name](weights=weights, pretrained=pretrained, **kwargs)


def create_text_encoder(name: str, weights: str | None = None, pretrained: bool = True, **kwargs: Any) -> Any:
    """Build a registered text encoder. ``pretrained=False`` gives random weights of the same architecture."""
    if name not in _TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; registered: {list_text_encoders()}")
    return _TEXT_ENCODERS[name](weights=weights, pretrained=pretrained, **kwargs)
