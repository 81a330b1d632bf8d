"""The training loop: Adam, early stopping on validation mAP, seeded, with a progress bar and a per-run log."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dermcir.config import TrainConfig
from dermcir.losses import CategoryContrastiveLoss
from dermcir.metrics import mean_average_precision
from dermcir.models import ComposedRetrievalModel, Descriptors
from dermcir.models.fusion import HeadSet
from dermcir.similarity import query_vector, target_vector

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Inputs:
    """What the loop reads: a feature source (cached maps or device images), frozen text tokens, category ids."""

    source: object  # CachedFeatures | DeviceImages: .batch(idx, train, device) -> list of maps
    tokens: torch.Tensor  # (N, T, E) frozen text-encoder outputs
    pad: torch.Tensor  # (N, T) True = padding
    labels: torch.Tensor  # (N,) category ids

    def text(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.pad[idx]
        width = int((~pad).sum(dim=1).max())  # trim shared padding: shorter attention
        return self.tokens[idx, :width].to(device), pad[:, :width].to(device)


@dataclass
class FitResult:
    best_epoch: int
    best_val_map: float
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)


@torch.no_grad()
def describe_all(
    model: ComposedRetrievalModel, inputs: Inputs, idx: np.ndarray, device: torch.device, batch_size: int = 128,
    amp: bool = False, kinds: tuple[str, ...] = ("target", "composed", "text"),
) -> dict[str, Descriptors]:
    """Target, composed-query and/or text-only-query descriptors of the given cases (masks dropped to save memory)."""
    out: dict[str, list[Descriptors]] = {k: [] for k in kinds}
    model.eval()
    for s in range(0, len(idx), batch_size):
        b = torch.as_tensor(idx[s : s + batch_size])
        with _autocast(device, amp):
            maps = inputs.source.batch(b, False, device) if {"target", "composed"} & set(kinds) else None
            tok, pad = inputs.text(b, device)
            if "target" in kinds:
                out["target"].append(model.describe_target(maps))
            if "composed" in kinds:
                out["composed"].append(model.describe_query(maps, tok, pad))
            if "text" in kinds:
                out["text"].append(model.describe_query(None, tok, pad))
    return {k: _concat(v) for k, v in out.items()}


def _concat(ds: list[Descriptors]) -> Descriptors:
    n = len(ds[0].locals)
    return Descriptors(
        [torch.cat([d.locals[i].float() for d in ds]) for i in range(n)],
        [torch.cat([d.globals[i].float() for d in ds]) for i in range(n)],
        [],
    )


def query_embeddings(desc: Descriptors, beta: float) -> torch.Tensor:
    return query_vector(desc.locals, desc.globals, beta)


def target_embeddings(desc: Descriptors) -> torch.Tensor:
    return target_vector(desc.locals, desc.globals)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def fit(
    model: ComposedRetrievalModel, inputs: Inputs, train_idx: np.ndarray, val_idx: np.ndarray, cfg: TrainConfig,
    device: torch.device, n_categories: int, progress: bool = True, refit_idx: np.ndarray | None = None,
) -> FitResult:
    """Train in place and leave the best-validation weights loaded.

    With ``refit_idx`` (the whole database) and ``cfg.refit_epochs > 0``, the selected weights then train that many
    more epochs on ``refit_idx``, so the validation cases' database embeddings are fitted too.

    Every step trains all three query modes of the seed's Fig. 1 on the same batch: composed (image + text),
    text-only and image-only (whose query descriptor is the target's own), so one checkpoint serves every mode.
    """
    from tqdm.auto import tqdm

    seed_everything(cfg.seed)
    model.to(device)
    train_backbone = cfg.profile == "gpu"
    for p in model.text_encoder.parameters():
        p.requires_grad_(False)
    for p in model.backbone.parameters():
        p.requires_grad_(train_backbone)
    # One loss (with its own category proxies) per head set: the members of an ensemble train independently on the
    # same batches and meet only in the averaged descriptors that validation and search use.
    loss_fns = nn.ModuleList(
        CategoryContrastiveLoss(n_categories, 6, model.config.dim, model.config.beta, cfg.temperature, cfg.proxy_weight)
        for _ in model.heads
    ).to(device)
    heads = [p for n, p in model.named_parameters() if not n.startswith(("backbone.", "text_encoder."))]
    groups = [{"params": heads + list(loss_fns.parameters()), "lr": cfg.head_lr}]
    if train_backbone:
        groups.append({"params": list(model.backbone.parameters()), "lr": cfg.lr})
    optim = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / cfg.batch_size))
    # Constant learning rate (the seed's Adam schedule) after a one-epoch linear warm-up of the new heads.
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: min(1.0, (step + 1) / steps_per_epoch))
    gen = torch.Generator().manual_seed(cfg.seed)
    labels = inputs.labels
    best = (-1.0, -1, None)
    history: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc="train", disable=not progress, leave=False)
    def run_epoch(indices: np.ndarray) -> torch.Tensor:
        model.train()
        model.text_encoder.eval()
        if not train_backbone:
            model.backbone.eval()
        perm = torch.as_tensor(indices)[torch.randperm(len(indices), generator=gen)]
        total = torch.zeros((), device=device)  # accumulated on device: no host sync per step
        for s in range(0, len(perm), cfg.batch_size):
            b = perm[s : s + cfg.batch_size]
            if len(b) < 2:
                continue
            y = labels[b].to(device)
            with _autocast(device, cfg.amp):
                maps = inputs.source.batch(b, True, device)
                tok, pad = inputs.text(b, device)
                loss = sum(_member_loss(head, loss_fn, maps, tok, pad, y, model.config.beta)
                           for head, loss_fn in zip(model.heads, loss_fns, strict=True))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            total += loss.detach()
        return total

    for epoch in bar:
        total = run_epoch(train_idx)
        val_map = validation_map(model, inputs, train_idx, val_idx, device, cfg.amp)
        row = {"epoch": epoch + 1, "loss": float(total) / steps_per_epoch, "val_mAP": val_map}
        history.append(row)
        log.info("epoch %d loss %.4f val mAP %.2f", row["epoch"], row["loss"], val_map)
        bar.set_postfix(loss=f"{row['loss']:.3f}", val_mAP=f"{val_map:.1f}")
        if val_map > best[0]:
            best = (val_map, epoch + 1, _trainable_state(model))
        elif epoch + 1 - best[1] >= cfg.patience:
            log.info("early stop at epoch %d (best %d, val mAP %.2f)", epoch + 1, best[1], best[0])
            break
    bar.close()
    if best[2] is not None:
        model.load_state_dict(best[2], strict=False)
    if refit_idx is not None and cfg.refit_epochs > 0:
        for _ in range(cfg.refit_epochs):
            run_epoch(refit_idx)
        log.info("refit %d epochs on all %d database cases", cfg.refit_epochs, len(refit_idx))
    model.eval()
    return FitResult(best[1], best[0], len(history), time.perf_counter() - start, history)


def _member_loss(head: HeadSet, loss_fn: CategoryContrastiveLoss, maps: list[torch.Tensor], tok: torch.Tensor,
                 pad: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """One head set's loss on a batch, for all three query modes (described in one pass)."""
    target_desc, composed_desc, text_desc = head.describe_training_modes(maps, head.text_states(tok, pad), pad)
    target = target_vector(target_desc.locals, target_desc.globals)
    composed = query_vector(composed_desc.locals, composed_desc.globals, beta)
    text_only = query_vector(text_desc.locals, text_desc.globals, beta)
    image_only = query_vector(target_desc.locals, target_desc.globals, beta)
    loss = loss_fn(composed, target, y)["total"]
    return loss + 0.5 * (loss_fn(text_only, target, y)["total"] + loss_fn(image_only, target, y)["total"])


def validation_map(
    model: ComposedRetrievalModel, inputs: Inputs, db_idx: np.ndarray, query_idx: np.ndarray, device: torch.device,
    amp: bool = False,
) -> float:
    """mAP (percent) of composed queries from ``query_idx`` against targets ``db_idx`` (never the test fold)."""
    if len(query_idx) == 0:
        return float("nan")
    db = describe_all(model, inputs, db_idx, device, amp=amp, kinds=("target",))["target"]
    q = describe_all(model, inputs, query_idx, device, amp=amp, kinds=("composed",))["composed"]
    scores = (query_embeddings(q, model.config.beta) @ target_embeddings(db).T).cpu().numpy()
    y = inputs.labels.numpy()
    return 100.0 * mean_average_precision(scores, y[query_idx], y[db_idx])


def _trainable_state(model: ComposedRetrievalModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("text_encoder.")}


__all__ = ["FitResult", "Inputs", "describe_all", "fit", "query_embeddings", "seed_everything", "target_embeddings"]
