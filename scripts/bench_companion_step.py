"""Time one training step of the `gpu` profile's companion (the `cpu` heads on cached maps) at several batch sizes.

At batch 2 the arithmetic is negligible, so the step's time is the framework's per-operation overhead: a floor for
the same step on a GPU, where every operation is also a kernel launch. That floor, times the companion's ~600 steps
per fold, is what fitting it on the GPU would take from the fine-tuned model's time budget (docs/method.md).
Random maps and tokens of the real shapes stand in for the data; the cost does not depend on their values.

Usage: python scripts/bench_companion_step.py [--threads 1] [--batch 2 --batch 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from dermcir.models import ComposedRetrievalModel
from dermcir.training import get_profile
from dermcir.training.features import CachedFeatures
from dermcir.training.trainer import Inputs, _member_loss, _new_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, action="append", default=None)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg, train_cfg, views = get_profile("cpu")
    cfg.categories = ["nevus", "melanoma", "benign keratosis-like"]
    model = ComposedRetrievalModel(cfg)
    n, width = 888, 60
    with torch.no_grad():
        channels = [m.shape[1] for m in model.backbone(torch.zeros(1, 3, 64, 64))]
    maps = [[torch.randn(n, c, cfg.grid, cfg.grid).half() for c in channels] for _ in range(views)]
    pad = torch.zeros(n, width, dtype=torch.bool)
    pad[:, 40:] = True
    inputs = Inputs(CachedFeatures(maps), torch.randn(n, width, model.text_encoder.width), pad, torch.randint(0, 3, (n,)))
    losses = [_new_loss(model, train_cfg, 3) for _ in model.heads]
    heads = [p for name, p in model.named_parameters() if not name.startswith(("backbone.", "text_encoder."))]
    optim = torch.optim.Adam(heads, foreach=True)  # as on CUDA, where Adam uses its multi-tensor path
    model.train()
    model.backbone.eval()
    model.text_encoder.eval()
    for batch in args.batch or [2, 128]:
        idx = torch.arange(batch)

        def step() -> None:
            b_maps, tok, b_pad, y = inputs.take(idx, idx, True, torch.device("cpu"))  # noqa: B023
            loss = sum(_member_loss(h, f, b_maps, tok, b_pad, y, cfg.beta) for h, f in zip(model.heads, losses))
            optim.zero_grad()
            loss.backward()
            optim.step()

        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        print(f"batch {batch}: {1000 * (time.perf_counter() - start) / args.steps:.1f} ms per training step "
              f"({args.threads} thread(s))")


if __name__ == "__main__":
    main()
