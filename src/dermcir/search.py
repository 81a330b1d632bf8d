"""Case search from Python: load a checkpoint and its index once, then answer image / text / composed queries.

Example:
    >>> from dermcir.search import CaseSearcher
    >>> searcher = CaseSearcher("runs/index")                       # doctest: +SKIP
    >>> response = searcher.search(image="query.jpg", checklist={"pigment_network": "atypical"}, k=5)  # doctest: +SKIP
    >>> [(r.rank, r.case_id, r.diagnosis, round(r.score, 3)) for r in response.results]  # doctest: +SKIP

A query costs one model pass (``encode_query``) and one vector search; the targets were encoded when indexing. Each
result carries its fused score (Eq. 9), the score's per-level local and global parts (they sum to the score), and, on
request, the attention heatmaps of the query and of the case.
"""

from __future__ import annotations

import logging
import numbers
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dermcir.checkpoint import load_checkpoint
from dermcir.data.images import ImageError, load_rgb, preprocess
from dermcir.data.text import has_visible, render_report, validate_checklist
from dermcir.index import CaseIndex, Hit, attention_heatmaps, open_index, resolve_device
from dermcir.index._store import current_version
from dermcir.index.case_index import load_version

log = logging.getLogger(__name__)

#: Longest accepted free text, checked before tokenizing (a pasted file). The real bound is the model's: a query
#: text (checklist phrases + free text) longer than its ``max_text_tokens`` (96 by default, about 400 characters) is
#: refused with the count, since the model would silently read only its first tokens (``CaseSearcher.search``).
MAX_TEXT_CHARS = 10_000

ImageInput = str | Path | bytes | np.ndarray


class QueryError(ValueError):
    """A query the caller must fix (bad ``k``, unknown checklist value, overlong text, nothing to search with...).

    Kept apart from other ``ValueError`` so that a service answers 400 only for these (and for an unreadable query
    image, :class:`dermcir.data.ImageError`), never for a failure on its own side.
    """


def _heatmap_list(maps: np.ndarray) -> list[list[list[float]]]:
    return np.round(maps.astype(np.float64), 3).tolist()


@dataclass(frozen=True)
class SearchResult:
    """One retrieved case."""

    rank: int
    case_id: str
    image: str  # the indexed image file
    diagnosis: str
    category: str
    score: float  # fused score, Eq. 9
    # local_1..3 and global_1..3 (already weighted by β and 1 − β; with a companion, its parts companion_local_1 …
    # follow, weighted by w); they sum to ``score``
    parts: dict[str, float]
    heatmaps: list[list[list[float]]] | None = None  # per level, the case's attention map (values in [0, 1])

    def to_dict(self) -> dict[str, Any]:
        out = {
            "rank": self.rank,
            "case_id": self.case_id,
            "image": self.image,
            "diagnosis": self.diagnosis,
            "category": self.category,
            "score": self.score,
            # a companion's parts (companion_local_1, …) count towards the same two sums
            "local": sum(v for n, v in self.parts.items() if "local_" in n),
            "global": sum(v for n, v in self.parts.items() if "global_" in n),
            "parts": dict(self.parts),
        }
        if self.heatmaps is not None:
            out["heatmaps"] = self.heatmaps
        return out


@dataclass(frozen=True)
class SearchResponse:
    """The results of one query, with what the query was."""

    mode: str  # "composed", "image" or "text"
    text: str | None  # the text the model read (checklist rendered through the training template + free text)
    k: int
    results: list[SearchResult]
    index_version: str
    index_size: int
    took_ms: float
    query_heatmaps: list[list[list[float]]] | None = None  # per level, where the query's local descriptor looked
    query_view: np.ndarray | None = None  # the preprocessed query image the heatmaps lie on (uint8 H×W×3)

    def to_dict(self) -> dict[str, Any]:
        query: dict[str, Any] = {"mode": self.mode, "text": self.text, "k": self.k}
        if self.query_heatmaps is not None:
            query["heatmaps"] = self.query_heatmaps
        return {
            "notice": NOTICE,  # with the results, wherever they are passed on (the CLI's --json, POST /search)
            "query": query,
            "index": {"version": self.index_version, "cases": self.index_size},
            "took_ms": round(self.took_ms, 2),
            "results": [r.to_dict() for r in self.results],
        }


