"""The comparison table: the paper's reported rows beside every row measured here, plus a bar chart.

Input: run folders, each with a ``results.json`` written by :func:`dermcir.evaluation.results.build_results` (the
composed model's ``dermcir cv`` or a baseline's). Each run gives its main row and any ``variants`` (baselines) or
``ablations`` (composed model). Rows whose protocol puts metadata on the database side are an easier task and go in
a separate section, never beside the seed's protocol rows, and are left out of the chart.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermcir.evaluation.results import METRICS, partial_folds, settings_given
from dermcir.files import atomic_write, write_text_atomic

log = logging.getLogger(__name__)

#: Marks a protocol that is not the seed's (see ``dermcir.baselines.METADATA_BOTH_SIDES``).
EASIER_TASK_MARK = "NOT the seed's protocol"


@dataclass(frozen=True)
class PaperRow:
    """A row of the paper's tables; ``mean``/``std`` are ``None`` where the numbers are not available to us."""

    table: str
    name: str
    mean: dict[str, float] | None = None
    std: dict[str, float] | None = None


def _metrics(*values: float) -> dict[str, float]:
    return dict(zip(METRICS, values, strict=True))


#: Only two rows' numbers are known; the others are listed as not available rather than guessed.
PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow("Table 1", "Proposed composed model (Swin-T + BERT, global-local)",
             _metrics(81.7, 79.3, 82.4, 87.3), _metrics(2.7, 2.9, 3.6, 3.2)),
    PaperRow("Table 1", "ResNet50-CosSim (Tschandl et al. 2019)",
             _metrics(80.4, 77.6, 80.9, 83.2), _metrics(2.7, 3.5, 2.6, 1.9)),
    PaperRow("Table 1", "SNF-DCA (Wang et al. 2022)"),
    PaperRow("Table 1", "MaskRCNN-Fusion (Iqbal et al. 2023)"),
    PaperRow("Table 1", "DAHNET (Jiang et al. 2024)"),
    PaperRow("Table 2", "Ablations of the proposed model (query modality, global/local terms)"),
)


@dataclass(frozen=True)
class MeasuredRow:
    """One measured row: a run's main result, or one of its variants/ablations."""

    name: str
    run: str
    protocol: str
    mean: dict[str, float]
    std: dict[str, float]
    fold_map: tuple[float, ...]
    setting: str  # profile, device and time, as far as the run recorded them
    main: bool = True  # the run's own row (not one of its variants or ablations)
    split: str = "?"  # the cases and folds it ran on: "N cases, F folds, seed S"
    other_split: bool = False  # not the split most of the compared runs used (``mark_other_splits``)

    @property
    def seed_protocol(self) -> bool:
        return EASIER_TASK_MARK not in self.protocol and not self.other_split


