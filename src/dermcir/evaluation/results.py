"""The benchmark's output files: ``results.json`` (per-fold rows, mean, std) shared by every method."""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from dermcir.metrics import retrieval_metrics

METRICS = ("mAP", "Acc@1", "Acc@2", "Acc@4")
RESULTS = "results.json"


def check_run_folder(out_dir: str | Path, rerun_method: str | None = None) -> None:
    """Refuse to start a run in a folder whose earlier results it would overwrite.

    The composed model's run rewrites ``results.json`` (and ``tables.md``, ``cv.log``) as it goes, after every fold,
    so that a run cut short keeps its finished folds; in a folder that holds an earlier run it would replace that
    run's figures before it finishes, and one that then failed would leave neither. So any earlier ``results.json``
    is refused (``rerun_method`` None), which costs seconds, not a run. A baseline's run replaces its
    ``results.json`` and log only when it completes, so running it again in its own folder is safe: it passes its
    name as ``rerun_method``, and only another method's results are refused. This reads the disk only (no torch),
    so the command line checks it first.

    Raises:
        ValueError: ``out_dir`` is a file, or holds results that the run would overwrite.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: is a file; a run writes its results into a folder")
    results = out_dir / RESULTS
    if not results.exists():
        return
    try:
        doc = json.loads(results.read_text(encoding="utf-8"))
        earlier = doc["method"] if isinstance(doc, dict) and isinstance(doc.get("method"), str) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        earlier = None
    if rerun_method is not None and earlier == rerun_method:
        return
    what = f"the results of an earlier {earlier} run" if earlier else "a results.json that is not a dermcir run's"
    why = ("a new run rewrites results.json after every fold, so it would replace them before it finishes"
           if rerun_method is None else f"a {rerun_method} run would replace them with its own")
    raise ValueError(f"{out_dir}: holds {what} ({results}); {why}. Give a new output folder, or move the earlier "
                     "run away first")


def fold_row(fold: int, scores: np.ndarray, query_labels: Sequence[str], db_labels: Sequence[str]) -> dict[str, Any]:
    """One fold's entry of ``results.json``: sizes, the four metrics (percent) and per-category figures."""
    q = np.asarray(query_labels)
    row: dict[str, Any] = {"fold": fold, "n_queries": len(q), "n_database": len(db_labels)}
    row.update(retrieval_metrics(scores, q, db_labels))
    row["per_category"] = {
        str(cat): retrieval_metrics(scores[q == cat], q[q == cat], db_labels) | {"n_queries": int((q == cat).sum())}
        for cat in sorted(set(q.tolist()))
    }
    return row


def summarize(rows: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and population standard deviation (numpy's, ddof=0) over folds of the four metrics; ``tables.md`` says
    which. (With 5 folds the sample deviation, ddof=1, is 1.118 times larger.)"""
    mean = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
    std = {m: float(np.std([r[m] for r in rows])) for m in METRICS}
    return mean, std


def summarize_per_category(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    cats = sorted({c for r in rows for c in r.get("per_category", {})})
    return {
        c: {m: float(np.mean([r["per_category"][c][m] for r in rows if c in r["per_category"]])) for m in METRICS}
        for c in cats
    }


#: The libraries whose versions a run records: each can change its figures (the README's machine differences).
_RECORDED_PACKAGES = ("torch", "torchvision", "timm", "transformers", "tokenizers", "numpy", "scipy", "scikit-learn",
                      "pillow", "faiss-cpu")


def environment() -> dict[str, Any]:
    """What the run ran on, for ``results.json``: Python, dermcir and the libraries that shape its figures (those
    installed), and CUDA and cuDNN when torch is loaded and a GPU is there. Reads package metadata only (no imports)."""
    from dermcir import __version__

    env: dict[str, Any] = {"python": platform.python_version(), "dermcir": __version__}
    for name in _RECORDED_PACKAGES:
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            pass
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch.version, "cuda", None) and torch.cuda.is_available():  # not on a CPU
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def as_json_values(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as JSON values, sorted by name (a path becomes its text), for the run's records."""
    return json.loads(json.dumps(dict(sorted(settings.items())), default=str))


def settings_given(doc: Mapping[str, Any]) -> str:
    """The settings a composed run was given besides its profile's (``--set``), as ``key=value, ...``; "" for none
    (or a results.json written before they were recorded)."""
    settings = doc.get("settings")
    given = settings.get("overrides") if isinstance(settings, Mapping) else None
    if not isinstance(given, Mapping):
        return ""

    def shown(key: str, value: Any) -> str:
        if not isinstance(value, str):
            return json.dumps(value)
        # a weights path by its last part (lite0_fp16.safetensors, minilm): the folders say where, not what, and
        # settings.pretrained records what by digest
        return Path(value).name if key.endswith("_weights") and value != "hub" else value

    return ", ".join(f"{k}={shown(k, v)}" for k, v in given.items())


def build_results(method: str, rows: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The ``results.json`` document: ``{"method", "folds": [...], "mean", "std", "per_category", **extra}``."""
    mean, std = summarize(rows)
    return {"method": method, "folds": rows, "mean": mean, "std": std,
            "per_category": summarize_per_category(rows), **extra}


def partial_folds(doc: dict[str, Any]) -> list[int] | None:
    """The folds a ``dermcir cv --only-fold`` run covered, or None when it ran the whole split."""
    ran = doc.get("folds_run")
    return list(ran) if ran and len(ran) != doc.get("n_folds") else None


def format_row(name: str, mean: dict[str, float], std: dict[str, float]) -> str:
    """A Markdown table row: ``| name | mAP ± std | Acc@1 ± std | ... |``."""
    return "| " + name + " | " + " | ".join(f"{mean[m]:.1f} ± {std[m]:.1f}" for m in METRICS) + " |"
