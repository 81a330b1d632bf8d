"""The composed retrieval model: ``encode_query(image, text)`` and ``encode_target(image)``.

The fused score of Eq. 9 is the inner product of the two encodings (see :mod:`dermcir.similarity`), so targets can be
encoded once and indexed. Query modes (the seed's Fig. 1): ``composed`` (image + text), ``image`` (image only, no
text injection) and ``text`` (text injected into a learned "no image" token).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermcir.config import ModelConfig, check_companion
from dermcir.data.text import has_visible
from dermcir.models.fusion import Descriptors, HeadSet
from dermcir.models.registry import create_backbone, create_text_encoder
from dermcir.similarity import query_vector, target_vector

QUERY_MODES = ("composed", "image", "text")
N_LEVELS = 3
def companion_config(config: ModelConfig) -> ModelConfig | None:
    """The companion's own config (``config.companion`` applied to ``config``), or None without a companion."""
    if config.companion is None:
        return None
    check_companion(config)  # again: a config may be changed after it was made
    return replace(config, **config.companion, companion=None, categories=list(config.categories))


def average_members(descs: Sequence[Descriptors]) -> Descriptors:
    """Combine the head sets of an ensemble: per part, the mean of the members' unit descriptors.

    Eq. 7–9 then apply unchanged (they normalise again), so the embedding keeps its size and its decomposition; the
    masks are concatenated along ``k``, so their mean is the members' average attention.
    """
    if len(descs) == 1:
        return descs[0]
    n = len(descs)
    return Descriptors(
        [sum(F.normalize(d.locals[i], dim=-1) for d in descs) / n for i in range(len(descs[0].locals))],
        [sum(F.normalize(d.globals[i], dim=-1) for d in descs) / n for i in range(len(descs[0].globals))],
        [torch.cat([d.masks[i] for d in descs], dim=1) for i in range(len(descs[0].masks))] if descs[0].masks else [],
    )


