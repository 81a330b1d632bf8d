"""Human-readable outputs of a benchmark run: ``tables.md`` and the retrieval figure."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from dermcir.evaluation.results import METRICS, format_row, partial_folds, settings_given
from dermcir.files import atomic_write, write_text_atomic

#: The seed paper's reported rows (percent, mean ± std over its 5 folds), for side-by-side tables.
PAPER_ROWS: dict[str, tuple[dict[str, float], dict[str, float]]] = {
    "paper: proposed composed model (Swin-T + BERT)": (
        {"mAP": 81.7, "Acc@1": 79.3, "Acc@2": 82.4, "Acc@4": 87.3},
        {"mAP": 2.7, "Acc@1": 2.9, "Acc@2": 3.6, "Acc@4": 3.2},
    ),
    "paper: ResNet50-CosSim": (
        {"mAP": 80.4, "Acc@1": 77.6, "Acc@2": 80.9, "Acc@4": 83.2},
        {"mAP": 2.7, "Acc@1": 3.5, "Acc@2": 2.6, "Acc@4": 1.9},
    ),
}

CATEGORY_COLOURS = {"nevus": "#2e7d32", "melanoma": "#c62828", "benign keratosis-like": "#1565c0"}
_HEADER = "| method | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS)


def write_tables(doc: dict[str, Any], path: Path, paper_rows: dict = PAPER_ROWS) -> None:
    """Table 1 (this run beside the paper's rows), Table 2 (ablations), per-category and per-fold figures."""
    given = settings_given(doc)  # a run with --set settings is not the profile itself, and must not read as it
    name = f"{doc['method']} ({doc['profile']} profile{' + ' + given if given else ''}, this run)"
    lines = [f"# Results: {doc['method']}, {doc['n_folds']}-fold, {doc['n_cases']} cases, seed {doc['seed']}", ""]
    if partial := partial_folds(doc):
        folds = ", ".join(map(str, partial))
        if doc.get("complete") is False:  # written after each fold; a run stopped part-way leaves this
            note = (f"The run had not ended when this was written: {len(partial)} of {doc['n_folds']} folds were "
                    f"done (fold {folds}), and every mean below is over those only.")
        else:
            note = (f"Only folds {folds} of {doc['n_folds']} ran: every mean below is over those folds, "
                    "not over the whole benchmark.")
        lines += [note, ""]
    n = len(doc["folds"])
    ratio = (f"; the sample one, ddof = 1, is {np.sqrt(n / (n - 1)):.3f} times larger for {n} folds" if n > 1
             else "")
    lines += ["## Table 1: comparison (percent, mean ± std over folds)", "",
              (f"std: this run's is the population standard deviation over folds (ddof = 0{ratio}). The paper "
               "does not say which it reports."), "", _HEADER]
    lines += [format_row(n, m, s) for n, (m, s) in paper_rows.items()]
    lines += [format_row(f"**{name}**", doc["mean"], doc["std"]), ""]
    if doc.get("ablations"):
        lines += ["## Table 2: ablations (same trained models; query mode and β changed at evaluation)", "", _HEADER]
        # the run's own β (a results.json from before it was recorded does not say)
        beta = f", beta={doc['beta']:g}" if isinstance(doc.get("beta"), int | float) else ""
        lines.append(format_row(f"composed{beta} (the main result)", doc["mean"], doc["std"]))
        lines += [format_row(n, a["mean"], a["std"]) for n, a in doc["ablations"].items()]
        lines.append("")
    lines += ["## Per category (composed, mean over folds)", "", _HEADER.replace("method", "category")]
    lines += ["| " + c + " | " + " | ".join(f"{v[m]:.1f}" for m in METRICS) + " |" for c, v in doc["per_category"].items()]
    lines += ["", "## Per fold (composed)", "", "| fold | queries | database | " + " | ".join(METRICS) + " |",
              "|---|---|---|" + "---|" * len(METRICS)]
    lines += [f"| {r['fold']} | {r['n_queries']} | {r['n_database']} | " + " | ".join(f"{r[m]:.1f}" for m in METRICS)
              + " |" for r in doc["folds"]]
    if doc.get("training"):
        companion = all("companion_best_epoch" in t for t in doc["training"])
        extra = (" companion: best epoch | epochs run | stopped by | validation mAP | seconds |" if companion
                 else "")
        lines += ["", "## Training per fold", "",
                  "| fold | best epoch | epochs run | stopped by | validation mAP | seconds |" + extra,
                  "|---|---|---|---|---|---|" + ("---|---|---|---|---|" if companion else "")]
        for t in doc["training"]:
            row = (f"| {t['fold']} | {t['best_epoch']} | {t['epochs_run']} | {t['stopped_by']} | {t['val_mAP']:.1f} | "
                   f"{t['train_seconds']:.0f} |")
            if companion:
                # results written before these two were recorded show "?"
                row += (f" {t['companion_best_epoch']} | {t.get('companion_epochs_run', '?')} | "
                        f"{t.get('companion_stopped_by', '?')} | {t['companion_val_mAP']:.1f} | "
                        f"{t['companion_train_seconds']:.0f} |")
            lines.append(row)
    if "seconds" in doc:
        budget = f" (time budget {doc['time_budget']:.0f} s)" if doc.get("time_budget") else ""
        lines += ["", f"Wall time: {doc['seconds']:.0f} s on {doc.get('device', '?')}{budget}."]
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_retrieval_figure(
    example: dict[str, Any], cases: list, images: np.ndarray, labels: np.ndarray, path: Path, top: int = 5
) -> None:
    """The paper's Fig. 4: per category, one query (image + text) and its top retrieved images, framed by category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q_idx, db_idx, scores = example["query"], example["database"], example["scores"]
    cats = [c for c in CATEGORY_COLOURS if c in set(labels[q_idx])] + sorted(
        set(labels[q_idx]) - set(CATEGORY_COLOURS))
    fig, axes = plt.subplots(len(cats), top + 2, figsize=(2.2 * (top + 2), 2.6 * len(cats)), squeeze=False)
    for row, cat in enumerate(cats):
        i = int(np.flatnonzero(labels[q_idx] == cat)[0])  # the fold's first query of this category
        case = cases[q_idx[i]]
        _show(axes[row, 0], images[q_idx[i]], f"query: {cat}", CATEGORY_COLOURS.get(cat, "#555555"))
        axes[row, 1].axis("off")
        axes[row, 1].text(0, 1, textwrap.fill(case.text, 34), va="top", fontsize=6.5, transform=axes[row, 1].transAxes)
        for r, j in enumerate(np.argsort(-scores[i], kind="stable")[:top]):
            k = db_idx[j]
            _show(axes[row, r + 2], images[k], f"#{r + 1} {labels[k]}\n{scores[i, j]:.2f}",
                  CATEGORY_COLOURS.get(labels[k], "#555555"))
    fig.suptitle(f"Top-{top} retrievals, fold {example['fold']} (frame colour = category)")
    fig.tight_layout()
    with atomic_write(path, binary=True) as fh:
        fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)


def _show(ax, image: np.ndarray, title: str, colour: str) -> None:
    ax.imshow(image)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(4)
