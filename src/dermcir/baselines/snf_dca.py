"""SNF-DCA (Wang et al., Biomed Signal Process Control 2022): similarity networks built from image features and from
the structured metadata, fused by Similarity Network Fusion (``snfpy``), then a community step: the database cases in
the query's community of the fused network are ranked first, each group by fused similarity.

The published design puts metadata on every node, database included. That is an easier task than the seed's
protocol (shared/REFERENCE.md), so it is reported only as a labelled variant. The primary row keeps the database
image-only: a database case's metadata channel holds the checklist values *predicted from its image* by logistic
regressions fitted on the other database cases (cross-fitted, so no case sees its own metadata), while the query
carries its true checklist values.

Nodes of a fold's networks are its database and query cases together (SNF is transductive; no query label is
read). Image features: the frozen ImageNet penultimate features of EfficientNet-Lite0, or of the ``backbone``
setting's CNN (224 px on ``cpu``, 448 px on ``gpu``), z-scored and reduced by PCA fitted on the database. snfpy's
affinity step then z-scores every column of each channel over all the fold's nodes, database and queries (no label
is read): like the graph itself, that normalisation is transductive, and on the image channel it also whitens the
PCA components.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dermcir.baselines._base import (
    IMAGE_ONLY_DATABASE,
    METADATA_BOTH_SIDES,
    Baseline,
    BaselineData,
    register_baseline,
)
from dermcir.baselines._features import frozen_features
from dermcir.baselines._metadata import predict_metadata
from dermcir.baselines._nets import build_backbone
from dermcir.baselines.configs import METHOD_PROFILES, SnfConfig

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _snfpy_compat() -> Iterator[None]:
    """Let snfpy 0.2.2 run on scikit-learn >= 1.8, which renamed ``force_all_finite`` to ``ensure_all_finite``.

    Only snfpy's own reference to ``check_array`` is swapped, and only inside this block.
    """
    import snf.compute as snf_compute
    from sklearn.utils.validation import check_array

    def check_array_compat(*args: Any, force_all_finite: bool | str = True, **kwargs: Any) -> Any:
        return check_array(*args, ensure_all_finite=force_all_finite, **kwargs)

    original = snf_compute.check_array
    snf_compute.check_array = check_array_compat
    try:
        yield
    finally:
        snf_compute.check_array = original


def fuse_networks(channels: list[np.ndarray], k: int, mu: float, t: int) -> np.ndarray:
    """Similarity Network Fusion of one affinity network per feature channel (rows = nodes)."""
    import snf

    if len({len(c) for c in channels}) != 1:
        raise ValueError(f"every channel needs one row per node, got {[len(c) for c in channels]}")
    n = len(channels[0])
    k = max(1, min(k, n - 1))
    with _snfpy_compat():
        # normalize=True: each column z-scored over all nodes given (database + queries), as SNF's authors do
        affinities = snf.make_affinity(*channels, metric="sqeuclidean", K=k, mu=mu, normalize=True)
        if len(channels) == 1:
            return np.asarray(affinities)
        return snf.snf(*affinities, K=k, t=t)


def knn_communities(similarity: np.ndarray, k: int, resolution: float, seed: int) -> np.ndarray:
    """Community id of every node: Louvain modularity on the symmetrised k-nearest-neighbour graph of ``similarity``."""
    import networkx as nx

    n = len(similarity)
    sim = similarity.copy()
    np.fill_diagonal(sim, -np.inf)
    k = max(1, min(k, n - 1))
    neighbours = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    for i in range(n):
        for j in neighbours[i]:
            graph.add_edge(i, int(j), weight=float(max(similarity[i, j], 0.0)))
    communities = nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
    labels = np.empty(n, dtype=np.int64)
    for c, members in enumerate(communities):
        labels[list(members)] = c
    return labels


def community_scores(fused: np.ndarray, communities: np.ndarray, n_db: int) -> np.ndarray:
    """Query-vs-database scores: same community first, then by fused similarity (nodes: database, then queries)."""
    sim = fused[n_db:, :n_db]
    sim = sim / np.maximum(sim.max(axis=1, keepdims=True), 1e-12)  # each query's row in [0, 1]
    same = communities[n_db:, None] == communities[None, :n_db]
    return 2.0 * same + sim


@register_baseline
class SnfDca(Baseline):
    """See the module docstring."""

    name = "snf-dca"
    config_class = SnfConfig
    profiles = METHOD_PROFILES[name]
    config: SnfConfig

    @property
    def display_name(self) -> str:
        return f"SNF-DCA ({self.config.backbone_short} image features + checklist; Louvain communities)"

    @property
    def variants(self) -> dict[str, str]:
        return {
            "main": f"image + metadata query, {IMAGE_ONLY_DATABASE}: database metadata predicted from its image",
            "metadata-both-sides": f"image + metadata query, {METADATA_BOTH_SIDES} (the published design)",
            "no-community": f"ablation of the main row without the community step (SNF similarity only), "
                            f"{IMAGE_ONLY_DATABASE}",
        }

    @property
    def deviations(self) -> str:
        return ("Dermoscopic image + checklist channels only (no clinical-photo channel); frozen "
                f"{self.config.backbone_label} features; the community step is Louvain modularity on the fused k-NN graph (the paper's exact "
                "'deep community analysis' was not available here); the seed-protocol row predicts the database's "
                "metadata from its image instead of reading it.")

    def prepare(self, data: BaselineData) -> None:
        self.data = data
        backbone = build_backbone(self.config.backbone, self.config.backbone_weights, self.config.pretrained)
        self.features = frozen_features(
            backbone, data.images, self.device, self.config.batch_size, data.cache_dir, data.progress,
        )

    def _image_channel(self, db_idx: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        n_comp = max(1, min(self.config.image_pca, self.features.shape[1], len(db_idx) - 1))
        reduce = make_pipeline(StandardScaler(), PCA(n_comp, random_state=self.data.seed))
        return reduce.fit(self.features[db_idx]).transform(self.features[nodes])

    def _ranked(self, channels: list[np.ndarray], n_db: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        fused = fuse_networks(channels, cfg.k, cfg.mu, cfg.t)
        communities = knn_communities(fused, cfg.community_k, cfg.resolution, seed=self.data.seed * 1000 + fold)
        log.info("fold %d: %d communities over %d nodes", fold, communities.max() + 1, len(communities))
        return community_scores(fused, communities, n_db), fused

    def fold_scores(self, fold: int, db_idx: np.ndarray, q_idx: np.ndarray) -> dict[str, np.ndarray]:
        nodes = np.concatenate([db_idx, q_idx])
        n_db = len(db_idx)
        image = self._image_channel(db_idx, nodes)
        predicted = predict_metadata(self.features, self.data.metadata, db_idx, self.config.cross_fit,
                                     seed=self.data.seed)
        meta_seed_protocol = np.concatenate([predicted, self.data.metadata[q_idx]])
        main, fused = self._ranked([image, meta_seed_protocol], n_db, fold)
        both, _ = self._ranked([image, self.data.metadata[nodes]], n_db, fold)
        return {"main": main, "metadata-both-sides": both, "no-community": fused[n_db:, :n_db]}
