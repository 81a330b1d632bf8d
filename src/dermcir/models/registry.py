"""Name → builder registries for vision backbones and text encoders (built by name from the config, as in timm)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dermcir._lazy import registered

_BACKBONES: dict[str, Callable[..., Any]] = {}
_TEXT_ENCODERS: dict[str, Callable[..., Any]] = {}

# The built-in builders, by name, with the module whose import registers each. Listed here so that a config's names
# are checked without importing those modules (they import torch, timm and transformers: seconds); the first build of
# a name imports its module. A test checks that the modules register exactly these names.
BUILTIN_BACKBONES = {"lite0": "dermcir.models.backbones", "swin_t": "dermcir.models.backbones"}
BUILTIN_TEXT_ENCODERS = {"minilm": "dermcir.models.text_encoders", "bert": "dermcir.models.text_encoders"}

# The built-in builders with no offline default weights, and the setting that names theirs: training refuses them
# without it before reading an image, rather than when the model is built after preprocessing (the builders refuse
# it too, for a model built some other way).
WEIGHTS_SETTING = {
    ("backbone", "swin_t"): ("backbone_weights", "a local checkpoint (.safetensors or .pth) or 'hub' when online"),
    ("text_encoder", "bert"): ("text_weights", "a local Hugging Face folder, or a hub name when online"),
}


#: Endings of weight files: a value with one names a file, never a hub model
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def require_local_weights(value: str | None, setting: str, local_only: bool = False) -> None:
    """Refuse a weights value that is written as a path (absolute, ``./``, ``../``, ``~`` or a weight file's
    ending), or any value when ``local_only`` (a builder with no hub to ask, such as ``lite0``), that names nothing
    on this machine. Such a value used to be taken for a hub name, failing after the model had loaded (13-22 s) with
    the hub library's "Repo id must be in the form ..." (or, online, after a 69 s attempt to download it). A name
    that could be either (``bert-base-uncased``, ``org/model``) is left to the builder: a local folder when there is
    one, a hub name otherwise. ``~`` is not expanded (the builders do not expand it either).

    Raises:
        FileNotFoundError: naming the setting and the path.
    """
    if not value or (value == "hub" and not local_only):
        return
    written_as_path = (local_only or Path(value).is_absolute() or value.startswith(("./", "../", "~", ".\\", "..\\"))
                       or value.lower().endswith(_WEIGHT_FILE_SUFFIXES))
    if written_as_path and not Path(value).exists():
        raise FileNotFoundError(f"{setting}={value}: no such file or folder on this machine (moved, or mistyped?)")


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
    return sorted({*_BACKBONES, *BUILTIN_BACKBONES})


def list_text_encoders() -> list[str]:
    return sorted({*_TEXT_ENCODERS, *BUILTIN_TEXT_ENCODERS})


def create_backbone(name: str, weights: str | None = None, pretrained: bool = True, **kwargs: Any) -> Any:
    """Build a registered backbone. ``pretrained=False`` gives random weights (tests, or loading a checkpoint)."""
    build = registered(name, _BACKBONES, BUILTIN_BACKBONES)
    if build is None:
        raise ValueError(f"unknown backbone {name!r}; registered: {list_backbones()}")
    return build(weights=weights, pretrained=pretrained, **kwargs)


def create_text_encoder(name: str, weights: str | None = None, pretrained: bool = True, **kwargs: Any) -> Any:
    """Build a registered text encoder. ``pretrained=False`` gives random weights of the same architecture."""
    build = registered(name, _TEXT_ENCODERS, BUILTIN_TEXT_ENCODERS)
    if build is None:
        raise ValueError(f"unknown text encoder {name!r}; registered: {list_text_encoders()}")
    return build(weights=weights, pretrained=pretrained, **kwargs)
