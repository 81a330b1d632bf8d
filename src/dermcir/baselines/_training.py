"""One small training loop for the trained baselines, fed either cached frozen maps (CPU) or images (GPU)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dermcir.baselines._features import N_SYMMETRIES, dihedral
from dermcir.baselines._nets import SplitBackbone

log = logging.getLogger(__name__)

Outputs = dict[str, torch.Tensor]
LossFn = Callable[[Outputs, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation of one fold's network."""

    epochs: int
    batch_size: int
    lr: float  # Adam learning rate of the head, which owns the backbone's last stage (its tail) on both profiles
    backbone_lr: float  # learning rate of the other backbone stages when they are trained (GPU profile)
    weight_decay: float
    amp: bool  # bf16 autocast on CUDA


class MapInputs:
    """Cached ``(mid, top)`` maps of every case under several symmetries; training picks one view per sample."""

    def __init__(self, maps: dict[str, np.ndarray], device: torch.device) -> None:
        self.top = torch.from_numpy(maps["top"])
        self.mid = torch.from_numpy(maps["mid"]) if "mid" in maps else None
        self.device = device

    @property
    def n_views(self) -> int:
        return self.top.shape[0]

    def get(self, idx: torch.Tensor, train: bool, gen: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor]:
        if train:
            views = torch.randint(self.n_views, (len(idx),), generator=gen)
        else:
            views = torch.zeros(len(idx), dtype=torch.long)
        top = self.top[views, idx].to(self.device, torch.float32)
        mid = self.mid[views, idx].to(self.device, torch.float32) if self.mid is not None else None
        return mid, top


class ImageInputs:
    """uint8 images kept on the device; training applies a random symmetry to every sample."""

    def __init__(self, images: np.ndarray, backbone: SplitBackbone, device: torch.device) -> None:
        self.images = torch.from_numpy(images).to(device)
        self.backbone = backbone

    def get(self, idx: torch.Tensor, train: bool, gen: torch.Generator) -> torch.Tensor:
        batch = self.images[idx.to(self.images.device)]
        if train:
            # All eight symmetries of the batch, then one per sample by indexing: no data-dependent host sync.
            views = torch.randint(N_SYMMETRIES, (len(idx),), generator=gen).to(batch.device)
            every = torch.stack([dihedral(batch, view) for view in range(N_SYMMETRIES)])
            batch = every[views, torch.arange(len(idx), device=batch.device)]
        return self.backbone.normalize(batch)


Inputs = MapInputs | ImageInputs


class Net(nn.Module):
    """A baseline's head on top of the backbone stages (trained) or of cached maps (frozen stages)."""

    def __init__(self, head: nn.Module, backbone: SplitBackbone | None) -> None:
        super().__init__()
        self.head = head
        self.backbone = backbone

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]) -> Outputs:
        if self.backbone is not None:
            mid, top = self.backbone.maps(inputs)  # type: ignore[arg-type]
        else:
            mid, top = inputs  # type: ignore[misc]
        return self.head(mid, top)


def _param_groups(net: Net, settings: TrainSettings) -> list[dict]:
    head_ids = {id(p) for p in net.head.parameters()}
    rest = [p for p in net.parameters() if id(p) not in head_ids]
    groups = [{"params": list(net.head.parameters()), "lr": settings.lr}]
    if rest:
        groups.append({"params": rest, "lr": settings.backbone_lr})
    return groups


def train_net(
    net: Net, inputs: Inputs, labels: np.ndarray, train_idx: np.ndarray, loss_fn: LossFn, settings: TrainSettings,
    device: torch.device, seed: int,
) -> list[float]:
    """Train ``net`` on the ``train_idx`` cases for a fixed number of epochs; returns the mean loss of each epoch.

    Args:
        net: the network (moved to ``device``).
        inputs: where batches come from.
        labels: ``(N,)`` integer labels of all cases (only ``train_idx`` rows are read).
        train_idx: the training (database) cases.
        loss_fn: ``(outputs, labels) -> scalar``.
        settings: epochs, batch size, learning rates.
        device: where to train.
        seed: seeds the shuffling, the views and the initialisation-independent randomness.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net.to(device).train()
    opt = torch.optim.Adam(_param_groups(net, settings), weight_decay=settings.weight_decay)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    idx_all = torch.as_tensor(train_idx, dtype=torch.long)
    use_amp = settings.amp and device.type == "cuda"
    history = []
    for epoch in range(settings.epochs):
        order = idx_all[torch.randperm(len(idx_all), generator=gen)]
        total, seen = torch.zeros((), device=device), 0
        for start in range(0, len(order), settings.batch_size):
            idx = order[start:start + settings.batch_size]
            if len(idx) < 2:  # batch norm cannot train on a single sample
                continue
            y = y_all[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(net(inputs.get(idx, True, gen)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)  # stays on the device: no host sync per step
            seen += len(idx)
        history.append(float(total) / max(seen, 1))
        log.debug("epoch %d/%d: loss %.4f", epoch + 1, settings.epochs, history[-1])
    log.info("trained %d epochs on %d cases: loss %.4f -> %.4f", settings.epochs, len(train_idx),
             history[0] if history else float("nan"), history[-1] if history else float("nan"))
    return history


@torch.inference_mode()
def infer(net: Net, inputs: Inputs, idx: np.ndarray, batch_size: int, device: torch.device) -> dict[str, np.ndarray]:
    """The head's outputs for the cases ``idx`` (view 0, eval mode), as float32 arrays."""
    net.to(device).eval()
    gen = torch.Generator()
    out: dict[str, list[np.ndarray]] = {}
    order = torch.as_tensor(idx, dtype=torch.long)
    for start in range(0, len(order), batch_size):
        for key, value in net(inputs.get(order[start:start + batch_size], False, gen)).items():
            out.setdefault(key, []).append(value.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}
