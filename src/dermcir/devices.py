"""Torch devices by name: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"xpu"``, checked against
this machine before anything is built on them (torch's own errors come later, and name neither the option nor the
choices)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: The kinds of device a model can run on here, and how to tell whether this machine has one.
_PRESENT = {
    "cpu": lambda: True,
    "cuda": torch.cuda.is_available,
    "mps": lambda: torch.backends.mps.is_available(),
    "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU; any other name must be a device this machine has.

    Raises:
        ValueError: a device name torch does not know (``"gpu"``), one no model runs on (``"meta"``), or a device
            this machine does not have (``"cuda"`` without CUDA, ``"cuda:3"`` on a one-GPU machine, ``"mps"``).
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):  # torch's message lists a dozen device types and does not say which option
        raise ValueError(f"device {str(device)!r} is not known; use auto, cpu, cuda or cuda:N") from None
    present = _PRESENT.get(resolved.type)
    if present is None:
        raise ValueError(f"device {str(device)!r}: a model cannot run on {resolved.type!r} here; use auto, cpu, cuda "
                         "or cuda:N")
    if not present():
        what = "CUDA is not available" if resolved.type == "cuda" else f"there is no {resolved.type.upper()} device"
        raise ValueError(f"device {str(device)!r}: {what} on this machine; use cpu or auto")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
        )
    return resolved


@contextmanager
def exact_float32() -> Iterator[None]:
    """Float32 as the CPU computes it, on CUDA too, for the vectors an index stores and a benchmark scores.

    torch lets cuDNN's convolutions use TF32 by default (a 10-bit mantissa) on GPUs that have it, so such vectors
    would differ slightly from those a CPU search computes (close neighbours may swap). The flags are process-wide:
    they are put back as they were on leaving.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before