#: What every set of results carries: dermcir ranks cases for a clinician to compare, it does not diagnose.
NOTICE = "Research tool, not a diagnostic device: results must not be used to diagnose or treat patients."


def compose_text(text: str | None = None, checklist: Mapping[str, str] | None = None) -> str | None:
    """The query text: checklist fields rendered by the training template, followed by any free text.

    Empty or blank input counts as no text, and so does a text of only invisible characters (zero-width spaces,
    control characters: easily pasted in with copied text, and read by the tokenizer as nothing at all). Raises
    :class:`QueryError` for an unknown checklist field or value (listing the allowed ones), for a text longer than
    :data:`MAX_TEXT_CHARS` and for one that is not valid Unicode (a lone surrogate).
    """
    parts = []
    if checklist:
        try:
            fields = validate_checklist(checklist)
        except (TypeError, ValueError) as exc:
            raise QueryError(str(exc)) from None
        rendered = render_report(fields)
        if rendered:
            parts.append(rendered)
    if text is not None:
        if not isinstance(text, str):
            raise QueryError(f"text must be a string, got {type(text).__name__}")
        if len(text) > MAX_TEXT_CHARS:
            raise QueryError(
                f"text is {len(text):,} characters long; the limit is {MAX_TEXT_CHARS:,} (the model reads only the "
                "first ~400 characters); give the clinical description, not a document"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise QueryError(f"text holds a character that is not valid Unicode ({exc.reason} at position {exc.start}); "
                             "send the text as UTF-8") from None
        if has_visible(text):
            parts.append(" ".join(text.split()))
    return " ".join(parts) if parts else None


def _quote(text: str, limit: int = 40) -> str:
    """``text`` for a message: quoted, cut at ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def load_query_image(image: ImageInput, size: int, name: str | None = None) -> np.ndarray:
    """A path, the bytes of an image file, or an ``(H, W, 3)`` uint8 RGB array (not OpenCV's BGR) → the preprocessed
    ``(size, size, 3)`` view.

    Raises:
        dermcir.data.ImageError: an unreadable file, named.
        QueryError: an array of the wrong shape or type, or a blank image (one colour all over).
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise QueryError(f"image array must be uint8 of shape (height, width, 3), got {image.dtype} {image.shape}")
        rgb = image
    elif isinstance(image, (str, bytes, os.PathLike)):
        if isinstance(image, bytes) and not image and name:  # an uploaded file with nothing in it
            raise ImageError(f"{name}: file is empty")
        if isinstance(image, (str, bytes)) and not image:  # "" is a path to the current folder, b"" no file at all
            raise QueryError("image is empty: give a path, the bytes of an image file or a uint8 array, or None "
                             "for a text-only query")
        rgb = load_rgb(image, name=name)
    else:
        raise QueryError(f"image must be a path, the bytes of an image file or a uint8 array, got {type(image).__name__}")
    view = preprocess(rgb, size)
    if float(view.std()) < _BLANK_STD:
        # every such image gives one ranking, with scores that look as confident as a lesion's
        raise QueryError(f"{name or (image if isinstance(image, (str, os.PathLike)) else 'the image')}: blank (one "
                         "colour all over, e.g. all black or fully transparent); give a dermoscopic image, or none "
                         "for a text-only query")
    return view


#: The spread of pixel values (0-255) under which a query image holds no picture. A dermoscopic image's is tens.
_BLANK_STD = 2.0


class CaseSearcher:
    """A checkpoint and its index, loaded once; ``search`` may be called from many threads at once.

    Each request reads the current index snapshot into a local variable and never writes to the searcher, so requests
    share no mutable state. The one exception is the Hugging Face fast tokenizer, which changes its own padding
    settings on every call; text encoding is therefore serialised by a lock (it takes a few milliseconds).

    Args:
        index_dir: the index root folder.
        checkpoint: the model's checkpoint folder (default: the one the index records).
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``...
        auto_reload: pick up a newer index version (published by ``dermcir index --add/--remove``) before each search.

    Raises:
        FileNotFoundError: no index, or the checkpoint is missing.
        FingerprintMismatchError: the checkpoint is not the model that encoded the index.
    """

    def __init__(
        self,
        index_dir: str | Path,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "auto",
        auto_reload: bool = True,
    ) -> None:
        self.root = Path(index_dir)
        index = open_index(self.root)
        self.checkpoint = Path(checkpoint or index.manifest["checkpoint"])
        self.model = load_checkpoint(self.checkpoint, resolve_device(device))
        self.fingerprint = self.model.checkpoint_fingerprint  # computed by load_checkpoint
        index.require_fingerprint(self.fingerprint, f"checkpoint {self.checkpoint}")
        self.auto_reload = auto_reload
        self._index = index
        self._refused: Path | None = None  # a newer version not switched to: another model's, or unreadable
        self._pointer_error: str | None = None  # the last unreadable-CURRENT error logged (logged once)
        self._reload_lock = threading.Lock()
        self._text_lock = threading.Lock()
        log.info("searching %s (%d cases, version %s) with %s", self.root, len(index), index.version, self.checkpoint)

    @property
    def index(self) -> CaseIndex:
        """The index snapshot in use now (immutable)."""
        return self._index

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def _latest(self) -> Path | None:
        """The version CURRENT names; ``None`` when there is none or the pointer cannot be read (logged once)."""
        try:
            return current_version(self.root)
        except (OSError, ValueError) as exc:  # a damaged pointer must not stop searches on the loaded version
            if str(exc) != self._pointer_error:
                self._pointer_error = str(exc)
                log.error("%s; still serving index version %s", exc, self._index.version)
            return None

    def refresh(self) -> bool:
        """Switch to the index's newest published version if there is one; returns whether it switched.

        A version that cannot be loaded (a damaged file, a format from a newer dermcir) or that was encoded by a
        different model is not switched to: searches keep using the last good version, and the refusal is logged once
        (a newer version is tried again). So a service keeps answering correctly until the index or the model is fixed.
        """
        latest = self._latest()
        if latest is None or latest in (self._index.folder, self._refused):
            return False
        # One request loads the new version (2.5 s at 100,000 cases); the others go on answering from the version
        # they have rather than queue behind it (a service's /health and case pages stalled for the whole load).
        if not self._reload_lock.acquire(blocking=False):
            return False
        try:
            latest = self._latest()
            if latest is None or latest in (self._index.folder, self._refused):
                return False
            try:
                index = load_version(latest)
            except Exception as exc:  # noqa: BLE001 - whatever broke that version, the loaded one still answers
                if self._latest() != latest:
                    return False  # superseded (and collected) while loading: the next call tries the newer one
                log.error(
                    "index %s version %s cannot be loaded, still serving %s: %s",
                    self.root,
                    latest.name,
                    self._index.version,
                    exc,
                )
                self._refused = latest
                return False
            if index.fingerprint != self.fingerprint:
                log.error(
                    "index %s version %s was encoded by another model (fingerprint %s); still serving %s",
                    self.root,
                    index.version,
                    index.fingerprint,
                    self._index.version,
                )
                self._refused = index.folder
                return False
            self._index = index
        finally:
            self._reload_lock.release()
        log.info("switched to index version %s (%d cases)", index.version, len(index))
        return True

    def search(
        self,
        image: ImageInput | None = None,
        text: str | None = None,
        checklist: Mapping[str, str] | None = None,
        k: int = 10,
        heatmaps: bool = False,
        beta: float | None = None,
        image_name: str | None = None,
    ) -> SearchResponse:
        """Rank the indexed cases for a composed, image-only or text-only query.

        Args:
            image: the query image (path, file bytes or uint8 array); ``None`` for a text-only query.
            text: free text; blank counts as none.
            checklist: structured fields (``{"pigment_network": "atypical", ...}``) rendered by the training template.
            k: how many cases to return (fewer if the index is smaller).
            heatmaps: include the query's and each case's attention heatmaps.
            beta: weight of the local term (default: the model's β).
            image_name: how to call the image in error messages (e.g. an upload's file name).

        Raises:
            QueryError: no image and no text, bad checklist fields or text, a text longer than the model reads
                (its ``max_text_tokens``, checklist phrases included), a bad ``k``.
            dermcir.data.ImageError: an unreadable query image, named.
            EmptyIndexError: the index holds no cases.
        """
        start = time.perf_counter()
        if self.auto_reload:
            self.refresh()
        index = self._index  # one snapshot for the whole request
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:  # numpy's integers are integers
            raise QueryError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        # as ModelConfig checks the model's own β: outside [0, 1] one term would count against the match, and NaN
        # scores would leave no result at all
        if beta is not None and (isinstance(beta, bool) or not isinstance(beta, numbers.Real)
                                 or not 0.0 <= float(beta) <= 1.0):
            raise QueryError(f"beta must be a number from 0 to 1 (the local term's weight), got {beta!r}")
        query_text = compose_text(text, checklist)
        if query_text is not None:
            self._check_text_readable(query_text, checklist)
        view = load_query_image(image, self.image_size, image_name) if image is not None else None
        if view is None and query_text is None:
            raise QueryError("a query needs an image, a text or checklist fields (all were empty)")
        query, query_maps = self._encode(view, query_text, heatmaps, beta)
        hits = index.search(query[None], k)[0]
        results = [self._result(index, rank, hit, query, heatmaps) for rank, hit in enumerate(hits, start=1)]
        mode = "composed" if view is not None and query_text else ("image" if view is not None else "text")
        return SearchResponse(
            mode,
            query_text,
            k,
            results,
            index.version,
            len(index),
            (time.perf_counter() - start) * 1e3,
            query_maps,
            view if heatmaps else None,
        )

    def _check_text_readable(self, query_text: str, checklist: Mapping[str, str] | None) -> None:
        """Refuse a query text the text encoder cannot read: one of no word it knows, or one longer than it reads
        (the tokenizer would cut it, and the end of a clinician's description would change nothing without a word;
        a full checklist takes 57 of 96 tokens)."""
        encoder = self.model.text_encoder
        tokenizer = encoder.tokenizer
        with self._text_lock:  # the fast tokenizers are not safe to share between threads
            ids = tokenizer(query_text)["input_ids"]
        n = len(ids)
        words = [i for i in ids if i not in tokenizer.all_special_ids]
        if not words or all(i == tokenizer.unk_token_id for i in words):
            # emoji only, a script the vocabulary lacks, one 5,000-letter "word": all read as the one unknown token,
            # so every such text would give the same ranking
            raise QueryError(f"the text {_quote(query_text)} has no word the text encoder knows (it reads it as "
                             "'unknown'); describe the lesion in words")
        if n > encoder.max_tokens:
            # the checklist's share, for the message only (compose_text has validated the checklist already)
            rendered = render_report(validate_checklist(checklist)) if checklist else ""
            with self._text_lock:
                from_checklist = len(encoder.tokenizer(rendered)["input_ids"]) - 2 if rendered else 0
            part = f" (the checklist fields take {from_checklist})" if from_checklist else ""
            # what to cut: the free text, unless there is none or the checklist alone is too long
            fix = ("give fewer checklist fields" if from_checklist + 2 >= encoder.max_tokens
                   else f"shorten the free text by at least {n - encoder.max_tokens} tokens (a token is about 4 "
                        "characters)")
            raise QueryError(
                f"the query text is {n} tokens long; the model reads at most {encoder.max_tokens}{part}: {fix}, or "
                "it would be cut without effect on the ranking"
            )

    @torch.inference_mode()
    def _encode(
        self, view: np.ndarray | None, text: str | None, heatmaps: bool, beta: float | None
    ) -> tuple[np.ndarray, list | None]:
        model = self.model
        tokens = pad = None
        if text is not None:
            with self._text_lock:
                tokens, pad = model.text_features([text])
        images = view[None] if view is not None else None
        vector, masks = model.encode_query_tokens(images, tokens, pad, beta)
        query = vector[0].float().cpu().numpy()
        query_maps = None
        if heatmaps and masks:  # a text-only query has no image to show attention on
            query_maps = _heatmap_list(attention_heatmaps(masks)[0].cpu().numpy())
        return query, query_maps

    @staticmethod
    def _result(index: CaseIndex, rank: int, hit: Hit, query: np.ndarray, heatmaps: bool) -> SearchResult:
        record = index.records[hit.row]
        target = np.asarray(index.vectors[hit.row], dtype=np.float32)
        parts = {name: float(query[a:b] @ target[a:b]) for name, (a, b) in index.manifest["parts"].items()}
        return SearchResult(
            rank,
            record["case_id"],
            record["image"],
            record["diagnosis"],
            record["category"],
            hit.score,
            parts,
            _heatmap_list(index.heatmaps[hit.row]) if heatmaps else None,
        )

    def case(self, case_id: str) -> dict[str, Any]:
        """The stored record of an indexed case. Raises ``KeyError`` naming an unknown id."""
        if self.auto_reload:
            self.refresh()  # a case just added by `dermcir index --add` is found before any search arrives
        return dict(self._index.record(case_id))
