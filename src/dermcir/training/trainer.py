"""The training loop: Adam, early stopping on validation mAP, seeded, with a progress bar and a per-run log."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from dermcir.config import SELECTION, TrainConfig
from dermcir.losses import CategoryContrastiveLoss
from dermcir.metrics import retrieval_metrics
from dermcir.models import ComposedRetrievalModel, Descriptors
from dermcir.models.fusion import HeadSet
from dermcir.models.retrieval import N_LEVELS
from dermcir.similarity import query_vector, target_vector

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Inputs:
    """What the loop reads: a feature source (cached maps or device images), frozen text tokens, category ids.

    ``tokens``, ``pad`` and ``labels`` live on the training device (see :meth:`on`), so a step gathers its batch with
    an index already on that device and never waits for the GPU; ``lengths`` stays on the host, where the batch's
    text width is read without a sync.
    """

    source: object  # CachedFeatures | DeviceImages: .device and .batch(idx on .device, train, device) -> maps
    tokens: torch.Tensor  # (N, T, E) frozen text-encoder outputs
    pad: torch.Tensor  # (N, T) True = padding
    labels: torch.Tensor  # (N,) category ids
    lengths: torch.Tensor = field(init=False)  # (N,) real tokens per text, on the host

    def __post_init__(self) -> None:
        self.lengths = (~self.pad).sum(dim=1).cpu()

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def on(self, device: torch.device) -> Inputs:
        """The same inputs with the text tokens, masks and labels on ``device`` (the source stays where it is)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return Inputs(self.source, self.tokens.to(device), self.pad.to(device), self.labels.to(device))

    def take(self, idx: torch.Tensor, idx_here: torch.Tensor, train: bool, device: torch.device, maps: bool = True):
        """``(maps or None, tokens, pad, labels)`` of one batch.

        ``idx`` is the batch's case index on the host, ``idx_here`` the same index on :attr:`device`.
        """
        width = int(self.lengths[idx].max())  # trim shared padding (host-side: no sync)
        src_idx = idx_here if self.source.device == idx_here.device else idx
        feats = self.source.batch(src_idx, train, device) if maps else None
        tok = self.tokens[idx_here, :width].to(device)
        return feats, tok, self.pad[idx_here, :width].to(device), self.labels[idx_here].to(device)


@dataclass
class FitResult:
    best_epoch: int
    best_val_map: float
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    stopped_by: str = "epochs"  # "epochs" (ran them all), "patience" (early stopping) or "time budget"


@torch.no_grad()
def describe_all(
    model: ComposedRetrievalModel, inputs: Inputs, idx: np.ndarray, device: torch.device, batch_size: int = 128,
    amp: bool = False, kinds: tuple[str, ...] = ("target", "composed", "text"), full_batches: bool = False,
) -> dict[str, Descriptors]:
    """Target, composed-query and/or text-only-query descriptors of the given cases (masks dropped to save memory).

    ``full_batches`` pads the last batch (with repeats of the first cases, whose extra rows are dropped) so that
    every batch has the same shape.
    """
    out: dict[str, list[Descriptors]] = {k: [] for k in kinds}
    model.eval()
    idx = torch.as_tensor(np.asarray(idx))
    n = len(idx)
    if full_batches:
        idx = _top_up(idx, batch_size)
    idx_here = idx.to(inputs.device)  # one transfer; the batch slices below need none
    for s in range(0, len(idx), batch_size):
        with _autocast(device, amp):
            maps, tok, pad, _ = inputs.take(idx[s : s + batch_size], idx_here[s : s + batch_size], False, device,
                                            maps=bool({"target", "composed"} & set(kinds)))
            if "target" in kinds:
                out["target"].append(model.describe_target(maps))
            if "composed" in kinds:
                out["composed"].append(model.describe_query(maps, tok, pad))
            if "text" in kinds:
                out["text"].append(model.describe_query(None, tok, pad))
    return {k: _concat(v, n) for k, v in out.items()}


def _concat(ds: list[Descriptors], rows: int) -> Descriptors:
    levels = len(ds[0].locals)
    return Descriptors(
        [torch.cat([d.locals[i].float() for d in ds])[:rows] for i in range(levels)],
        [torch.cat([d.globals[i].float() for d in ds])[:rows] for i in range(levels)],
        [],
    )


