"""Time one composed query's encoding (512 px image + checklist text) for each profile's model, on this machine.

The heads' weights do not change the cost, so the models are built with fresh heads; the backbone and text encoder
are the offline defaults. The `gpu` profile is timed with and without its frozen-backbone companion.

Usage: python scripts/bench_encode.py [--threads 2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dermcir.models import ComposedRetrievalModel
from dermcir.training import get_profile

TEXT = ("pigment network atypical, streaks irregular, blue-whitish veil present, elevation flat, location back, "
        "sex male")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    image = np.random.default_rng(0).integers(0, 255, (1, 512, 512, 3), dtype=np.uint8)
    for name, profile, settings in [("cpu profile", "cpu", {}), ("gpu profile without companion", "gpu",
                                     {"companion": None}), ("gpu profile with companion", "gpu", {})]:
        cfg = get_profile(profile, **settings)[0]
        cfg.categories = ["nevus", "melanoma", "benign keratosis-like"]
        model = ComposedRetrievalModel(cfg).eval()
        times = []
        with torch.inference_mode():
            for i in range(3 + args.repeats):  # three warm-up queries
                t = time.perf_counter()
                model.encode_query(image, [TEXT])
                if i >= 3:
                    times.append(time.perf_counter() - t)
        print(f"{name}: median {1e3 * np.median(times):.0f} ms per composed query "
              f"({args.repeats} queries, {args.threads} threads), embedding size {model.embedding_dim}", flush=True)


if __name__ == "__main__":
    main()
