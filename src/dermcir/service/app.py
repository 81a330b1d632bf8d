"""The HTTP API and web page over a :class:`~dermcir.search.CaseSearcher` (loaded once, shared by all requests).

Routes only translate HTTP to library calls and library errors to status codes: 400 for a bad query (unreadable
image, unknown checklist value, empty query...), 404 for an unknown case, 409 for an empty index, 413 for an upload
over the size limit, 415 for a body that is not a form, 503 when too many searches wait, and a JSON 500 for any
other exception (a failure on the service's side, not the client's). Case images are read only from the paths recorded
in the index, looked up by id, and responses name only the image file, never the server's folders (a clinic's folder
names may hold patient names or record numbers).
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import threading
from collections.abc import Callable
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import anyio
import cachetools
import numpy as np
from anyio.lowlevel import RunVar
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from starlette.datastructures import FormData, UploadFile
from starlette.requests import ClientDisconnect

from dermcir import __version__
from dermcir.data.images import ImageError, load_rgb, preprocess
from dermcir.data.text import CHECKLIST_FIELDS, checklist_key
from dermcir.index import CaseIndex, EmptyIndexError
from dermcir.search import MAX_TEXT_CHARS, NOTICE, CaseSearcher, QueryError
from dermcir.service._head import HeadAsGet
from dermcir.service._headers import SecurityHeaders
from dermcir.service._limits import DEFAULT_BODY_TIMEOUT_S, BodySizeLimit, UploadStalled, UploadTooLarge

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # a dermoscopic JPEG is ~0.1-5 MB
#: Searches run at once; the others wait their turn. Each decodes its upload (up to a few hundred MB for a 40 MP image)
#: and runs the model on all the threads torch has, so more at once only adds memory and contention.
DEFAULT_MAX_CONCURRENT_SEARCHES = 2
#: Searches that may wait for a turn; one more is answered 503 at once. Each waiting search holds its upload in memory,
#: and at ~0.2-2 s a search, a longer queue would outlast a browser's patience anyway.
DEFAULT_MAX_WAITING_SEARCHES = 32
MAX_K = 200
STATIC = Path(str(files("dermcir") / "service" / "static"))
_RESERVED = ("image", "text", "k", "heatmaps")


def _search_schema() -> dict[str, Any]:
    """OpenAPI description of the multipart search form (parsed by hand so that errors name the bad field)."""
    props: dict[str, Any] = {
        "image": {"type": "string", "format": "binary", "description": "query image (JPEG, PNG, ...); optional"},
        "text": {"type": "string", "maxLength": MAX_TEXT_CHARS, "description": "free clinical text; optional"},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
        "heatmaps": {"type": "boolean", "default": False, "description": "include attention heatmaps"},
    }
    for name, (phrase, values) in CHECKLIST_FIELDS.items():
        props[name] = {"type": "string", "enum": list(values), "description": f"checklist: {phrase}"}
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": {"type": "object", "properties": props}}},
        }
    }


class ErrorReply(BaseModel):
    """Every error answer of this service (but FastAPI's own 422 for a bad ``size``, whose ``detail`` is a list)."""

    detail: str


def _errors(codes: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses``: each status code with its meaning and the ``{"detail": str}`` body."""
    return {code: {"model": ErrorReply, "description": what} for code, what in codes.items()}


_SEARCH_ERRORS = _errors({
    400: "a bad query: the detail names the file, field or value and what was expected",
    408: "the upload sent nothing for the body timeout (30 s by default); send it again",
    409: "the index holds no cases",
    413: "the request body is over the upload limit",
    415: "the body is not a form",
    500: "the service failed (not the client's error)",
    503: "too many searches are waiting; try again after Retry-After seconds",
})


def _jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


#: The sizes a case image is rendered at; a requested size is rounded up to the next one. Each render decodes the full
#: original, so a client looping over every size from 16 to 1024 renders at most these 8 per case. The page asks 192
#: (thumbnails) and 384 (the comparison).
CASE_IMAGE_SIZES = (64, 128, 192, 256, 384, 512, 768, 1024)
CASE_IMAGE_CACHE_BYTES = 64 * 1024 * 1024  # ~1,000 thumbnails or ~250 full-size renders of photographs


class _JpegCache:
    """Rendered case images, the least recently used dropped once they hold more than ``max_bytes`` (a count bound
    would let 1024-pixel renders of large photographs take hundreds of MB). cachetools' LRU cache does the
    accounting; the lock is ours, since the image route runs in worker threads."""

    def __init__(self, max_bytes: int) -> None:
        self._items: cachetools.LRUCache[tuple, bytes] = cachetools.LRUCache(maxsize=max_bytes, getsizeof=len)
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return int(self._items.currsize)

    @property
    def max_bytes(self) -> int:
        return int(self._items.maxsize)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple, render: Callable[[], bytes]) -> bytes:
        with self._lock:
            data = self._items.get(key)  # a hit becomes the most recently used
        if data is not None:
            return data
        data = render()  # outside the lock: a render takes a while, and rendering one image twice is harmless
        # one render larger than the whole cache is served, not kept
        with self._lock, contextlib.suppress(ValueError):
            self._items[key] = data
        return data


def _parse_k(raw: Any) -> int:
    text = str(raw).strip()
    # ASCII digits only: int() would also take "+5", "1_0" and other scripts' digits, which no form means as k
    # (and no more digits than MAX_K has: int() refuses strings past 4,300 digits with an error of its own)
    if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > len(str(MAX_K)):
        raise QueryError(f"k must be an integer from 1 to {MAX_K}, got {text[:20]!r}")
    k = int(text)
    if not 1 <= k <= MAX_K:
        raise QueryError(f"k must be an integer from 1 to {MAX_K}, got {k}")
    return k


def _parse_flag(name: str, raw: Any) -> bool:
    value = str(raw).strip().lower()
    if value in ("1", "true", "on"):  # "on": an HTML checkbox
        return True
    if value in ("", "0", "false", "off"):
        return False
    raise QueryError(f"{name} must be true or false, got {str(raw)[:20]!r}")


_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_MAX_FIELDS = 64  # the form has 14 fields; more is not a search form


async def _read_query(request: Request) -> dict[str, Any]:
    """The search form → keyword arguments of :meth:`CaseSearcher.search`."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in _FORM_TYPES:  # a JSON body would otherwise read as an empty form: "all were empty"
        raise HTTPException(
            415,
            f"POST /search expects a multipart/form-data form (fields image, text, k, heatmaps and checklist fields), "
            f"got {media_type or 'no Content-Type'}",
        )
    if media_type == "application/x-www-form-urlencoded":  # curl -d, a plain HTML form: no image, only fields
        return await _query_of(await _urlencoded_form(request))
    # As many files as fields are parsed, so that a second image or a file in another field reaches the checks below,
    # which name the field; the body size limit bounds their total. Closing the form deletes spooled upload files.
    # max_part_size: a text part may be as large as the body (which BodySizeLimit bounds), so that an overlong text
    # gets the search's own error, naming the field and its limit, not Starlette's "Part exceeded maximum size of 1024KB"
    async with request.form(max_files=_MAX_FIELDS, max_fields=_MAX_FIELDS,
                            max_part_size=request.app.state.max_upload_bytes) as form:
        return await _query_of(form)


async def _urlencoded_form(request: Request) -> FormData:
    """A URL-encoded body read as UTF-8, as browsers and curl encode it. (Starlette reads it as Latin-1: "lésion"
    reached the model as "lÃ©sion", and changed the ranking, without a word.) Bytes that are not UTF-8 are refused."""
    body = await request.body()  # bounded by BodySizeLimit
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, encoding="utf-8", errors="strict",
                          max_num_fields=_MAX_FIELDS)
    except UnicodeDecodeError as exc:
        raise QueryError(f"the form is not UTF-8 ({exc.reason} at byte {exc.start}); send its fields as UTF-8, "
                         "percent-encoded") from None
    except ValueError as exc:  # more fields than max_num_fields
        raise QueryError(f"the form has too many fields ({exc}); the search form has {len(_RESERVED)} and the "
                         "checklist fields") from None
    return FormData(pairs)


async def _query_of(form: FormData) -> dict[str, Any]:
    """The fields of a parsed form, checked, as keyword arguments of :meth:`CaseSearcher.search`."""
    repeated = sorted({key for key, _ in form.multi_items() if len(form.getlist(key)) > 1})
    if repeated:  # keeping the last value would silently drop what the client also sent
        names = ", ".join(repr(key) for key in repeated)
        raise QueryError(f"field {names} given more than once; give each field once")
    files = sorted({key for key, value in form.multi_items() if key != "image" and isinstance(value, UploadFile)})
    if files:
        raise QueryError(f"field {files[0]!r} must be text, not an uploaded file; only 'image' takes a file")
    upload = form.get("image")
    image = image_name = None
    if isinstance(upload, UploadFile):
        data = await upload.read()
        if data or upload.filename:  # a browser sends an empty part when no file was chosen
            image, image_name = data, upload.filename or "uploaded image"
    elif isinstance(upload, str) and upload:
        raise QueryError("field 'image' must be an uploaded file (multipart file part), not text")
    for name in form:
        # named here, blank or not, so that a mistyped "txt" or "Text" is not silently ignored nor told only about
        # checklist fields
        if name not in _RESERVED and checklist_key(name) not in CHECKLIST_FIELDS:
            raise QueryError(
                f"unknown field {name!r}; the fields are {', '.join(_RESERVED)} and the checklist fields "
                f"{', '.join(CHECKLIST_FIELDS)}"
            )
    # blank values too: validate_checklist takes them as not given, the rule of every interface
    checklist = {k: str(v) for k, v in form.multi_items() if k not in _RESERVED}
    return {
        "image": image,
        "image_name": image_name,
        "text": form.get("text") or None,
        "checklist": checklist,
        "k": _parse_k(form.get("k", 10)),
        "heatmaps": _parse_flag("heatmaps", form.get("heatmaps", "")),
    }


class _Admission:
    """Counts the searches admitted (running or waiting); one beyond ``limit`` is a 503. Checked and counted with no
    ``await`` between, so a burst of requests cannot all pass the check before any of them is counted."""

    def __init__(self, limit: int) -> None:
        self.limit, self.admitted = limit, 0
        self._lock = threading.Lock()  # requests may come from more than one event loop's thread

    def __enter__(self) -> None:
        with self._lock:
            if self.admitted >= self.limit:
                raise HTTPException(
                    503, f"the service is busy: {self.admitted} searches running or waiting; try again shortly",
                    headers={"Retry-After": "5"},
                )
            self.admitted += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.admitted -= 1


def create_app(
    searcher: CaseSearcher, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_concurrent_searches: int = DEFAULT_MAX_CONCURRENT_SEARCHES,
    max_waiting_searches: int = DEFAULT_MAX_WAITING_SEARCHES,
    body_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S,
) -> FastAPI:
    """The FastAPI application: the API under ``/search``, ``/cases``, ``/health`` and the web page at ``/``.

    At most ``max_concurrent_searches`` searches run at once and ``max_waiting_searches`` more wait for a turn; a
    search beyond that is answered 503. A request body that sends nothing for ``body_timeout_s`` is answered 408
    (None: no limit).
    """
    if max_concurrent_searches < 1:
        raise ValueError(f"max_concurrent_searches must be at least 1, got {max_concurrent_searches}")
    if max_waiting_searches < 0:
        raise ValueError(f"max_waiting_searches must be at least 0, got {max_waiting_searches}")
    if body_timeout_s is not None and not body_timeout_s > 0:
        raise ValueError(f"body_timeout_s must be a positive number of seconds or None, got {body_timeout_s}")
    # A search waits for its turn in the event loop, before it gets a worker thread, so a waiting search holds no
    # thread: the other routes (/health, case images, the page) share anyio's 40 worker threads and stay responsive
    # behind any queue. The limiter is one per event loop (uvicorn runs one; a TestClient used without ``with`` runs
    # each request in a loop of its own, and a waiter in one loop is never woken from another). The thread semaphore,
    # taken in the worker thread, keeps the limit across loops; under one loop it never waits.
    loop_slots: RunVar[anyio.CapacityLimiter] = RunVar("dermcir_search_slots")
    thread_slots = threading.BoundedSemaphore(max_concurrent_searches)
    admission = _Admission(max_concurrent_searches + max_waiting_searches)

    def slots() -> anyio.CapacityLimiter:
        try:
            return loop_slots.get()
        except LookupError:
            loop_slots.set(anyio.CapacityLimiter(max_concurrent_searches))
            return loop_slots.get()

    def limited_search(**query: Any):
        with thread_slots:
            return searcher.search(**query)

    app = FastAPI(
        title="dermcir case search",
        version=__version__,
        description=f"Composed image + text search of biopsy-confirmed dermoscopy cases. {NOTICE}",
        # FastAPI's /docs and /redoc pages load their scripts from a CDN, and would be blank on a hospital network
        # without internet access; the schema itself is /openapi.json.
        docs_url=None,
        redoc_url=None,
    )
    app.state.searcher = searcher
    app.state.max_upload_bytes = max_upload_bytes
    app.state.search_admission = admission
    case_images = app.state.case_images = _JpegCache(CASE_IMAGE_CACHE_BYTES)
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes, body_timeout_s=body_timeout_s)
    app.add_middleware(HeadAsGet)  # a HEAD is a GET to everything inside it
    app.add_middleware(SecurityHeaders)  # around all of it: the 413 of BodySizeLimit gets them too
    _add_error_handlers(app, max_upload_bytes)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health", summary="Service and index status")
    def health() -> dict[str, Any]:
        if searcher.auto_reload:
            searcher.refresh()  # report a version published by `dermcir index --add` before any search arrives
        index = searcher.index
        return {
            "status": "ok",
            "cases": len(index),
            "index_version": index.version,
            "fingerprint": index.fingerprint,
            "model": index.manifest["model"],
            "notice": NOTICE,
        }

    @app.get("/checklist", summary="Checklist fields and their allowed values, and the query limits")
    def checklist() -> dict[str, Any]:
        return {
            "fields": {k: {"label": phrase, "values": list(v)} for k, (phrase, v) in CHECKLIST_FIELDS.items()},
            "max_text_chars": MAX_TEXT_CHARS,
            # the real bound on text: checklist phrases and free text together, in the model's tokens (about 4
            # characters each); a longer query is a 400 that gives the count
            "max_text_tokens": searcher.model.text_encoder.max_tokens,
            "max_upload_bytes": max_upload_bytes,
            "max_k": MAX_K,
            "notice": NOTICE,
        }

    @app.post(
        "/search",
        summary="Rank the indexed cases for an image and/or text query",
        openapi_extra=_search_schema(),
        responses=_SEARCH_ERRORS,
    )
    async def search(request: Request) -> dict[str, Any]:
        query = await _read_query(request)
        with admission:  # or a 503 at once, when the queue is full
            async with slots():
                if await request.is_disconnected():  # the client gave up while it waited (the page's Cancel)
                    log.info("POST /search: the client left before its turn; search skipped")
                    # 499: nginx's "client closed request"; nobody is there to read it
                    raise HTTPException(499, "the client left before its search's turn")
                response = await anyio.to_thread.run_sync(partial(limited_search, **query))
        body = response.to_dict()
        index = searcher.index
        for result in body["results"]:
            result["image"] = Path(result["image"]).name
            result["image_url"] = _image_url(result["case_id"], _sha1_of(index, result["case_id"]))
        if response.query_view is not None:
            body["query"]["view"] = "data:image/jpeg;base64," + base64.b64encode(_jpeg(response.query_view)).decode()
        return body

    # Clinic ids may hold "/", "?", "#" or "%" ("2021/0042"): URLs carry the id percent-encoded as one segment, and
    # the routes take a ``path`` so that an id with "/" still matches. The image route is declared first, or the
    # record route would swallow ".../image".
    @app.get(
        "/cases/{case_id:path}/image",
        summary="An indexed case's image as the model saw it (JPEG)",
        responses=_errors({404: "no case with this id, or its image can no longer be read"}),
        description=f"``size`` (16-1024) is rounded up to one of {', '.join(map(str, CASE_IMAGE_SIZES))} pixels.",
    )
    def case_image(
        request: Request, case_id: str, size: int = Query(256, ge=16, le=1024), v: str | None = None
    ) -> Response:
        if not request.scope.get("raw_path", b"/image").endswith(b"/image"):
            # the id itself ends in an encoded "/image" ("x%2Fimage"): a record request
            return JSONResponse(case(f"{case_id}/image"))
        record = _record(searcher, case_id)
        path = record["image"]
        size = next(s for s in CASE_IMAGE_SIZES if s >= size)
        try:
            # keyed by sha1 too, so a replaced image is rendered again
            key = (path, record["sha1"], size)
            data = case_images.get(key, lambda: _jpeg(preprocess(load_rgb(path, name=Path(path).name), size)))
        except ImageError as exc:
            log.warning("case %r: cannot read its image %s: %s", case_id, path, exc)  # the full path: here only
            raise HTTPException(404, f"case {case_id!r}: its image can no longer be read ({exc})") from None
        # image_url carries the image's version (?v=, its sha1's start): a replaced image gets a new URL, so the
        # browser may keep this one. A URL without it, or with an old one, names no fixed image: not to be kept.
        current = v == record["sha1"][:_VERSION_CHARS]
        # private: a patient's image is for this browser's cache, not a shared proxy's
        cache = "private, max-age=86400" if current else "private, no-cache"
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": cache})

    @app.get(
        "/cases/{case_id:path}", summary="An indexed case's record", responses=_errors({404: "no case with this id"})
    )
    def case(case_id: str) -> dict[str, Any]:
        record = _record(searcher, case_id)
        return {**record, "image": Path(record["image"]).name, "image_url": _image_url(case_id, record["sha1"])}

    return app