def mark_other_splits(rows: Sequence[MeasuredRow]) -> list[MeasuredRow]:
    """Mark the rows whose split (cases, folds, seed) differs from the one most runs used.

    Their figures are on other queries and databases, so they are shown apart and left out of the chart, with a
    warning: a run with ``--seed 7`` or another ``--min-cases`` used to sit among the protocol's rows unmarked.
    """
    splits = [r.split for r in rows if r.main]
    common = max(splits, key=splits.count) if splits else None
    marked = []
    for r in rows:
        if r.split != common:
            if r.main:
                log.warning("%s ran on %s, not on %s as the other runs did: shown apart, as not comparable",
                            r.run, r.split, common)
            r = dataclasses.replace(r, other_split=True)
        marked.append(r)
    return marked


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Read and check ``RUN_DIR/results.json`` (or a path to the JSON file itself).

    Raises:
        FileNotFoundError: no results file there.
        ValueError: not JSON, or lacking the ``mean``/``std``/``folds`` entries of the results schema.
    """
    path = Path(run_dir)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (expected a run folder written by 'dermcir cv')")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    _check_doc(doc, str(path))
    return doc


def _check_doc(doc: Any, where: str) -> None:
    """Refuse, naming ``where``, any document whose rows :func:`_row` could not read (it reads every value)."""
    keys = doc.keys() if isinstance(doc, dict) else ()
    missing = [k for k in ("mean", "std", "folds") if k not in keys]
    if missing:
        raise ValueError(f"{where}: not a results document, missing {missing}; expected the schema (folds, mean, std)")
    for key in ("mean", "std"):
        if not isinstance(doc[key], dict):
            # a ValueError like every other defect of the file's content (the CLI prints those as one line)
            raise ValueError(f"{where}: {key!r} must map {list(METRICS)} to numbers, got {doc[key]!r}")  # noqa: TRY004
        missing = [m for m in METRICS if m not in doc[key]]
        if missing:
            raise ValueError(f"{where}: {key!r} lacks {missing}")
        bad = {m: doc[key][m] for m in METRICS if not _is_number(doc[key][m])}
        if bad:
            raise ValueError(f"{where}: {key!r} holds non-numbers {bad}")
    if not isinstance(doc["folds"], list) or not all(isinstance(f, dict) for f in doc["folds"]):
        raise ValueError(f"{where}: 'folds' must be a list of fold rows, got {doc['folds']!r:.80}")
    bad_folds = [i for i, f in enumerate(doc["folds"]) if not _is_number(f.get("mAP"))]
    if bad_folds:
        raise ValueError(f"{where}: folds {bad_folds} lack a numeric 'mAP'")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _setting(doc: dict[str, Any]) -> str:
    parts = []
    if doc.get("profile"):
        given = settings_given(doc)  # --set settings: not the profile itself
        parts.append(f"{doc['profile']} profile" + (f" + {given}" if given else "")
                     + (f" on {doc['device']}" if doc.get("device") else ""))
    if partial := partial_folds(doc):
        stopped = " (the run had not ended)" if doc.get("complete") is False else ""
        parts.append(f"only folds {', '.join(map(str, partial))} of {doc.get('n_folds', '?')}{stopped}")
    if isinstance(doc.get("seconds"), int | float):
        parts.append(f"{doc['seconds']:.0f} s")
    return ", ".join(parts) or "n/a"


def _split(doc: dict[str, Any]) -> str:
    split = f"{doc.get('n_cases', '?')} cases, {doc.get('n_folds', '?')} folds, seed {doc.get('seed', '?')}"
    if partial := partial_folds(doc):  # its means are over those folds' queries only: not comparable with a whole run
        split += f", folds {', '.join(map(str, partial))} only"
    return split


def _row(doc: dict[str, Any], run: str, fallback_name: str, setting: str, split: str = "?") -> MeasuredRow:
    return MeasuredRow(
        name=str(doc.get("display_name") or doc.get("method") or fallback_name), run=run,
        protocol=str(doc.get("protocol", "image + text query, image-only database (the seed's protocol)")),
        mean={m: float(doc["mean"][m]) for m in METRICS}, std={m: float(doc["std"][m]) for m in METRICS},
        fold_map=tuple(float(f["mAP"]) for f in doc["folds"]), setting=setting, split=split,
    )


def measured_rows(doc: dict[str, Any], run: str) -> list[MeasuredRow]:
    """The run's main row, then one per entry of its ``variants`` and ``ablations``."""
    setting, split = _setting(doc), _split(doc)  # variants and ablations ran on their run's split
    rows = [_row(doc, run, run, setting, split)]
    for group in ("variants", "ablations"):
        for key, sub in (doc.get(group) or {}).items():
            if not isinstance(sub, dict) or "mean" not in sub or "folds" not in sub:
                log.warning("%s: %s entry %r is not a results document; left out", run, group, key)
                continue
            _check_doc(sub, f"{run} {group}[{key}]")
            name = sub.get("display_name") or f"{doc.get('display_name') or doc.get('method') or run} [{key}]"
            rows.append(dataclasses.replace(_row(sub | {"display_name": name}, run, key, setting, split), main=False))
    return rows


def _cell(mean: dict[str, float] | None, std: dict[str, float] | None, metric: str) -> str:
    if mean is None or std is None:
        return "n/a"
    return f"{mean[metric]:.1f} ± {std[metric]:.1f}"


