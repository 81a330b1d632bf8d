"""The training loss: label-level contrastive retrieval with category proxies.

Why this loss: the protocol's positives are *all* database cases of the query's category, not one paired target, so a
one-positive InfoNCE would push apart same-category cases it should pull together. We use

* a multi-positive InfoNCE over the batch (SupCon-style): for query ``i`` the positives are the batch targets of its
  category *other than its own image* (in the benchmark the query's own image is never in the database, so matching
  it would teach a shortcut). It is the "log of a sum" form, ``-log Σ_pos softmax``: it asks for the positives'
  *total* share of the softmax, so a query is not pushed away from the same-category cases it scores lower (the
  one-positive form would), while the pull goes mostly to the positives it already scores highest;
* a normalised-softmax proxy term: one learned proxy per category, scored with the same Eq. 9 structure, which
  keeps rare categories (61 benign keratoses) represented in every step even when a batch has few of them.

Both act on the fused score ``⟨φ_q, φ_t⟩ / τ``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dermcir.similarity import query_vector, target_vector


class CategoryContrastiveLoss(nn.Module):
    """``loss(query_emb, target_emb, labels) -> {"contrastive", "proxy", "total"}``."""

    def __init__(self, n_categories: int, n_parts: int, dim: int, beta: float, temperature: float = 0.1,
                 proxy_weight: float = 1.0) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(n_categories, n_parts, dim) * 0.02)
        self.n_parts, self.beta, self.temperature, self.proxy_weight = n_parts, beta, temperature, proxy_weight

    def _proxy_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts = list(self.proxies.unbind(dim=1))
        half = self.n_parts // 2
        return target_vector(parts[:half], parts[half:]), query_vector(parts[:half], parts[half:], self.beta)

    def forward(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: query ``(B, E)`` φ_q, target ``(B, E)`` φ_t of the same cases, labels ``(B,)`` category ids."""
        if query.shape != target.shape or query.shape[0] != labels.shape[0]:
            raise ValueError(f"query {tuple(query.shape)}, target {tuple(target.shape)}, labels {tuple(labels.shape)}")
        # In float32 even under bf16 autocast (which would cast the products back to bf16): the fused score of
        # three levels reaches ±3, the logits ±3/τ = ±30, where bf16 steps by 0.125.
        with torch.autocast(query.device.type, enabled=False):
            return self._losses(query.float(), target.float(), labels)

    def _losses(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = query @ target.T / self.temperature
        same = labels[:, None] == labels[None, :]
        own = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        logits = logits.masked_fill(own, float("-inf"))  # a batch has two cases at least: no row is all -inf
        positives = same & ~own
        has_pos = positives.any(dim=1)
        log_all = torch.logsumexp(logits, dim=1)
        # The lowest finite value, not -inf, outside the positives: a row without positives then has a finite
        # logsumexp, whose gradient is finite and zeroed by the torch.where below (an all -inf row's is NaN, and
        # would reach the weights if anything but masked_fill's backward stood in between). exp() of it is 0 as
        # exp(-inf) is, so rows with positives get the same values.
        log_pos = torch.logsumexp(logits.masked_fill(~positives, torch.finfo(logits.dtype).min), dim=1)
        # Rows without a positive in the batch are left out by weight, not by indexing: no host sync on the GPU.
        per_row = torch.where(has_pos, log_all - log_pos, torch.zeros_like(log_all))
        contrastive = per_row.sum() / has_pos.sum().clamp(min=1)

        proxy_t, proxy_q = self._proxy_vectors()
        proxy = 0.5 * (
            F.cross_entropy(query @ proxy_t.float().T / self.temperature, labels)
            + F.cross_entropy(target @ proxy_q.float().T / self.temperature, labels)
        )
        return {"contrastive": contrastive, "proxy": proxy, "total": contrastive + self.proxy_weight * proxy}
