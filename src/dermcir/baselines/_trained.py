"""Common machinery of the baselines that train a CNN on the database folds (ResNet50-CosSim, DAHNET)."""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from dermcir.baselines._base import Baseline, BaselineData
from dermcir.baselines._features import backbone_maps
from dermcir.baselines._nets import SplitBackbone, build_backbone
from dermcir.baselines._training import ImageInputs, Inputs, LossFn, MapInputs, Net, TrainSettings, infer, train_net
from dermcir.baselines.configs import TrainedConfig

log = logging.getLogger(__name__)


class TrainedBaseline(Baseline):
    """A CNN (``SplitBackbone``) with a method-specific head, trained per fold on the database cases."""

    levels: ClassVar[tuple[str, ...]] = ("top",)  # backbone maps the head reads
    config: TrainedConfig

    @abstractmethod
    def build_head(self, backbone: SplitBackbone, n_classes: int) -> nn.Module:
        """The trainable head: ``forward(mid, top) -> {name: tensor}``; owns ``backbone.tail``."""

    @abstractmethod
    def loss(self) -> LossFn:
        """The training loss ``(outputs, labels) -> scalar``."""

    @property
    def backbone_label(self) -> str:
        """How the table names the CNN actually used."""
        return self.config.backbone_label

    def unused_settings(self) -> dict[str, str]:
        unused = {}
        if self.config.train_backbone:
            unused["n_views"] = "train_backbone=True trains on live images under all 8 symmetries"
        else:
            unused["backbone_lr"] = "train_backbone=False keeps the backbone stages frozen"
        if self.device.type != "cuda":
            unused["amp"] = f"bf16 autocast runs on CUDA only; this run is on {self.device}"
        return unused

    def prepare(self, data: BaselineData) -> None:
        self.data = data
        self.classes = sorted(set(data.labels.tolist()))
        self.y = np.array([self.classes.index(c) for c in data.labels], dtype=np.int64)
        self.maps: dict[str, np.ndarray] | None = None
        if not self.config.train_backbone:
            self.maps = backbone_maps(
                self._backbone(), data.images, self.config.n_views, self.levels, self.device,
                self.config.batch_size, data.cache_dir, data.progress,
            )

    def _backbone(self) -> SplitBackbone:
        return build_backbone(self.config.backbone, self.config.backbone_weights, self.config.pretrained)

    def fit_fold(self, fold: int, db_idx: np.ndarray) -> tuple[Net, Inputs]:
        """A fresh network trained on the fold's database cases, and the inputs to encode any case with."""
        seed = self.data.seed * 1000 + fold
        torch.manual_seed(seed)  # the head's initialisation too must not depend on what ran before
        backbone = self._backbone()
        head = self.build_head(backbone, len(self.classes))
        if self.config.train_backbone:
            net, inputs = Net(head, backbone), ImageInputs(self.data.images, backbone, self.device)
        else:
            if self.maps is None:
                raise ValueError("prepare() must run before fit_fold()")
            net, inputs = Net(head, None), MapInputs(self.maps, self.device)
        cfg = self.config
        settings = TrainSettings(cfg.epochs, cfg.batch_size, cfg.lr, cfg.backbone_lr, cfg.weight_decay, cfg.amp)
        train_net(net, inputs, self.y, db_idx, self.loss(), settings, self.device, seed=seed)
        return net, inputs

    def encode(self, net: Net, inputs: Inputs, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The trained head's outputs for the cases ``idx``."""
        return infer(net, inputs, idx, self.config.batch_size, self.device)
