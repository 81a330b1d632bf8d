"""A cheap CPU probe of the `gpu` recipe (backbone fine-tuned end to end): one fold, low resolution, a few epochs.

It cannot stand in for the benchmark, but it compares settings of the recipe (e.g. the heads' learning rate) on the
validation split before a GPU lease is spent on them. Prints the validation mAP, Acc@1, Acc@2 and Acc@4 after every
epoch. ``--appearance-weights`` also scores the kept model's validation queries with ``fused + λ · appearance``, where
appearance is the cosine of the untouched ImageNet backbone's pooled maps (an idea for Acc@4; docs/method.md).

Usage: python scripts/gpu_recipe_probe.py --data ../shared/derm7pt/release_v0 --set head_lr=1e-3
       [--image-size 128] [--epochs 12] [--fold 0] [--threads 1] [--appearance-weights 0.5 1 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from dermcir.data import category_counts, load_derm7pt
from dermcir.data.cache import preprocess_cases
from dermcir.data.folds import stratified_folds, validation_split
from dermcir.metrics import retrieval_metrics
from dermcir.models import ComposedRetrievalModel
from dermcir.training import get_profile, prepare_inputs
from dermcir.training.trainer import composed_scores, fit, seed_everything


@torch.no_grad()
def appearance_vectors(model: ComposedRetrievalModel, images: np.ndarray) -> torch.Tensor:
    """Per level, the average-pooled map as a unit vector; concatenated and scaled so that a dot product is the mean
    of the levels' cosines. Call before training: it reads the backbone as loaded."""
    model.eval()
    out = []
    for s in range(0, len(images), 64):
        maps = model.image_features(torch.as_tensor(images[s : s + 64]))
        out.append(torch.cat([F.normalize(m.float().mean(dim=(2, 3)), dim=1) for m in maps], 1) / len(maps) ** 0.5)
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 lets two probes share 2 cores)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="gpu-profile override (JSON value)")
    ap.add_argument("--appearance-weights", type=float, nargs="*", default=[], metavar="λ")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    model_cfg, train_cfg, views = get_profile("gpu", image_size=args.image_size, epochs=args.epochs, refit_epochs=0,
                                              **overrides)
    cases, report = load_derm7pt(args.data)
    cases, images = preprocess_cases(cases, args.image_size, report=report, progress=False)
    labels = np.array([c.category for c in cases])
    model_cfg.categories = list(category_counts(cases))
    seed_everything(train_cfg.seed)
    model = ComposedRetrievalModel(model_cfg)
    device = torch.device("cpu")
    appearance = appearance_vectors(model, images) if args.appearance_weights else None
    inputs = prepare_inputs(model, cases, images, train_cfg, views, device, progress=False)
    db, _ = stratified_folds(labels, 5, train_cfg.seed)[args.fold]  # the test fold is never touched
    train_idx, val_idx = validation_split(db, labels, train_cfg.val_fraction, train_cfg.seed)
    start = time.perf_counter()
    result = fit(model, inputs, train_idx, val_idx, train_cfg, device, len(model_cfg.categories), progress=False)
    out = {"settings": overrides, "image_size": args.image_size, "fold": args.fold,
           "best_epoch": result.best_epoch, "best_val_mAP": round(result.best_val_map, 2),
           **{f"val_{k}": [round(h[f"val_{k}"], 1) for h in result.history] for k in ("mAP", "Acc@1", "Acc@2", "Acc@4")},
           "seconds": round(time.perf_counter() - start)}
    if appearance is not None:
        fused = composed_scores(model, inputs, train_idx, val_idx, device)
        look = (appearance[val_idx] @ appearance[train_idx].T).numpy()
        y = inputs.labels.numpy()
        out["appearance"] = {str(lam): {k: round(v, 1) for k, v in
                                        retrieval_metrics(fused + lam * look, y[val_idx], y[train_idx]).items()}
                             for lam in [0.0, *args.appearance_weights]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
