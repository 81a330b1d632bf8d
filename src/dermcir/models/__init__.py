"""Models: registries of backbones and text encoders, the per-level heads and the composed retrieval model."""

from dermcir.models import backbones as _backbones  # noqa: F401  (registers the backbones)
from dermcir.models import text_encoders as _text_encoders  # noqa: F401  (registers the text encoders)
from dermcir.models.registry import create_backbone, create_text_encoder, list_backbones, list_text_encoders
from dermcir.models.retrieval import QUERY_MODES, ComposedRetrievalModel, Descriptors

__all__ = [
    "QUERY_MODES", "ComposedRetrievalModel", "Descriptors", "create_backbone", "create_text_encoder",
    "list_backbones", "list_text_encoders",
]
