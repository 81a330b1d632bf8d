"""The seed's scoring equations as named functions, and their decomposition into two independent encoders.

Per level ``l`` a feature map ``F_l`` (``B×HW×D``) gives:

* region descriptors ``r_{l,m} = Σ_p softmax_p(A_{l,m}(F_l))_p · F_l[p]`` for ``m = 1..k`` (Eq. 6), averaged into the
  local descriptor ``u_l``;
* the global descriptor ``g_l``, the plain average over positions (Eq. 8).

Every similarity is a cosine of separately normalised vectors, so the fused score (Eq. 9)

    s(q, t) = β Σ_l cos(u_l^q, u_l^t) + (1 − β) Σ_l cos(g_l^q, g_l^t)

is the inner product ``⟨φ_q, φ_t⟩`` of ``φ_q = [β û_1, …, β û_L, (1−β) ĝ_1, …]`` and ``φ_t = [û_1, …, ĝ_1, …]`` (hats
are unit vectors). The target vector never depends on the query or on β, which is what lets the index store it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def region_descriptors(features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 6: ``k`` attention-pooled region descriptors per map.

    Args:
        features: ``(B, P, D)`` features at ``P`` spatial positions.
        mask_logits: ``(B, P, k)`` unnormalised spatial attention, one column per mask.

    Returns:
        ``(B, k, D)`` region descriptors.
    """
    weights = mask_logits.softmax(dim=1)
    return torch.einsum("bpk,bpd->bkd", weights, features)


def local_descriptor(features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """The mean of the ``k`` region descriptors (Eq. 6–7): ``(B, D)``."""
    return region_descriptors(features, mask_logits).mean(dim=1)


def global_descriptor(features: torch.Tensor) -> torch.Tensor:
    """Eq. 8's descriptor: plain average pooling over positions, ``(B, P, D) → (B, D)``."""
    return features.mean(dim=1)


def local_similarity(query_local: torch.Tensor, target_local: torch.Tensor) -> torch.Tensor:
    """Eq. 7: cosine between local descriptors, all pairs ``(Q, D) × (T, D) → (Q, T)``."""
    return F.normalize(query_local, dim=-1) @ F.normalize(target_local, dim=-1).T


def global_similarity(query_global: torch.Tensor, target_global: torch.Tensor) -> torch.Tensor:
    """Eq. 8: cosine between global descriptors, all pairs ``(Q, T)``."""
    return F.normalize(query_global, dim=-1) @ F.normalize(target_global, dim=-1).T


def fused_similarity(
    query_locals: list[torch.Tensor], target_locals: list[torch.Tensor],
    query_globals: list[torch.Tensor], target_globals: list[torch.Tensor], beta: float = 0.6,
) -> torch.Tensor:
    """Eq. 9 computed directly: ``β Σ_l cos(local) + (1 − β) Σ_l cos(global)``, all pairs ``(Q, T)``."""
    local = sum(local_similarity(q, t) for q, t in zip(query_locals, target_locals, strict=True))
    glob = sum(global_similarity(q, t) for q, t in zip(query_globals, target_globals, strict=True))
    return beta * local + (1.0 - beta) * glob


def query_vector(locals_: list[torch.Tensor], globals_: list[torch.Tensor], beta: float) -> torch.Tensor:
    """``φ_q``: unit local and global descriptors, weighted by β and 1 − β, concatenated."""
    parts = [beta * F.normalize(u, dim=-1) for u in locals_] + [(1.0 - beta) * F.normalize(g, dim=-1) for g in globals_]
    return torch.cat(parts, dim=-1)


def target_vector(locals_: list[torch.Tensor], globals_: list[torch.Tensor]) -> torch.Tensor:
    """``φ_t``: unit local and global descriptors concatenated (independent of β and of any query)."""
    return torch.cat([F.normalize(v, dim=-1) for v in [*locals_, *globals_]], dim=-1)
