"""The composed retrieval model: ``encode_query(image, text)`` and ``encode_target(image)``.

The fused score of Eq. 9 is the inner product of the two encodings (see :mod:`dermcir.similarity`), so targets can be
encoded once and indexed. Query modes (the seed's Fig. 1): ``composed`` (image + text), ``image`` (image only, no
text injection) and ``text`` (text injected into a learned "no image" token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermcir.config import ModelConfig
from dermcir.models.fusion import LevelHead
from dermcir.models.registry import create_backbone, create_text_encoder
from dermcir.similarity import global_descriptor, local_descriptor, query_vector, target_vector

QUERY_MODES = ("composed", "image", "text")
N_LEVELS = 3


@dataclass
class Descriptors:
    """Per-level local and global descriptors of a batch, with the attention masks that pooled the local ones."""

    locals: list[torch.Tensor]  # L × (B, D)
    globals: list[torch.Tensor]  # L × (B, D)
    masks: list[torch.Tensor]  # L × (B, k, H, W) softmax-normalised spatial attention


class ComposedRetrievalModel(nn.Module):
    """Backbone + text encoder + per-level heads. See the module docstring."""

    def __init__(self, config: ModelConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.backbone = create_backbone(config.backbone, config.backbone_weights, pretrained, img_size=config.image_size)
        self.text_encoder = create_text_encoder(
            config.text_encoder, config.text_weights, pretrained, max_tokens=config.max_text_tokens
        )
        config.mean, config.std = tuple(self.backbone.mean), tuple(self.backbone.std)
        # NHWC convolutions: measured 2.2x faster on this CPU for Lite0 at 512 px (and the usual layout for AMP on GPU)
        self.backbone.to(memory_format=torch.channels_last)
        self.text_proj = nn.Sequential(nn.Linear(self.text_encoder.width, config.dim), nn.LayerNorm(config.dim))
        # The text encoder may stay frozen; a small trainable context layer lets the text tokens be re-read for this
        # task (e.g. bind "present"/"absent" to the criterion before them) before the image attends to them.
        self.text_context = nn.ModuleList(
            nn.TransformerEncoderLayer(config.dim, config.heads, 2 * config.dim, dropout=0.0, batch_first=True,
                                       norm_first=True)
            for _ in range(config.text_layers)
        )
        self.levels = nn.ModuleList(
            LevelHead(c, config.dim, config.heads, config.fusion_layers, config.n_masks, config.token_dropout)
            for c in self.backbone.channels
        )
        if len(self.levels) != N_LEVELS:
            raise ValueError(f"backbone {config.backbone!r} gives {len(self.levels)} levels, expected {N_LEVELS}")
        self.register_buffer("_mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    @property
    def embedding_dim(self) -> int:
        return 2 * N_LEVELS * self.config.dim

    # ---- inputs -------------------------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` preprocessed images → normalised float ``(B, 3, H, W)`` on the model's device."""
        x = torch.as_tensor(images, device=self._mean.device)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be a uint8 array of shape (batch, height, width, 3), got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean) / self._std

    def image_features(self, images: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        """Backbone maps of preprocessed uint8 images, pooled to the configured grid."""
        return self.pool_maps(self.backbone(self.normalize(images).contiguous(memory_format=torch.channels_last)))

    def pool_maps(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        g = self.config.grid
        if g is None:
            return maps
        return [F.adaptive_avg_pool2d(m, g) if m.shape[-1] != g or m.shape[-2] != g else m for m in maps]

    def text_features(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings ``(B, T, E)`` and padding mask ``(B, T)`` of the query texts."""
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text {i} is empty; give a description or use an image-only query")
        return self.text_encoder(list(texts))

    # ---- descriptors from features ------------------------------------------------------------------------------
    def describe_target(self, maps: list[torch.Tensor]) -> Descriptors:
        return self._describe(maps, None, None)

    def describe_query(
        self, maps: list[torch.Tensor] | None, tokens: torch.Tensor | None, pad: torch.Tensor | None
    ) -> Descriptors:
        if maps is None and tokens is None:
            raise ValueError("a query needs an image, a text, or both")
        return self._describe(maps, tokens, pad)

    def _describe(self, maps, tokens, pad) -> Descriptors:
        text = None
        if tokens is not None:
            text = self.text_proj(tokens.to(self.text_proj[0].weight.dtype))
            for layer in self.text_context:
                text = layer(text, src_key_padding_mask=pad)
        locals_, globals_, masks = [], [], []
        for level, head in enumerate(self.levels):
            if maps is not None:
                x, (h, w) = head.tokens(maps[level])
            else:  # text-only: a constant "no image" map
                x, (h, w) = head.null_image.expand(text.shape[0], 1, -1), (1, 1)
            if text is not None:
                x = head.inject(x, text, pad)
            logits = head.masks(x)  # (B, P, k)
            locals_.append(local_descriptor(x, logits))
            globals_.append(global_descriptor(x))
            masks.append(logits.softmax(dim=1).transpose(1, 2).reshape(x.shape[0], -1, h, w))
        return Descriptors(locals_, globals_, masks)

    def query_embedding(self, d: Descriptors, beta: float | None = None) -> torch.Tensor:
        return query_vector(d.locals, d.globals, self.config.beta if beta is None else beta)

    @staticmethod
    def target_embedding(d: Descriptors) -> torch.Tensor:
        return target_vector(d.locals, d.globals)

    # ---- the two public encoders --------------------------------------------------------------------------------
    def encode_target(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``φ_t`` of preprocessed uint8 images ``(B, H, W, 3)`` → ``(B, 6·D)``."""
        return self.target_embedding(self.describe_target(self.image_features(images)))

    def encode_query(
        self, images: torch.Tensor | np.ndarray | None = None, texts: Sequence[str] | None = None,
        beta: float | None = None,
    ) -> torch.Tensor:
        """``φ_q`` of a composed (image + text), image-only or text-only query → ``(B, 6·D)``.

        ``⟨encode_query(i, t), encode_target(j)⟩`` equals Eq. 9's fused score.
        """
        maps = self.image_features(images) if images is not None else None
        tokens, pad = self.text_features(texts) if texts is not None else (None, None)
        if maps is not None and tokens is not None and maps[0].shape[0] != tokens.shape[0]:
            raise ValueError(f"{maps[0].shape[0]} images but {tokens.shape[0]} texts; give one text per image")
        return self.query_embedding(self.describe_query(maps, tokens, pad), beta)

    def part_slices(self) -> dict[str, slice]:
        """Where each per-level local and global part lies in an embedding (for score explanations)."""
        d = self.config.dim
        names = [f"local_{i + 1}" for i in range(N_LEVELS)] + [f"global_{i + 1}" for i in range(N_LEVELS)]
        return {name: slice(i * d, (i + 1) * d) for i, name in enumerate(names)}
