"""ResNet50-CosSim (Tschandl et al., Br J Dermatol 2019): a CNN fine-tuned as a category classifier on the training
cases; retrieval ranks the database by the cosine similarity of the penultimate-layer (globally pooled) features.
Queries are images only.

Here the CNN is timm's ``resnet50`` when the user gives local ImageNet weights (``backbone="resnet50",
backbone_weights=PATH``); by default it is EfficientNet-Lite0 with the offline ImageNet weights, and the row says so.
Profiles: ``cpu`` freezes the stages up to the last block and trains the final 1x1 conv (the penultimate layer)
and the classifier on cached maps of 4 symmetries per image at 224 px; ``gpu`` fine-tunes the whole network at 256 px
for 30 epochs with random flips and quarter turns.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermcir.baselines._base import IMAGE_ONLY_DATABASE, register_baseline
from dermcir.baselines._features import cosine_scores
from dermcir.baselines._nets import SplitBackbone
from dermcir.baselines._trained import TrainedBaseline
from dermcir.baselines._training import LossFn, Outputs
from dermcir.baselines.configs import METHOD_PROFILES, CosSimConfig


class ClassifierHead(nn.Module):
    """Tail (penultimate conv stage) -> global average -> (dropout) -> linear classifier."""

    def __init__(self, tail: nn.Module, width: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.tail = tail
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, n_classes)

    def forward(self, mid: torch.Tensor | None, top: torch.Tensor) -> Outputs:
        features = self.tail(top).mean(dim=(2, 3))
        return {"features": features, "logits": self.classifier(self.drop(features))}


def _cross_entropy(outputs: Outputs, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs["logits"].float(), labels)


@register_baseline
class ResNet50CosSim(TrainedBaseline):
    """See the module docstring."""

    name = "resnet50-cossim"
    config_class = CosSimConfig
    profiles = METHOD_PROFILES[name]
    config: CosSimConfig

    @property
    def display_name(self) -> str:
        if self.config.backbone == "resnet50":
            return "ResNet50-CosSim" + ("" if self.config.train_backbone else " (last block fine-tuned)")
        part = "fine-tuned end to end" if self.config.train_backbone else "last conv fine-tuned, frozen trunk"
        return f"Lite0-CosSim (ResNet50-CosSim protocol; EfficientNet-Lite0, {part})"

    @property
    def variants(self) -> dict[str, str]:
        return {"main": f"image-only query, {IMAGE_ONLY_DATABASE}"}

    @property
    def deviations(self) -> str:
        what = "ResNet50" if self.config.backbone == "resnet50" else "EfficientNet-Lite0 (no ResNet50 weights offline)"
        how = ("whole network fine-tuned" if self.config.train_backbone
               else "only the last conv stage and the classifier trained, on cached frozen maps (CPU budget)")
        # the classes are the categories this run trained on (``prepare``), however many the data gave
        classes = getattr(self, "classes", None)
        trained = f"{len(classes)} Derm7pt categories" if classes else "the Derm7pt categories"
        return f"{what}; {how}; {trained} instead of the original's diagnosis classes."

    def build_head(self, backbone: SplitBackbone, n_classes: int) -> nn.Module:
        return ClassifierHead(backbone.tail, backbone.out_channels, n_classes, self.config.dropout)

    def loss(self) -> LossFn:
        return _cross_entropy

    def fold_scores(self, fold: int, db_idx: np.ndarray, q_idx: np.ndarray) -> dict[str, np.ndarray]:
        net, inputs = self.fit_fold(fold, db_idx)
        db = self.encode(net, inputs, db_idx)["features"]
        q = self.encode(net, inputs, q_idx)["features"]
        return {"main": cosine_scores(q, db)}
