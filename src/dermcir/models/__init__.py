"""Models: registries of backbones and text encoders, the per-level heads and the composed retrieval model."""

from __future__ import annotations

from dermcir._lazy import lazy_exports

# The public names, by the module that defines them. They load on first use (PEP 562) instead of here, because the
# model imports torch (seconds): so a config (which checks its backbone's name in the registry) can be built, and
# the command line can check ``--set``, before torch loads.
_MODULES = {
    "dermcir.models.registry": ("create_backbone", "create_text_encoder", "list_backbones", "list_text_encoders"),
    "dermcir.models.retrieval": ("QUERY_MODES", "ComposedRetrievalModel", "Descriptors"),
}

__all__ = [  # the same names, written out for tools that read them without running this module
    "QUERY_MODES", "ComposedRetrievalModel", "Descriptors", "create_backbone", "create_text_encoder",
    "list_backbones", "list_text_encoders",
]

_DEFINED_IN, __getattr__, __dir__ = lazy_exports(__name__, globals(), _MODULES)
