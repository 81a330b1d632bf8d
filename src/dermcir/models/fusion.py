"""The trainable heads: per level the cross-modal transformer (Eq. 5) and the spatial attention masks (Eq. 6), and
the :class:`HeadSet` that holds one set of them together with the text-side layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dermcir.similarity import global_descriptor, local_descriptor


@dataclass
class Descriptors:
    """Per-level local and global descriptors of a batch, with the attention masks that pooled the local ones."""

    locals: list[torch.Tensor]  # L × (B, D)
    globals: list[torch.Tensor]  # L × (B, D)
    masks: list[torch.Tensor]  # L × (B, k, H, W) softmax-normalised spatial attention


class CrossModalLayer(nn.Module):
    """Image tokens attend to text tokens; residual updates keep the output in the input's visual space (Eq. 5)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        self.norm_text = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, visual: torch.Tensor, text: torch.Tensor, text_pad: torch.Tensor) -> torch.Tensor:
        kv = self.norm_text(text)
        attended, _ = self.attn(self.norm_query(visual), kv, kv, key_padding_mask=text_pad, need_weights=False)
        visual = visual + attended
        return visual + self.ff(self.norm_ff(visual))


class LevelHead(nn.Module):
    """One pyramid level: projection into the shared space, text injection for queries, and k attention masks."""

    def __init__(self, in_channels: int, dim: int, heads: int, layers: int, n_masks: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(in_channels, dim, 1), nn.GroupNorm(1, dim), nn.Dropout(dropout))
        self.fusion = nn.ModuleList(CrossModalLayer(dim, heads) for _ in range(layers))
        self.masks = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, n_masks))
        # Text-only queries start from this learned "no image" token instead of an image map.
        self.null_image = nn.Parameter(torch.zeros(1, 1, dim))

    def tokens(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(B, C, H, W)`` backbone map → ``(B, H·W, D)`` tokens in the shared visual space, and ``(H, W)``."""
        x = self.project(feature_map)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])

    def inject(self, visual: torch.Tensor, text: torch.Tensor, text_pad: torch.Tensor) -> torch.Tensor:
        for layer in self.fusion:
            visual = layer(visual, text, text_pad)
        return visual

    def pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens ``(B, P, D)`` → local descriptor (Eq. 6–7), global descriptor (Eq. 8) and mask logits ``(B, P, k)``."""
        logits = self.masks(x)
        return local_descriptor(x, logits), global_descriptor(x), logits


class HeadSet(nn.Module):
    """Everything trainable that turns backbone maps and frozen text tokens into descriptors: the text projection and
    context layers, and one :class:`LevelHead` per pyramid level. A model holds one or more independently initialised
    head sets (an ensemble over the same frozen encoders; see ``ModelConfig.members``)."""

    def __init__(self, text_width: int, channels: Sequence[int], dim: int, heads: int, fusion_layers: int,
                 text_layers: int, n_masks: int, token_dropout: float) -> None:
        super().__init__()
        self.text_proj = nn.Sequential(nn.Linear(text_width, dim), nn.LayerNorm(dim))
        # The text encoder may stay frozen; a small trainable context layer lets the text tokens be re-read for this
        # task (e.g. bind "present"/"absent" to the criterion before them) before the image attends to them.
        self.text_context = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(text_layers)
        )
        self.levels = nn.ModuleList(
            LevelHead(c, dim, heads, fusion_layers, n_masks, token_dropout) for c in channels
        )

    def text_states(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Frozen token embeddings ``(B, T, E)`` → the text tokens the image attends to, ``(B, T, D)``."""
        text = self.text_proj(tokens.to(self.text_proj[0].weight.dtype))
        for layer in self.text_context:
            text = layer(text, src_key_padding_mask=pad)
        return text

    def describe(self, maps: list[torch.Tensor] | None, text: torch.Tensor | None, pad: torch.Tensor | None) -> Descriptors:
        """Descriptors of targets (``text`` None), composed queries (both) or text-only queries (``maps`` None).

        ``text`` is the output of :meth:`text_states`, so a caller that needs several query modes computes it once.
        """
        locals_, globals_, masks = [], [], []
        for level, head in enumerate(self.levels):
            if maps is not None:
                x, (h, w) = head.tokens(maps[level])
            else:  # text-only: a constant "no image" map
                x, (h, w) = head.null_image.expand(text.shape[0], 1, -1), (1, 1)
            if text is not None:
                x = head.inject(x, text, pad)
            local, glob, logits = head.pool(x)
            locals_.append(local)
            globals_.append(glob)
            masks.append(logits.softmax(dim=1).transpose(1, 2).reshape(x.shape[0], -1, h, w))
        return Descriptors(locals_, globals_, masks)

    def describe_training_modes(
        self, maps: list[torch.Tensor], text: torch.Tensor, pad: torch.Tensor
    ) -> tuple[Descriptors, Descriptors, Descriptors]:
        """Target, composed-query and text-only-query descriptors of one batch in a single pass (masks left out).

        Equal to three :meth:`describe` calls in evaluation mode (in training the target and the composed query share
        one draw of the token dropout), but cheaper: the image is projected once for the target and the composed query, and the "no image" token rides along with the image tokens through the cross-modal layers.
        That is exact because those layers have no attention among visual tokens: each visual token attends to the
        text on its own, and the norms and feed-forward act per token.
        """
        out: tuple[list, list, list, list, list, list] = ([], [], [], [], [], [])
        for level, head in enumerate(self.levels):
            x, _ = head.tokens(maps[level])
            n = x.shape[1]
            fused = head.inject(torch.cat([x, head.null_image.expand(x.shape[0], 1, -1)], dim=1), text, pad)
            for mode, tokens in enumerate((x, fused[:, :n], fused[:, n:])):
                local, glob, _ = head.pool(tokens)
                out[2 * mode].append(local)
                out[2 * mode + 1].append(glob)
        target, composed, text_only = (Descriptors(out[2 * m], out[2 * m + 1], []) for m in range(3))
        return target, composed, text_only
