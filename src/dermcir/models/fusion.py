"""The per-level heads: the cross-modal transformer (Eq. 5) and the spatial attention masks (Eq. 6)."""

from __future__ import annotations

import torch
from torch import nn


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