def comparison_markdown(rows: Sequence[MeasuredRow], chart_name: str | None, title: str) -> str:
    """The comparison as Markdown: the paper's rows, the seed-protocol rows, then the easier-task rows."""
    head = "| " + " | ".join(METRICS) + " |"
    rule = "| --- " * len(METRICS) + "|"
    lines = [f"# {title}", "", "Percent, mean ± std over the folds. Relevant = same category. n/a = not available.", ""]
    lines += ["## Paper (reported)", "", "| table | method " + head, "| --- | --- " + rule]
    for p in PAPER_ROWS:
        lines.append(f"| {p.table} | {p.name} | " + " | ".join(_cell(p.mean, p.std, m) for m in METRICS) + " |")
    seed = [r for r in rows if r.seed_protocol]
    easier = [r for r in rows if EASIER_TASK_MARK in r.protocol and not r.other_split]
    other = [r for r in rows if r.other_split]
    sections = [("Measured here: the seed's protocol", seed),
                ("Measured here: metadata on the database side too (easier task, not comparable)", easier),
                ("Measured here: another split or set of cases than the rows above (not comparable)", other)]
    for heading, group in sections:
        if not group:
            continue
        lines += ["", f"## {heading}", "",
                  "| method | query / database " + head + " per-fold mAP | setting | run |",
                  "| --- | --- " + rule + " --- | --- | --- |"]
        for r in group:
            cells = " | ".join(_cell(r.mean, r.std, m) for m in METRICS)
            folds = " / ".join(f"{v:.1f}" for v in r.fold_map)
            lines.append(f"| {r.name} | {r.protocol} | {cells} | {folds} | {r.split}; {r.setting} | {r.run} |")
    if chart_name:
        lines += ["", f"![The four metrics (± std): the paper rows that have numbers and each run's main row]({chart_name})"]
    return "\n".join(lines) + "\n"


def chart_series(rows: Sequence[MeasuredRow]) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    """The chart's ``(legend label, mean, std)``: the paper rows that have numbers, then ``rows``."""
    series = [(f"paper: {p.name}", p.mean, p.std) for p in PAPER_ROWS if p.mean is not None and p.std is not None]
    # Runs of one method (the cpu and gpu profiles) share a name: the legend then names the run folder as well.
    shared = {r.name for r in rows if sum(o.name == r.name for o in rows) > 1}
    return series + [(f"{r.name} ({r.run})" if r.name in shared else r.name, r.mean, r.std) for r in rows]


def bar_chart(rows: Sequence[MeasuredRow], path: Path, title: str) -> None:
    """Grouped bars of the four metrics (± std): the paper rows that have numbers (hatched), then ``rows``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = chart_series(rows)
    x = np.arange(len(METRICS))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(series) + 4), 5.5))
    colours = plt.get_cmap("tab20").colors
    for i, (name, mean, std) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [mean[m] for m in METRICS], width,
               yerr=[std[m] for m in METRICS], capsize=2, label=name, color=colours[i % len(colours)],
               hatch="//" if name.startswith("paper:") else None, edgecolor="black", linewidth=0.4)
    ax.set_xticks(x, METRICS)
    ax.set_ylabel("percent")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=7, frameon=False)
    fig.tight_layout()
    with atomic_write(path, binary=True) as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def run_labels(runs: Sequence[str | Path]) -> list[str]:
    """How the table and the chart name each run: its folder's name (the folder holding it, for a ``results.json``
    path); runs whose names collide get as many parent folders as it takes to tell them apart (``a/cv``, ``b/cv``)."""
    folders = [Path(os.path.abspath(r)) for r in runs]
    folders = [f.parent if f.suffix.lower() == ".json" else f for f in folders]
    depths = [1] * len(folders)
    while True:
        labels = ["/".join(f.parts[-d:]).lstrip("/") or str(f) for f, d in zip(folders, depths, strict=True)]
        clash = [i for i, label in enumerate(labels) if depths[i] < len(folders[i].parts) and any(
            other == label and folders[j] != folders[i] for j, other in enumerate(labels))]
        if not clash:  # (a folder given twice is one run, named once)
            return labels
        for i in clash:
            depths[i] += 1


def write_comparison(
    run_dirs: Sequence[str | Path], out: str | Path, title: str = "Case retrieval on Derm7pt: paper vs measured"
) -> tuple[Path, Path]:
    """Write ``out`` (Markdown) and the bar chart beside it (same name, ``.png``); returns both paths.

    Raises:
        ValueError: no run folders, or ``out`` not a ``.md`` path.
        FileNotFoundError: a run folder without ``results.json``.
    """
    out = Path(out)
    if out.suffix.lower() != ".md":
        raise ValueError(f"--out {out}: expected a Markdown file name ending in .md")
    if not run_dirs:
        raise ValueError("no run folders given; pass at least one RUN_DIR with a results.json")
    labels = run_labels(run_dirs)
    rows = mark_other_splits(
        [row for run, label in zip(run_dirs, labels, strict=True) for row in measured_rows(load_results(run), label)])
    png = out.with_suffix(".png")
    # Main rows only: a readable chart; variants and ablations are in the table.
    bar_chart([r for r in rows if r.seed_protocol and r.main], png, title)
    write_text_atomic(out, comparison_markdown(rows, png.name, title))
    log.info("wrote %s and %s (%d measured rows)", out, png, len(rows))
    return out, png