_VERSION_CHARS = 12


def _image_url(case_id: str, sha1: str | None) -> str:
    url = f"/cases/{quote(case_id, safe='')}/image"
    return f"{url}?v={sha1[:_VERSION_CHARS]}" if sha1 else url


def _sha1_of(index: CaseIndex, case_id: str) -> str | None:
    """The image's sha1 in the live index; None if an update removed the case since the search's snapshot."""
    try:
        return index.record(case_id)["sha1"]
    except KeyError:
        return None


def _record(searcher: CaseSearcher, case_id: str) -> dict[str, Any]:
    try:
        return searcher.case(case_id)
    except KeyError:
        raise HTTPException(404, f"case {case_id!r} is not in the index") from None


def _failed(exc: Exception) -> JSONResponse:
    """The service's own failure: its kind, while its message (which may name the server's files) stays in the log."""
    return JSONResponse({"detail": f"the service failed: {type(exc).__name__} (the service's log has the details)"},
                        status_code=500)


def _add_error_handlers(app: FastAPI, max_upload_bytes: int) -> None:
    @app.exception_handler(EmptyIndexError)
    async def empty_index(_request: Request, exc: EmptyIndexError) -> JSONResponse:
        log.warning("%s", exc)  # with the index's folder, which the answer does not name
        return JSONResponse({"detail": "the index holds no cases; add some with `dermcir index --add`"},
                            status_code=409)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, _exc: ClientDisconnect) -> Response:
        # the client stopped sending its upload (e.g. the page's Cancel): its doing, not a failure of the service
        log.info("%s %s: the client left during its upload", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(QueryError)
    @app.exception_handler(ImageError)
    async def bad_query(_request: Request, exc: ValueError) -> JSONResponse:
        # These name the field or file and what was expected; they are the client's to fix.
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(ValueError)
    async def server_error(request: Request, exc: ValueError) -> JSONResponse:
        # Any other ValueError is the service's own failure (its index or model): not the client's to fix, and
        # answered as JSON so the page can show it.
        log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
        return _failed(exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Anything else (a torch RuntimeError such as CUDA out of memory, MemoryError, OSError) is also the service's
        # failure: the same JSON 500, so a client that parses JSON can report it. Starlette re-raises the exception
        # once this answer is sent, and the server (uvicorn) logs its traceback; this line says which request failed.
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return _failed(exc)

    @app.exception_handler(UploadStalled)
    async def stalled(_request: Request, exc: UploadStalled) -> JSONResponse:
        # the connection is closed after this answer: the rest of a body that stopped arriving is not waited for
        return JSONResponse({"detail": f"{exc}; the upload was given up, send it again"}, status_code=408,
                            headers={"Connection": "close"})

    @app.exception_handler(UploadTooLarge)
    async def too_large(_request: Request, _exc: UploadTooLarge) -> JSONResponse:
        return JSONResponse({"detail": f"request body over the limit of {max_upload_bytes:,} bytes"}, status_code=413)