def full_batch_order(perm: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``perm`` topped up to a multiple of ``batch_size`` with its own first cases.

    With at least two batches the top-up comes from the first batch, so no case appears twice in one batch.
    """
    return perm if len(perm) < batch_size else _top_up(perm, batch_size)


def _top_up(idx: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``idx`` followed by its own first entries (cycled) up to a multiple of ``batch_size``."""
    short = -len(idx) % batch_size
    return torch.cat([idx, idx[torch.arange(short) % len(idx)]]) if short else idx


def query_embeddings(desc: Descriptors, beta: float) -> torch.Tensor:
    return query_vector(desc.locals, desc.globals, beta)


def target_embeddings(desc: Descriptors) -> torch.Tensor:
    return target_vector(desc.locals, desc.globals)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class _BestEpoch(NamedTuple):
    """The epoch early stopping keeps, with the whole training state the refit goes on from."""

    score: float  # the selection score (``select_by``)
    epoch: int
    weights: dict[str, torch.Tensor] | None
    val_map: float
    losses: dict[str, torch.Tensor] | None  # the losses' category proxies
    optimizer: dict[str, Any] | None  # Adam's state


def fit(
    model: ComposedRetrievalModel, inputs: Inputs, train_idx: np.ndarray, val_idx: np.ndarray, cfg: TrainConfig,
    device: torch.device, n_categories: int, progress: bool = True, refit_idx: np.ndarray | None = None,
    deadline: float | None = None,
) -> FitResult:
    """Train in place and leave the best-validation weights loaded.

    With ``refit_idx`` (the whole database) and ``cfg.refit_epochs > 0``, the selected weights then train that many
    more epochs on ``refit_idx``, so the validation cases' database embeddings are fitted too.

    ``deadline`` (a ``time.perf_counter()`` value) stops the epoch loop early, like early stopping, when another
    epoch and the refit would not end before it (after two epochs at least); ``stopped_by`` then says "time budget".
    It lets a run fit a fixed device lease without guessing the epoch count in advance.

    Every step trains all three query modes of the seed's Fig. 1 on the same batch: composed (image + text),
    text-only and image-only (whose query descriptor is the target's own), so one checkpoint serves every mode.
    """
    from tqdm.auto import tqdm

    _check_validation(inputs, train_idx, val_idx)
    seed_everything(cfg.seed)
    model.to(device)
    train_backbone = cfg.profile == "gpu"
    for p in model.text_encoder.parameters():
        p.requires_grad_(False)
    for p in model.backbone.parameters():
        p.requires_grad_(train_backbone)
    # One loss (with its own category proxies) per head set: the members of an ensemble train independently on the
    # same batches and meet only in the averaged descriptors that validation and search use.
    loss_fns = nn.ModuleList(_new_loss(model, cfg, n_categories) for _ in model.heads).to(device)
    # a companion is fitted on its own (``fit(model.companion, ...)``), never as part of its main model
    heads = [p for n, p in model.named_parameters() if not n.startswith(("backbone.", "text_encoder.", "companion."))]
    groups = [{"params": heads + list(loss_fns.parameters()), "lr": cfg.head_lr}]
    if train_backbone:
        groups.append({"params": list(model.backbone.parameters()), "lr": cfg.lr})
    optim = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / cfg.batch_size))
    # Constant learning rate (the seed's Adam schedule) after a one-epoch linear warm-up of the new heads.
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: min(1.0, (step + 1) / steps_per_epoch))
    gen = torch.Generator().manual_seed(cfg.seed)
    select = selection_keys(cfg.select_by)  # an unknown setting fails here, before any training
    best = _BestEpoch(-1.0, -1, None, float("nan"), None, None)
    history: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc="train", disable=not progress, leave=False)
    def run_epoch(indices: np.ndarray) -> tuple[torch.Tensor, int]:
        """One pass; the summed loss (on the device: no host sync per step) and the number of steps taken."""
        _training_mode(model, train_backbone)
        perm = torch.as_tensor(indices)[torch.randperm(len(indices), generator=gen)]
        if cfg.full_batches:
            perm = full_batch_order(perm, cfg.batch_size)
        perm_here = perm.to(inputs.device)  # one transfer per epoch; the batch slices below need none
        total = torch.zeros((), device=device)  # accumulated on device: no host sync per step
        steps = 0
        for s in range(0, len(perm), cfg.batch_size):
            b = perm[s : s + cfg.batch_size]
            if len(b) < 2:  # the loss compares cases within a batch; a lone last case is no step (nor in the mean)
                continue
            with _autocast(device, cfg.amp):
                maps, tok, pad, y = inputs.take(b, perm_here[s : s + cfg.batch_size], True, device)
                loss = sum(_member_loss(head, loss_fn, maps, tok, pad, y, model.config.beta)
                           for head, loss_fn in zip(model.heads, loss_fns, strict=True))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            total += loss.detach()
            steps += 1
        return total, steps

    stopped_by = "epochs"
    refit_share = cfg.refit_epochs * len(refit_idx) / max(1, len(train_idx)) if refit_idx is not None else 0.0
    for epoch in bar:
        t0 = time.perf_counter()
        total, steps = run_epoch(train_idx)
        loss = float(total) / max(1, steps)  # the epoch's one host sync
        if not math.isfinite(loss):  # else the metrics' "scores contain NaN" would be all that is said
            raise ValueError(
                f"training diverged in epoch {epoch + 1} (mean loss {loss}); lower head_lr (now {cfg.head_lr:g}) "
                f"or lr (now {cfg.lr:g}), or raise temperature (now {cfg.temperature:g}), with --set KEY=VALUE"
            )
        t1 = time.perf_counter()
        val = validation_metrics(model, inputs, train_idx, val_idx, device, cfg.amp, cfg.full_batches)
        val_map = val["mAP"]
        t2 = time.perf_counter()
        # Acc@K is recorded beside mAP (cfg.select_by says which picks the epoch): whether the top results stay mixed
        # when a query is uncertain shows in Acc@4 - Acc@1, which mAP does not see.
        row = {"epoch": epoch + 1, "loss": loss, **{f"val_{k}": v for k, v in val.items()},
               "train_s": t1 - t0, "val_s": t2 - t1}
        history.append(row)
        log.info("epoch %d loss %.4f val mAP %.2f Acc@1 %.1f Acc@4 %.1f (train %.2f s, validation %.2f s)",
                 row["epoch"], loss, val_map, val.get("Acc@1", float("nan")), val.get("Acc@4", float("nan")),
                 t1 - t0, t2 - t1)
        bar.set_postfix(loss=f"{loss:.3f}", val_mAP=f"{val_map:.1f}")
        score = float(np.mean([val.get(k, float("nan")) for k in select]))  # NaN without validation queries
        if score > best.score:
            best = _BestEpoch(score, epoch + 1, trainable_state(model, train_backbone), val_map,
                              {k: v.detach().clone() for k, v in loss_fns.state_dict().items()},
                              copy.deepcopy(optim.state_dict()))
        elif epoch + 1 - best.epoch >= cfg.patience:
            stopped_by = "patience"
            log.info("early stop at epoch %d (best %d, val mAP %.2f)", epoch + 1, best.epoch, best.val_map)
            break
        # The first epoch carries one-off costs (kernel selection, allocator warm-up): later ones estimate better.
        steady = history[1:] or history
        epoch_s = float(np.median([h["train_s"] + h["val_s"] for h in steady]))
        train_s = float(np.median([h["train_s"] for h in steady]))
        if (deadline is not None and 2 <= epoch + 1 < cfg.epochs
                and t2 + epoch_s + refit_share * train_s > deadline):
            stopped_by = "time budget"
            log.info("time budget: stop at epoch %d (best %d, val mAP %.2f)", epoch + 1, best.epoch, best.val_map)
            break
    bar.close()
    if best.weights is not None:
        model.load_state_dict(best.weights, strict=False)
        # the refit goes on from the best epoch's whole training state: with the heads, the category proxies they
        # were trained against and Adam's moments, not those of the up to ``patience`` epochs after it
        loss_fns.load_state_dict(best.losses)
        optim.load_state_dict(best.optimizer)
    if refit_idx is not None and cfg.refit_epochs > 0:
        for _ in range(cfg.refit_epochs):
            run_epoch(refit_idx)
        log.info("refit %d epochs on all %d database cases", cfg.refit_epochs, len(refit_idx))
    model.eval()
    return FitResult(best.epoch, best.val_map, len(history), time.perf_counter() - start, history, stopped_by)


