"""Argument types that refuse impossible numbers while parsing, before any data or model is loaded.

Left to the library, a ``--folds 1`` or a ``--max-upload-mb nan`` failed only after minutes of preprocessing or
model loading, and sometimes in the words of the library underneath (scikit-learn's ``n_splits``) rather than the
option's own.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

from dermcir.cli._waits import wait_passively


def whole(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A whole number ≥ ``minimum`` (and ≤ ``maximum``, when given)."""
    expected = f"a whole number ≥ {minimum}" if maximum is None else f"a whole number from {minimum} to {maximum:,}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = expected.removeprefix("a ")  # argparse names the type in its own messages
    return parse


def positive(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a CUDA device must exist on this machine.

    Checked while parsing: left to torch, a typo (``gpu``) or a machine without CUDA gave a traceback, and only after
    the index or the cases had been loaded.
    """
    name = text.strip().lower()
    if not _DEVICE.match(name):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if name.startswith("cuda"):
        # torch is imported here, before the handler's _apply_threads: the same setting must be in place first
        wait_passively()
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine; use cpu or auto")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
            )
    return name
