"""Benchmark of case search (issue 3, section 6). Not a test: it prints figures and writes them to a JSON file.

Measures, on the machine it runs on:

1. indexing throughput (images/s) of a Derm7pt folder, cold (empty preprocessing cache: decode + border removal +
   resize + encoder) and warm (cache filled: encoder only);
2. end-to-end latency of composed queries against that index (median, 95th percentile): a query image file and its
   checklist text in, ranked results with per-level score parts out (``CaseSearcher.search``), plus the image-only
   and text-only modes;
3. vector-search latency and recall@10 against exact search on synthetic collections (default 100,000 and 1,000,000
   target vectors of the default model's width, 6 × 128), for the exact index and for HNSW at several beam widths.

Without ``--checkpoint`` it uses a random-weight model of the library's default ``ModelConfig`` with grid 8 (lite0 at
512 px with ImageNet weights, MiniLM, grid 8, D = 128, one head set; not the ``cpu`` profile, whose grid is 4 and
D = 64); latency and throughput do not depend on the trained weights.

Usage:
    python scripts/bench_search.py --data ../shared/derm7pt/release_v0 --work /tmp/dermcir-bench \
        [--checkpoint CKPT] [--queries 100] [--sizes 100000 1000000] [--skip-e2e] [--skip-ann]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_search")


def percentiles(seconds: list[float], cpu_seconds: list[float] | None = None) -> dict[str, float]:
    """Median and 95th percentile of wall-clock times; with ``cpu_seconds``, also the median process CPU time (with
    one torch thread this is the wall time the query would take on an otherwise idle core)."""
    ms = np.asarray(seconds) * 1e3
    out = {"median_ms": round(float(np.median(ms)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2), "n": len(ms)}
    if cpu_seconds is not None:
        out["cpu_median_ms"] = round(float(np.median(cpu_seconds)) * 1e3, 2)
    return out


def default_checkpoint(work: Path) -> Path:
    """A random-weight model of the default (CPU-profile) architecture, pretrained backbone and text encoder."""
    from dermcir.checkpoint import save_checkpoint
    from dermcir.config import ModelConfig
    from dermcir.models import ComposedRetrievalModel

    folder = work / "random-default-model"
    if not (folder / "config.json").is_file():
        model = ComposedRetrievalModel(ModelConfig(grid=8), pretrained=True)
        save_checkpoint(model, folder, frozen=("backbone", "text_encoder"))
    return folder


def bench_indexing(cases, checkpoint: Path, work: Path, device: str) -> dict:
    from dermcir.checkpoint import load_checkpoint
    from dermcir.index import build_index, resolve_device

    model = load_checkpoint(checkpoint, resolve_device(device))
    out = {}
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    for label in ("cold", "warm"):
        start = time.perf_counter()
        update = build_index(cases, checkpoint, work / "index", model=model, device=device, cache_dir=cache,
                             overwrite=True)  # the warm pass rebuilds the cold pass's index on purpose
        seconds = time.perf_counter() - start
        out[label] = {
            "images": update.added,
            "seconds": round(seconds, 1),
            "images_per_s": round(update.added / seconds, 2),
            "skipped": len(update.skipped),
        }
        log.info("indexing %s: %s", label, out[label])
    return out


def bench_queries(cases, work: Path, n_queries: int, device: str) -> dict:
    from dermcir.search import CaseSearcher

    searcher = CaseSearcher(work / "index", device=device, auto_reload=False)
    rng = np.random.default_rng(0)
    picks = [cases[i] for i in rng.choice(len(cases), size=min(n_queries, len(cases)), replace=False)]
    for case in picks[:5]:  # warm-up: first passes allocate and pick kernels
        searcher.search(image=case.image, checklist=case.fields, k=10)
    out = {}
    modes = {
        "composed": lambda c: {"image": c.image, "checklist": c.fields},
        "image": lambda c: {"image": c.image},
        "text": lambda c: {"checklist": c.fields},
    }
    for mode, query in modes.items():
        times, cpu = [], []
        for case in picks:
            start, start_cpu = time.perf_counter(), time.process_time()
            response = searcher.search(k=10, **query(case))
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            assert response.mode == mode and len(response.results) == 10
        out[mode] = percentiles(times, cpu)
        log.info("%s queries on %d cases: %s", mode, len(searcher.index), out[mode])
    return out


def synthetic_vectors(n: int, rng: np.random.Generator, centres: np.ndarray, blocks: int, width: int) -> np.ndarray:
    """Clustered target-like vectors: a random centre plus as much Gaussian noise, each of the six blocks unit-norm
    (like φ_t, whose six parts are unit vectors)."""
    out = np.empty((n, blocks * width), np.float32)
    for start in range(0, n, 50_000):
        stop = min(n, start + 50_000)
        x = centres[rng.integers(0, len(centres), stop - start)]
        x = x + rng.standard_normal(x.shape, dtype=np.float32)
        x = x.reshape(-1, blocks, width)
        x /= np.linalg.norm(x, axis=2, keepdims=True)
        out[start:stop] = x.reshape(-1, blocks * width)
    return out


def bench_ann(size: int, n_queries: int, ef_values: list[int], work: Path, m: int, efc: int, seed: int = 0) -> dict:
    """Exact and HNSW search on ``size`` synthetic vectors. The graph is saved in ``work`` and reused by later runs
    with the same size, seed and build settings (building one for 10^6 vectors takes about 10 minutes here)."""
    import faiss

    from dermcir.index._vectors import VectorParams, build_vector_index, search_vectors

    blocks, width, k = 6, 128, 10
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(100, size // 500), blocks * width), dtype=np.float32)
    targets = synthetic_vectors(size, rng, centres, blocks, width)
    queries = synthetic_vectors(n_queries, rng, centres, blocks, width)
    queries[:, : 3 * width] *= 0.6  # β on the local parts, 1 − β on the global parts, as encode_query does
    queries[:, 3 * width :] *= 0.4
    out: dict = {"size": size, "dim": blocks * width, "queries": n_queries, "hnsw_m": m, "ef_construction": efc}

    exact = VectorParams(kind="flat")
    flat = build_vector_index(targets, exact)
    _, truth = search_vectors(flat, queries, k, exact)  # batched ground truth
    times = []
    for q in queries:
        start = time.perf_counter()
        search_vectors(flat, q[None], k, exact)
        times.append(time.perf_counter() - start)
    out["flat"] = percentiles(times)
    log.info("%d vectors, exact: %s", size, out["flat"])
    del flat

    params = VectorParams(kind="hnsw", hnsw_m=m, ef_construction=efc)
    saved = work / f"ann-{size}-seed{seed}-M{m}-efc{efc}.faiss"
    if saved.is_file():
        graph = faiss.read_index(str(saved))
        log.info("%d vectors, HNSW graph reused from %s", size, saved)
    else:
        start = time.perf_counter()
        graph = build_vector_index(targets, params)
        out["hnsw_build_s"] = round(time.perf_counter() - start, 1)
        log.info("%d vectors, HNSW M=%d efConstruction=%d built in %.0f s", size, m, efc, out["hnsw_build_s"])
        faiss.write_index(graph, str(saved))
    del targets
    out["hnsw"] = {}
    for ef in ef_values:
        p = VectorParams(kind="hnsw", hnsw_m=m, ef_construction=efc, ef_search=ef)
        times, found = [], []
        for q in queries:
            start = time.perf_counter()
            _, rows = search_vectors(graph, q[None], k, p)
            times.append(time.perf_counter() - start)
            found.append(rows[0])
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)]))
        out["hnsw"][ef] = {**percentiles(times), "recall@10": round(recall, 4)}
        log.info("%d vectors, HNSW ef_search=%d: %s", size, ef, out["hnsw"][ef])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a Derm7pt release folder (for indexing and query latency)")
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint (default: random-weight default model)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dermcir-bench"), help="scratch folder")
    parser.add_argument("--queries", type=int, default=100, help="queries per measurement")
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000], help="synthetic collection sizes")
    parser.add_argument(
        "--ef", type=int, nargs="*", default=[32, 64, 128, 256, 512, 1024], help="HNSW beam widths to measure"
    )
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree")
    parser.add_argument("--ef-construction", type=int, default=100, help="HNSW build beam width")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--skip-index", action="store_true", help="reuse WORK/index (query latency only)")
    parser.add_argument("--skip-e2e", action="store_true", help="skip indexing and query latency")
    parser.add_argument("--skip-ann", action="store_true", help="skip the synthetic vector-search benchmark")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the figures (default WORK/bench.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the dermcir commands do (see dermcir/cli/search.py)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_start": os.getloadavg(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
    }
    if not args.skip_e2e:
        if args.data is None:
            parser.error("--data is required unless --skip-e2e")
        from dermcir.data import load_derm7pt

        cases, _ = load_derm7pt(args.data)
        checkpoint = args.checkpoint or default_checkpoint(args.work)
        report["checkpoint"] = str(checkpoint) if args.checkpoint else "random-weight default ModelConfig (grid 8, D = 128)"
        if not args.skip_index:
            report["indexing"] = bench_indexing(cases, checkpoint, args.work, args.device)
        report["queries"] = bench_queries(cases, args.work, args.queries, args.device)
    if not args.skip_ann:
        report["vector_search"] = [
            bench_ann(size, args.queries, args.ef, args.work, args.hnsw_m, args.ef_construction) for size in args.sizes
        ]
    report["machine"]["load_average_at_end"] = os.getloadavg()
    out = args.out or args.work / "bench.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