def _check_validation(inputs: Inputs, train_idx: np.ndarray, val_idx: np.ndarray) -> None:
    """Early stopping needs a validation figure: validation cases, and one at least whose category the training
    cases have (otherwise mAP is NaN every epoch, no epoch is ever kept and patience ends the run unnoticed)."""
    if len(val_idx) == 0:
        raise ValueError("no validation cases: early stopping picks the epoch on a validation split "
                         "(TrainConfig.val_fraction)")
    labels = inputs.labels.cpu().numpy()
    if not np.isin(labels[np.asarray(val_idx)], labels[np.asarray(train_idx)]).any():
        raise ValueError(f"none of the {len(val_idx)} validation cases has a category the {len(train_idx)} training "
                         f"cases have, so no validation figure can be computed")


def warm_up(model: ComposedRetrievalModel, inputs: Inputs, cfg: TrainConfig, device: torch.device,
            n_categories: int) -> float:
    """One training step's forward and backward and one evaluation batch (two on CUDA with ``cfg.amp``: validation's
    bf16 and the final evaluation's float32), with nothing kept; returns the seconds.

    On the GPU the first use of each batch shape pays one-off kernel preparation (tens of seconds for the fine-tuned
    backbone at 512 px). Paying it before the first fold keeps every fold's timing, and its share of a time budget,
    the same. Weights, buffers (batch-norm statistics) and the random state are left as they were.
    """
    start = time.perf_counter()
    state = trainable_state(model)  # the frozen text encoder is never touched
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    _training_mode(model.to(device), cfg.profile == "gpu")
    n = min(cfg.batch_size, len(inputs.labels))
    idx = torch.arange(n)
    loss_fn = _new_loss(model, cfg, n_categories).to(device)
    with _autocast(device, cfg.amp):
        maps, tok, pad, y = inputs.take(idx, idx.to(inputs.device), True, device)
        loss = _member_loss(model.heads[0], loss_fn, maps, tok, pad, y, model.config.beta)
    loss.backward()
    model.zero_grad(set_to_none=True)
    first = np.arange(len(inputs.labels))[:128]
    describe_all(model, inputs, first, device, amp=cfg.amp, full_batches=True)  # validation's batches
    if cfg.amp and device.type == "cuda":  # the benchmark's final evaluation runs in float32: other kernels
        describe_all(model, inputs, first, device, amp=False, full_batches=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.load_state_dict(state, strict=False)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    return time.perf_counter() - start


def _new_loss(model: ComposedRetrievalModel, cfg: TrainConfig, n_categories: int) -> CategoryContrastiveLoss:
    """A head set's loss, with its own category proxies: one local and one global part per level."""
    return CategoryContrastiveLoss(n_categories, 2 * N_LEVELS, model.config.dim, model.config.beta, cfg.temperature,
                                   cfg.proxy_weight)


def _training_mode(model: ComposedRetrievalModel, train_backbone: bool) -> None:
    """Heads in training mode; the frozen text encoder (and a frozen backbone's batch norms) in evaluation mode."""
    model.train()
    model.text_encoder.eval()
    if not train_backbone:
        model.backbone.eval()
    if model.companion is not None:  # fitted separately; its dropout stays off while the main model trains
        model.companion.eval()


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


def selection_keys(select_by: str) -> tuple[str, ...]:
    """The validation figures whose mean picks the kept epoch and drives patience."""
    if select_by not in SELECTION:
        raise ValueError(f"select_by must be one of {sorted(SELECTION)}, got {select_by!r}")
    return SELECTION[select_by]


def validation_metrics(
    model: ComposedRetrievalModel, inputs: Inputs, db_idx: np.ndarray, query_idx: np.ndarray, device: torch.device,
    amp: bool = False, full_batches: bool = False,
) -> dict[str, float]:
    """mAP and Acc@1/2/4 (percent) of composed queries from ``query_idx`` against targets ``db_idx`` (never the
    test fold); ``{"mAP": nan}`` when there are no queries."""
    if len(query_idx) == 0:
        return {"mAP": float("nan")}
    scores = composed_scores(model, inputs, db_idx, query_idx, device, amp, full_batches)
    y = inputs.labels.cpu().numpy()
    return retrieval_metrics(scores, y[query_idx], y[db_idx])


def composed_scores(
    model: ComposedRetrievalModel, inputs: Inputs, db_idx: np.ndarray, query_idx: np.ndarray, device: torch.device,
    amp: bool = False, full_batches: bool = False,
) -> np.ndarray:
    """Fused scores (Eq. 9), ``(len(query_idx), len(db_idx))``, of composed queries against image targets."""
    db = describe_all(model, inputs, db_idx, device, amp=amp, kinds=("target",), full_batches=full_batches)["target"]
    q = describe_all(model, inputs, query_idx, device, amp=amp, kinds=("composed",),
                     full_batches=full_batches)["composed"]
    return (query_embeddings(q, model.config.beta) @ target_embeddings(db).T).float().cpu().numpy()


def trainable_state(model: ComposedRetrievalModel, train_backbone: bool = True) -> dict[str, torch.Tensor]:
    """A copy of the weights ``fit`` may change: never the frozen text encoder, nor a companion's (fitted on their
    own), nor the backbone when it is not trained."""
    skip = ("text_encoder.", "companion.") + (() if train_backbone else ("backbone.",))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(skip)}


__all__ = ["FitResult", "Inputs", "composed_scores", "describe_all", "fit", "full_batch_order", "query_embeddings",
           "seed_everything", "target_embeddings", "trainable_state", "warm_up"]
