"""Does a frozen-backbone companion make the fine-tuned `gpu` recipe's rankings hedge? (an idea for Acc@4)

Per fold of the benchmark's split, trains two models exactly as ``dermcir cv`` would: the ``gpu`` recipe (by default
at 128 px so that it runs on a CPU) and the ``cpu`` profile (frozen ImageNet backbone at 512 px, two head sets). It
saves both models' composed-query and target embeddings, then scores the weighted sum of the two fused scores,
``w · s_gpu + (1 − w) · s_cpu``. That sum is still one inner product (the query vectors scaled by w and 1 − w and
concatenated, the target vectors concatenated), so an index could serve it unchanged. w = 0.5 is the setting fixed
before looking; the other weights show the trade-off.

Usage: OMP_NUM_THREADS=1 python scripts/companion_study.py --data ../shared/derm7pt/release_v0 --fold 0 --fold 1
       --out runs/companion [--set image_size=128] [--set epochs=20] [--weights 0 0.25 0.5 0.75 1]
Re-scoring saved embeddings without training: add ``--score-only`` (reads every ``fold_F.npz`` in --out).
Another initialisation of the cpu model against the same gpu models: ``--cpu-init-seed 1 --reuse-gpu runs/companion``.
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
from dermcir.training import get_profile, prepare_inputs
from dermcir.training.trainer import describe_all, fit, query_embeddings, seed_everything, target_embeddings

METRICS = ("mAP", "Acc@1", "Acc@2", "Acc@4")


def embed_fold(profile: str, overrides: dict, cases, labels, fold: int, n_folds: int, seed: int, cache_dir,
               init_seed: int | None = None):
    """Train ``profile`` on one fold as ``run_cv`` does; return (composed query embeddings, target embeddings).

    ``init_seed``: other initial head weights (the split, the batches and the augmentation stay those of ``seed``)."""
    model_cfg, train_cfg, views = get_profile(profile, seed=seed, **overrides)
    cases, images = preprocess_cases(cases, model_cfg.image_size, cache_dir, progress=False)
    assert [c.category for c in cases] == list(labels), "preprocessing left a case out"
    model_cfg.categories = list(category_counts(cases))
    seed_everything(seed if init_seed is None else init_seed)  # as run_cv: the heads' initial weights follow the seed
    model = ComposedRetrievalModel(model_cfg)
    device = torch.device("cpu")
    inputs = prepare_inputs(model, cases, images, train_cfg, views, device, cache_dir, progress=False)
    db, q = list(stratified_folds(labels, n_folds, seed))[fold]
    train_idx, val_idx = validation_split(db, labels, train_cfg.val_fraction, seed)
    t0 = time.perf_counter()
    result = fit(model, inputs, train_idx, val_idx, train_cfg, device, len(model_cfg.categories), False, refit_idx=db)
    fixed = train_cfg.full_batches
    target = target_embeddings(describe_all(model, inputs, db, device, kinds=("target",), full_batches=fixed)["target"])
    query = query_embeddings(
        describe_all(model, inputs, q, device, kinds=("composed",), full_batches=fixed)["composed"], model_cfg.beta)
    print(f"fold {fold} {profile}: best epoch {result.best_epoch}, {time.perf_counter() - t0:.0f} s", flush=True)
    return query.float().numpy(), target.float().numpy(), db, q, result.best_epoch


def score(path: Path, weights: list[float], labels: np.ndarray) -> dict[float, dict]:
    z = np.load(path)
    s_gpu, s_cpu = z["q_gpu"] @ z["t_gpu"].T, z["q_cpu"] @ z["t_cpu"].T
    return {w: retrieval_metrics(w * s_gpu + (1 - w) * s_cpu, labels[z["q"]], labels[z["db"]]) for w in weights}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fold", type=int, action="append", default=[])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=["image_size=128", "epochs=20"], metavar="KEY=VALUE",
                    help="gpu-recipe override (JSON value); default 128 px, 20 epochs")
    ap.add_argument("--cpu-set", action="append", default=[], metavar="KEY=VALUE",
                    help="cpu-profile override (JSON value); default none, the profile as published")
    ap.add_argument("--weights", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
    ap.add_argument("--score-only", action="store_true")
    ap.add_argument("--cpu-init-seed", type=int, default=None,
                    help="other initial weights for the cpu model (split and batches stay those of --seed)")
    ap.add_argument("--reuse-gpu", type=Path, default=None,
                    help="take the gpu model's embeddings from this earlier --out instead of training it again")
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args()
    overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    cpu_overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.cpu_set)}
    cases, report = load_derm7pt(args.data)
    if report.skipped:
        raise SystemExit(f"the study needs every case; left out: {report.skipped}")
    labels = np.array([c.category for c in cases])
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.score_only:
        for fold in args.fold:
            if args.reuse_gpu is not None:
                z = np.load(args.reuse_gpu / f"fold_{fold}.npz")
                q_g, t_g, db, q, ep_g = z["q_gpu"], z["t_gpu"], z["db"], z["q"], int(z["epochs"][0])
            else:
                q_g, t_g, db, q, ep_g = embed_fold("gpu", overrides, cases, labels, fold, args.folds, args.seed,
                                                   args.cache)
            q_c, t_c, _, _, ep_c = embed_fold("cpu", cpu_overrides, cases, labels, fold, args.folds, args.seed,
                                              args.cache, init_seed=args.cpu_init_seed)
            tmp = args.out / f"fold_{fold}.tmp.npz"
            np.savez(tmp, q_gpu=q_g, t_gpu=t_g, q_cpu=q_c, t_cpu=t_c, db=db, q=q, epochs=[ep_g, ep_c])
            tmp.replace(args.out / f"fold_{fold}.npz")
    rows: dict[float, list[dict]] = {}
    for path in sorted(args.out.glob("fold_[0-9]*.npz")):
        for w, r in score(path, args.weights, labels).items():
            rows.setdefault(w, []).append(r)
            print(f"{path.stem} w={w:<4}: " + " / ".join(f"{r[m]:.1f}" for m in METRICS))
    summary = {}
    for w, rs in rows.items():
        summary[w] = {m: [round(float(np.mean([r[m] for r in rs])), 2), round(float(np.std([r[m] for r in rs])), 2)]
                      for m in METRICS}
        print(f"mean over {len(rs)} folds, w={w:<4}: " + " / ".join(f"{v[0]:.1f} ± {v[1]:.1f}"
                                                                     for v in summary[w].values()))
    folds = [int(p.stem.split("_")[1]) for p in sorted(args.out.glob("fold_[0-9]*.npz"))]
    epochs = {f: np.load(args.out / f"fold_{f}.npz")["epochs"].tolist() for f in folds}  # kept epochs (gpu, cpu)
    per_fold = {w: [{m: round(float(r[m]), 2) for m in METRICS} for r in rs] for w, rs in rows.items()}
    (args.out / "summary.json").write_text(json.dumps({
        "settings": overrides, "cpu_settings": cpu_overrides, "folds": folds, "kept_epochs": epochs,
        "summary": summary, "per_fold": per_fold}, indent=2))


if __name__ == "__main__":
    main()