class ComposedRetrievalModel(nn.Module):
    """Backbone + text encoder + per-level heads. See the module docstring."""

    def __init__(
        self, config: ModelConfig, pretrained: bool | Collection[str] = True, text_encoder: nn.Module | None = None
    ) -> None:
        """``pretrained``: load the pretrained weights of every part, of none, or of the parts named (``"backbone"``,
        ``"text_encoder"``, ``"companion.backbone"``: a checkpoint's frozen parts, whose weights it does not hold).
        ``text_encoder``: an already built (frozen) text encoder to share, as a companion shares its main model's."""
        super().__init__()
        self.config = config
        wants = (lambda part: pretrained) if isinstance(pretrained, bool) else (lambda part: part in pretrained)
        self.backbone = create_backbone(config.backbone, config.backbone_weights, wants("backbone"),
                                        img_size=config.image_size)
        if text_encoder is None:
            text_encoder = create_text_encoder(config.text_encoder, config.text_weights, wants("text_encoder"),
                                               max_tokens=config.max_text_tokens)
        self.text_encoder = text_encoder
        config.mean, config.std = tuple(self.backbone.mean), tuple(self.backbone.std)
        # NHWC convolutions: measured 2.2x faster on this CPU for Lite0 at 512 px (and the usual layout for AMP on GPU)
        self.backbone.to(memory_format=torch.channels_last)
        if len(self.backbone.channels) != N_LEVELS:
            raise ValueError(f"backbone {config.backbone!r} gives {len(self.backbone.channels)} levels, expected {N_LEVELS}")
        if config.members < 1:
            raise ValueError(f"members must be at least 1, got {config.members}")
        self.heads = nn.ModuleList(
            HeadSet(self.text_encoder.width, self.backbone.channels, config.dim, config.heads, config.fusion_layers,
                    config.text_layers, config.n_masks, config.token_dropout)
            for _ in range(config.members)
        )
        self.register_buffer("_mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        companion = companion_config(config)
        # Trained on its own (the training code fits ``model.companion`` like any model); its backbone never trains.
        own = pretrained if isinstance(pretrained, bool) else {p.removeprefix("companion.") for p in pretrained
                                                                if p.startswith("companion.")}
        self.companion = (ComposedRetrievalModel(companion, own, text_encoder=self.text_encoder)
                          if companion is not None else None)
        if self.companion is not None:
            self.companion.backbone.requires_grad_(False)

    @property
    def embedding_dim(self) -> int:
        own = 2 * N_LEVELS * self.config.dim
        return own + (self.companion.embedding_dim if self.companion is not None else 0)

    # ---- inputs -------------------------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` preprocessed images → normalised float ``(B, 3, H, W)`` on the model's device."""
        if isinstance(images, np.ndarray) and not (images.flags.c_contiguous and images.flags.writeable):
            # a flipped view (negative strides) cannot become a tensor as is, and torch warns about a read-only
            # array (preprocess returns its cached views read-only)
            images = np.array(images)
        x = torch.as_tensor(images, device=self._mean.device)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 array of shape (batch, height, width, 3), got {x.dtype} "
                             f"{tuple(x.shape)} (preprocessed images are uint8 pixels 0-255; a float image would "
                             f"be scaled wrongly)")
        # out of place: as_tensor shares the caller's memory, which must never change
        x = x.permute(0, 3, 1, 2).float() / 255.0
        return (x - self._mean) / self._std

    def image_features(self, images: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        """Backbone maps of preprocessed uint8 images, pooled to the configured grid."""
        return self.normalized_image_features(self.normalize(images))

    def normalized_image_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """As :meth:`image_features`, from images already passed through :meth:`normalize` (a companion shares the
        main model's normalisation, so one normalised batch serves both)."""
        return self.pool_maps(self.backbone(x.contiguous(memory_format=torch.channels_last)))

    def pool_maps(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        g = self.config.grid
        if g is None:
            return maps
        return [F.adaptive_avg_pool2d(m, g) if m.shape[-1] != g or m.shape[-2] != g else m for m in maps]

    def text_features(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings ``(B, T, E)`` and padding mask ``(B, T)`` of the query texts.

        Raises:
            ValueError: a text with no visible character (a zero-width space alone reads as no text at all), or one
                longer than the encoder reads (``max_text_tokens``; it would be cut without a word).
        """
        if isinstance(texts, str):  # iterating it would give one query per character
            raise TypeError("texts must be a list of strings (one per query), not a single string")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not has_visible(t):
                raise ValueError(f"text {i} is empty (or only invisible characters); give a description or use an "
                                 "image-only query")
        return self.text_encoder(list(texts))  # which refuses a text longer than it reads (TokenEncoder.tokenize)

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
        return average_members([
            head.describe(maps, head.text_states(tokens, pad) if tokens is not None else None, pad)
            for head in self.heads
        ])

    def query_embedding(self, d: Descriptors, beta: float | None = None) -> torch.Tensor:
        return query_vector(d.locals, d.globals, self.config.beta if beta is None else beta)

    @staticmethod
    def target_embedding(d: Descriptors) -> torch.Tensor:
        return target_vector(d.locals, d.globals)

    # ---- the two public encoders --------------------------------------------------------------------------------
    def encode_target(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``φ_t`` of preprocessed uint8 images ``(B, H, W, 3)`` → ``(B, embedding_dim)``.

        Call it on a model in evaluation mode (``load_checkpoint`` returns one): in training mode, batch norm and
        dropout make a vector depend on the rest of its batch (training passes through here on purpose)."""
        return self.encode_target_with_masks(images)[0]

    def encode_target_with_masks(self, images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``φ_t`` and the main model's attention masks per level (for heatmaps)."""
        x = self.normalize(images)
        d = self.describe_target(self.normalized_image_features(x))
        vector = self.target_embedding(d)
        if self.companion is not None:  # its own vector beside ours: the weights go on the query side
            c = self.companion
            vector = torch.cat([vector, c.target_embedding(c.describe_target(c.normalized_image_features(x)))], dim=1)
        return vector, d.masks

    def encode_query(
        self, images: torch.Tensor | np.ndarray | None = None, texts: Sequence[str] | None = None,
        beta: float | None = None,
    ) -> torch.Tensor:
        """``φ_q`` of a composed (image + text), image-only or text-only query → ``(B, embedding_dim)``.

        ``⟨encode_query(i, t), encode_target(j)⟩`` equals Eq. 9's fused score; with a companion, the weighted sum
        ``(1 − w) s_main + w s_companion`` of two such scores.
        """
        return self.encode_query_with_masks(images, texts, beta)[0]

    def encode_query_with_masks(
        self, images: torch.Tensor | np.ndarray | None = None, texts: Sequence[str] | None = None,
        beta: float | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``φ_q`` and the main model's attention masks per level (empty for a text-only query)."""
        if texts is not None and not isinstance(texts, str) and len(texts) == 0:  # transformers' IndexError
            raise ValueError("texts is empty: give one text per query, or texts=None for image-only queries")
        tokens, pad = self.text_features(texts) if texts is not None else (None, None)
        return self.encode_query_tokens(images, tokens, pad, beta)

    def encode_query_tokens(
        self, images: torch.Tensor | np.ndarray | None, tokens: torch.Tensor | None, pad: torch.Tensor | None,
        beta: float | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """As ``encode_query_with_masks``, from text tokens already computed by ``text_features``."""
        x = self.normalize(images) if images is not None else None
        maps = self.normalized_image_features(x) if x is not None else None
        if maps is not None and tokens is not None and maps[0].shape[0] != tokens.shape[0]:
            raise ValueError(f"{maps[0].shape[0]} images but {tokens.shape[0]} texts; give one text per image")
        d = self.describe_query(maps, tokens, pad)
        vector = self.query_embedding(d, beta)
        if self.companion is not None:
            c = self.companion
            c_maps = c.normalized_image_features(x) if x is not None else None
            vector = self.join_companion(vector, c.query_embedding(c.describe_query(c_maps, tokens, pad), beta))
        return vector, (d.masks if maps is not None else [])

    def join_companion(self, main: torch.Tensor, companion: torch.Tensor) -> torch.Tensor:
        """One query vector from the main model's and the companion's: weighted ``1 − w`` and ``w``, concatenated."""
        w = self.config.companion_weight
        return torch.cat([(1.0 - w) * main, w * companion], dim=1)

    def part_slices(self) -> dict[str, slice]:
        """Where each per-level local and global part lies in an embedding (for score explanations).

        A companion's parts follow, named ``companion_local_1`` … ``companion_global_3``.
        """
        d = self.config.dim
        names = [f"local_{i + 1}" for i in range(N_LEVELS)] + [f"global_{i + 1}" for i in range(N_LEVELS)]
        parts = {name: slice(i * d, (i + 1) * d) for i, name in enumerate(names)}
        if self.companion is not None:
            offset = len(names) * d
            parts.update({f"companion_{name}": slice(offset + s.start, offset + s.stop)
                          for name, s in self.companion.part_slices().items()})
        return parts
