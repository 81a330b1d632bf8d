"""Seed-to-seed variance of the cpu profile, and what averaging head sets buys (the reason for ``members``).

Trains one single-head-set model (``members=1``) per seed on the same folds as ``dermcir cv``, scores each seed on its
own, then scores the ensemble that averages the seeds' unit descriptors — exactly what ``ModelConfig.members`` does
inside one checkpoint (``dermcir.models.retrieval.average_members``). About 10 minutes per seed on 2 CPU cores with
the feature cache warm.

Usage: python scripts/seed_study.py --data ../shared/derm7pt/release_v0 --seeds 1 2 [--out runs/seed_study.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dermcir.data import category_counts, load_derm7pt
from dermcir.data.cache import preprocess_cases
from dermcir.data.folds import stratified_folds, validation_split
from dermcir.metrics import retrieval_metrics
from dermcir.models import ComposedRetrievalModel
from dermcir.models.retrieval import average_members
from dermcir.training import get_profile, prepare_inputs
from dermcir.training.trainer import describe_all, fit, query_embeddings, target_embeddings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/seed_study.json"))
    ap.add_argument("--epochs", type=int, default=None, help="cap the epochs (a quick check of the script)")
    args = ap.parse_args()
    start = time.perf_counter()
    device = torch.device("cpu")
    cases, _ = load_derm7pt(args.data)
    cases, images = preprocess_cases(cases, 512, progress=False)
    labels = np.array([c.category for c in cases])
    models, inputs, train_cfgs = {}, None, {}
    for seed in args.seeds:
        model_cfg, train_cfgs[seed], views = get_profile(
            "cpu", members=1, seed=seed, **({} if args.epochs is None else {"epochs": args.epochs, "refit_epochs": 1}))
        model_cfg.categories = list(category_counts(cases))
        torch.manual_seed(seed)  # a different initialisation per seed, as a second head set would get
        models[seed] = ComposedRetrievalModel(model_cfg)
        if inputs is None:  # frozen backbone and text encoder: the same inputs serve every seed
            inputs = prepare_inputs(models[seed], cases, images, train_cfgs[seed], views, device, progress=False)
    initial = {s: {k: v.clone() for k, v in m.state_dict().items()} for s, m in models.items()}
    rows: dict[str, list[dict]] = {}
    for fold, (db, q) in enumerate(stratified_folds(labels, args.folds, 0)):
        targets, queries = [], []
        for seed, model in models.items():
            model.load_state_dict(initial[seed])
            cfg = train_cfgs[seed]
            train_idx, val_idx = validation_split(db, labels, cfg.val_fraction, 0)
            fit(model, inputs, train_idx, val_idx, cfg, device, len(model.config.categories), False, refit_idx=db)
            targets.append(describe_all(model, inputs, db, device, kinds=("target",))["target"])
            queries.append(describe_all(model, inputs, q, device, kinds=("composed",))["composed"])
        beta = next(iter(models.values())).config.beta
        scored = {f"seed {s}": (queries[i], targets[i]) for i, s in enumerate(models)}
        scored["averaged head sets"] = (average_members(queries), average_members(targets))
        for name, (dq, dt) in scored.items():
            scores = (query_embeddings(dq, beta) @ target_embeddings(dt).T).numpy()
            rows.setdefault(name, []).append(retrieval_metrics(scores, labels[q], labels[db]))
        print(f"fold {fold}:", {k: round(v[-1]["mAP"], 1) for k, v in rows.items()}, flush=True)
    summary = {name: {m: round(float(np.mean([r[m] for r in rs])), 2) for m in rs[0]} for name, rs in rows.items()}
    for name, means in summary.items():
        print(f"{name:>20}: " + "  ".join(f"{m} {v:.1f}" for m, v in means.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "mean": summary, "folds": rows,
                                    "seconds": time.perf_counter() - start}, indent=2))


if __name__ == "__main__":
    main()
