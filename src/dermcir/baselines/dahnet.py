"""DAHNET (Jiang et al., IEEE TKDE 2024), as summarised in the project's brief: global and local activations of a CNN
turned into binary hash codes, trained on the training folds, with the database ranked by Hamming distance.

This reimplementation:
- global branch: the penultimate conv stage, global average pooled, a linear layer and ``tanh`` -> ``bits/2`` codes;
- local branch: ``n_parts`` learned spatial attention maps over the stride-16 activations; the attention-pooled part
  descriptors go through a linear layer and ``tanh`` -> ``bits/2`` codes;
- loss: cross-entropy of a linear classifier on the relaxed codes (semantic term) + the pairwise likelihood loss of
  deep supervised hashing over the batch (pairs of the same category should agree) + a quantisation term pulling
  the relaxed codes to ±1;
- retrieval: ``sign`` of the codes, score = minus the Hamming distance. Ties are frequent (codes of one category
  collapse together) and :mod:`dermcir.metrics` ranks ties pessimistically for every method; a second row breaks
  the Hamming ties by the cosine of the relaxed codes, which changes no distance order.
Profiles as for ResNet50-CosSim: ``cpu`` trains the last conv stage and both branches on cached frozen maps (224 px,
4 symmetries); ``gpu`` trains everything end to end at 256 px.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermcir.baselines._base import IMAGE_ONLY_DATABASE, register_baseline
from dermcir.baselines._features import cosine_scores
from dermcir.baselines._nets import SplitBackbone
from dermcir.baselines._trained import TrainedBaseline
from dermcir.baselines._training import LossFn, Outputs
from dermcir.baselines.configs import METHOD_PROFILES, DahnetConfig


class HashHead(nn.Module):
    """Global + local hashing branches and the classifier on the relaxed codes (see the module docstring)."""

    def __init__(self, tail: nn.Module, out_channels: int, mid_channels: int, bits: int, n_parts: int,
                 n_classes: int) -> None:
        super().__init__()
        if bits < 2 or bits % 2:
            raise ValueError(f"bits must be an even number >= 2, got {bits}")
        self.tail = tail
        self.global_hash = nn.Linear(out_channels, bits // 2)
        self.attention = nn.Conv2d(mid_channels, n_parts, kernel_size=1)
        self.local_hash = nn.Linear(n_parts * mid_channels, bits // 2)
        self.classifier = nn.Linear(bits, n_classes)

    def forward(self, mid: torch.Tensor | None, top: torch.Tensor) -> Outputs:
        if mid is None:
            raise ValueError("the DAHNET head needs the stride-16 map (level 'mid')")
        global_act = self.tail(top).mean(dim=(2, 3))
        attn = self.attention(mid).flatten(2).softmax(dim=-1)  # (B, P, HW): where each part looks
        parts = torch.bmm(attn, mid.flatten(2).transpose(1, 2))  # (B, P, C) attention-pooled local activations
        codes = torch.cat([torch.tanh(self.global_hash(global_act)), torch.tanh(self.local_hash(parts.flatten(1)))], 1)
        return {"codes": codes, "logits": self.classifier(codes)}


def hashing_loss(pair_weight: float, quant_weight: float) -> LossFn:
    """Semantic cross-entropy + pairwise likelihood (same category = similar) + quantisation."""

    def loss(outputs: Outputs, labels: torch.Tensor) -> torch.Tensor:
        u = outputs["codes"].float()
        semantic = F.cross_entropy(outputs["logits"].float(), labels)
        similar = (labels[:, None] == labels[None, :]).float()
        theta = 0.5 * u @ u.T
        pairwise = (F.softplus(theta) - similar * theta).mean()
        quant = (u.abs() - 1.0).pow(2).mean()
        return semantic + pair_weight * pairwise + quant_weight * quant

    return loss


def hamming_scores(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """Minus the Hamming distance between the signs of the codes (higher = more similar)."""
    q = np.where(query_codes >= 0, 1.0, -1.0)
    d = np.where(db_codes >= 0, 1.0, -1.0)
    bits = q.shape[1]
    return -(bits - q @ d.T) / 2.0


def tie_broken_hamming_scores(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """Hamming ranking whose ties are ordered by the cosine of the relaxed (``tanh``) codes.

    Distances are integers and the added cosine term lies in [-0.25, 0.25], so it only reorders equal distances.
    """
    return hamming_scores(query_codes, db_codes) + 0.25 * cosine_scores(query_codes, db_codes)


@register_baseline
class Dahnet(TrainedBaseline):
    """See the module docstring."""

    name = "dahnet"
    config_class = DahnetConfig
    levels: ClassVar[tuple[str, ...]] = ("mid", "top")
    profiles = METHOD_PROFILES[name]
    config: DahnetConfig

    @property
    def display_name(self) -> str:
        part = "trained end to end" if self.config.train_backbone else "frozen trunk, last conv + hash heads trained"
        return f"DAHNET ({self.config.bits}-bit; {self.backbone_label} backbone, {part})"

    @property
    def variants(self) -> dict[str, str]:
        return {
            "main": f"image-only query, {IMAGE_ONLY_DATABASE}; Hamming ranking (ties ranked pessimistically)",
            "tie-break": f"image-only query, {IMAGE_ONLY_DATABASE}; Hamming ranking, ties ordered by the relaxed codes",
        }

    @property
    def deviations(self) -> str:
        trunk = ("the whole network trains" if self.config.train_backbone
                 else "the trunk is frozen (cached maps) and only the last conv stage and the hash heads train")
        return (f"{self.backbone_label} backbone; the global/local branches, attention and losses follow the brief's "
                f"summary of the paper (its text was not available here), not its exact layers; {trunk}.")

    def build_head(self, backbone: SplitBackbone, n_classes: int) -> nn.Module:
        cfg = self.config
        return HashHead(backbone.tail, backbone.out_channels, backbone.mid_channels, cfg.bits, cfg.n_parts, n_classes)

    def loss(self) -> LossFn:
        return hashing_loss(self.config.pair_weight, self.config.quant_weight)

    def fold_scores(self, fold: int, db_idx: np.ndarray, q_idx: np.ndarray) -> dict[str, np.ndarray]:
        net, inputs = self.fit_fold(fold, db_idx)
        db = self.encode(net, inputs, db_idx)["codes"]
        q = self.encode(net, inputs, q_idx)["codes"]
        return {"main": hamming_scores(q, db), "tie-break": tie_broken_hamming_scores(q, db)}
