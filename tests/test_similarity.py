import pytest
import torch

from dermcir.similarity import (
    fused_similarity,
    global_descriptor,
    local_descriptor,
    local_similarity,
    query_vector,
    region_descriptors,
    target_vector,
)


def test_region_descriptors_are_attention_weighted_means():
    feats = torch.randn(2, 5, 3)
    logits = torch.zeros(2, 5, 4)  # uniform masks: every region descriptor is the plain mean
    regions = region_descriptors(feats, logits)
    assert regions.shape == (2, 4, 3)
    torch.testing.assert_close(regions[:, 0], global_descriptor(feats))
    peaked = torch.full((2, 5, 1), -1e4)
    peaked[:, 2, 0] = 0
    torch.testing.assert_close(local_descriptor(feats, peaked), feats[:, 2])


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.6, 1.0])
def test_inner_product_equals_fused_formula(beta):
    g = torch.Generator().manual_seed(0)
    ql = [torch.randn(4, 8, generator=g) * 3 for _ in range(3)]
    qg = [torch.randn(4, 8, generator=g) for _ in range(3)]
    tl = [torch.randn(6, 8, generator=g) for _ in range(3)]
    tg = [torch.randn(6, 8, generator=g) * 0.1 for _ in range(3)]
    direct = fused_similarity(ql, tl, qg, tg, beta)
    decomposed = query_vector(ql, qg, beta) @ target_vector(tl, tg).T
    torch.testing.assert_close(decomposed, direct, rtol=1e-5, atol=1e-5)


def test_cosines_ignore_scale():
    a, b = torch.randn(3, 5), torch.randn(2, 5)
    torch.testing.assert_close(local_similarity(a * 7, b), local_similarity(a, b * 0.01))
