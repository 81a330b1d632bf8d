"""What the frozen-backbone feature cache holds: its views and the grid its maps are pooled to.

Without torch, so that ``get_profile`` checks ``--set grid=…`` and ``--set views=…`` before torch loads; the cache
itself is :class:`dermcir.training.features.CachedFeatures`.
"""

from __future__ import annotations

#: The views of each image whose maps are cached (training samples one per case and epoch); ``views=N`` uses the
#: first N.
VIEWS = ("identity", "hflip", "vflip", "rot180")
#: The maps are cached pooled to at most this many cells per side, independent of the model's own ``grid``.
CACHE_GRID = 16


def check_cached_grid(grid: int | None, cache_grid: int = CACHE_GRID) -> None:
    """Refuse a ``grid`` whose pooling of the cached maps would differ from pooling the native maps (search)."""
    if grid is None or not 1 <= grid <= cache_grid or cache_grid % grid:
        allowed = ", ".join(str(g) for g in range(1, cache_grid + 1) if cache_grid % g == 0)
        raise ValueError(
            f"grid={grid!r}: a model on cached backbone features (the cpu profile, a companion) needs a grid that "
            f"divides {cache_grid} ({allowed}); its maps are cached pooled to {cache_grid}x{cache_grid}, and pooling "
            f"those to another grid gives other maps than the index and search compute from the native ones"
        )
