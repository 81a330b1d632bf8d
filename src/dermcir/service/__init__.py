"""The web service: a FastAPI app over a loaded :class:`~dermcir.search.CaseSearcher`, and the clinician's page.

Example:
    >>> from dermcir.search import CaseSearcher
    >>> from dermcir.service import create_app, serve
    >>> serve(create_app(CaseSearcher("runs/index")), host="127.0.0.1", port=8000)  # doctest: +SKIP

This package depends on the library; the library never imports it.
"""

from dermcir.service.app import DEFAULT_MAX_UPLOAD_BYTES, NOTICE, create_app
from dermcir.service.server import BackgroundServer, serve

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "NOTICE", "BackgroundServer", "create_app", "serve"]
