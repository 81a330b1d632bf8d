"""Argument types that refuse impossible numbers while parsing, before any data or model is loaded.

Left to the library, a ``--folds 1`` or a ``--max-upload-mb nan`` failed only after minutes of preprocessing or
model loading, and sometimes in the words of the library underneath (scikit-learn's ``n_splits``) rather than the
option's own.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole(minimum: int) -> Callable[[str], int]:
    """A whole number ≥ ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number ≥ {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number ≥ {minimum}, got {value}")
        return value

    parse.__name__ = f"whole number ≥ {minimum}"  # argparse names the type in its own messages
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
