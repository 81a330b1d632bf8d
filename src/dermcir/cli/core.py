"""``dermcir prepare | train | cv``: data preparation, training and the k-fold benchmark."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from dermcir.baselines.configs import BASELINE_NAMES
from dermcir.cli._types import positive, whole

log = logging.getLogger("dermcir.cli")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="a Derm7pt release folder (with meta/meta.csv, images/)")
    p.add_argument("--min-cases", type=whole(1), default=50, help="keep categories with at least this many cases")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default $DERMCIR_CACHE or ~/.cache/dermcir)")
    p.add_argument("--profile", choices=("cpu", "gpu"), default="cpu", help="cpu: frozen cached backbone; gpu: fine-tune")
    # numpy's and scikit-learn's seeds are 32-bit: -1 failed after loading, in scikit-learn's words
    p.add_argument("--seed", type=whole(0, 2**32 - 1), default=0,
                   help="random seed, 0 to 4,294,967,295 (default 0): the same seed gives the same run on the same "
                        "machine")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model/training setting, e.g. --set epochs=50 --set n_masks=4 (JSON values)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (shown only on a terminal anyway)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="preprocess and cache the images (and backbone features for --profile cpu)")
    _data_args(p)
    p.set_defaults(handler=cmd_prepare)

    p = sub.add_parser("train", help="train one model on all cases and write a checkpoint folder")
    _data_args(p)
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint already in --out (indexes built with it need `dermcir index --rebuild`)")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("cv", help="run the k-fold retrieval benchmark (results.json, tables.md, retrievals.png)")
    _data_args(p)
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--folds", type=whole(2), default=5, help="number of folds of the stratified split (default 5)")
    p.add_argument("--method", default="composed", choices=("composed", *BASELINE_NAMES),
                   help="the composed model (default) or a re-implemented baseline")
    p.add_argument("--time-budget", type=positive, default=None, metavar="SECONDS",
                   help="composed model: share this wall-clock budget among the folds; a fold whose next epoch would "
                        "overrun its share stops there like early stopping (recorded as 'time budget')")
    p.add_argument("--only-fold", type=whole(0), action="append", default=None, metavar="N", dest="only_folds",
                   help="composed model: run just fold N of the split (repeatable); the means are over those folds "
                        "and results.json lists them as folds_run")
    p.add_argument("--companion-workers", type=whole(0), default=None, metavar="N",
                   help="composed model with a companion (gpu profile): fit the folds' companions in N CPU worker "
                        "processes while the main models train; 0 = in this process, fold by fold (default: 0 on a "
                        "CPU; on a GPU one per fold, as the host's cores allow)")
    p.set_defaults(handler=cmd_cv)


#: Names the commands pass to the run by name, besides ``--set``'s settings: the option that sets each (None: not
#: settable). ``--set seed=1`` reached ``train_on_cases`` twice (a TypeError traceback), and ``--set device=...``
#: was taken as the function's argument without being checked as a setting (a baseline has ``device`` as a
#: setting of its own, which passes).
_OWN_OPTIONS = {
    "profile": "--profile cpu|gpu", "seed": "--seed", "n_folds": "--folds", "cache_dir": "--cache or $DERMCIR_CACHE",
    "progress": "--quiet", "device": "CUDA_VISIBLE_DEVICES= to run on the CPU", "out_dir": "--out",
    "time_budget": "--time-budget", "only_folds": "--only-fold", "companion_workers": "--companion-workers",
    "load_report": None, "cases": None, "method": "--method",
}


def _overrides(pairs: list[str], settings: tuple[str, ...] = ()) -> dict:
    """``--set KEY=VALUE`` pairs as a dict (values read as JSON where they parse). ``settings``: names in
    ``_OWN_OPTIONS`` that are settings of the method at hand (a baseline's ``device``), so they pass."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        if key.strip() in _OWN_OPTIONS and key.strip() not in settings:  # passed by name: a --set copy collides
            option = _OWN_OPTIONS[key.strip()]
            raise ValueError(f"--set {pair!r}: " + (f"use {option}" if option else "not a setting"))
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _settings(args: argparse.Namespace, method: str = "composed") -> dict:
    """``--set``'s settings, checked against ``--profile`` (and a baseline's ``--method``) as the run will check them
    (names and values), before the cases and torch load: a mistyped setting costs a fraction of a second, not the
    seconds of loading them."""
    if method == "composed":
        from dermcir.training.profiles import get_profile  # no torch

        overrides = _overrides(args.set)
        get_profile(args.profile, **overrides)
    else:
        from dermcir.baselines.configs import baseline_config  # no torch

        overrides = _overrides(args.set, settings=("device",))  # a baseline's own setting
        baseline_config(method, args.profile, **overrides)
    return overrides


def _load(args: argparse.Namespace):
    """The release's cases and the loader's report (the rows it left out, for the run's own records)."""
    from dermcir.data import category_counts, load_derm7pt

    cases, report = load_derm7pt(args.data, min_cases=args.min_cases)
    log.info("%d cases from %s: %s", len(cases), args.data, category_counts(cases))  # the loader logged each skip
    if not cases:
        raise ValueError(
            f"{args.data}: no usable cases (rows {report.n_rows}, skipped {len(report.skipped)}, categories under "
            f"--min-cases {args.min_cases}: {report.dropped_categories})"
        )
    return cases, report


def cmd_prepare(args: argparse.Namespace) -> int:
    from dermcir.training.profiles import get_profile  # no torch: a mistyped --set is refused before anything loads

    model_cfg, train_cfg, views = get_profile(args.profile, **_overrides(args.set))
    cases, _ = _load(args)
    from dermcir.data.cache import preprocess_cases
    from dermcir.data.cases import require_query_texts
    from dermcir.models import ComposedRetrievalModel
    from dermcir.training import prepare_inputs
    from dermcir.training.pipeline import default_device, prepare_companion

    n_loaded = len(cases)
    if args.profile == "cpu" or model_cfg.companion is not None:  # their caches hold the texts' tokens too
        require_query_texts(cases)
    cases, images = preprocess_cases(cases, model_cfg.image_size, args.cache, progress=not args.quiet)
    if not cases:  # e.g. a release checked out without its Git LFS contents
        raise ValueError(f"{args.data}: none of the {n_loaded} cases has a usable image (each is listed above)")
    if args.profile == "cpu" or model_cfg.companion is not None:  # cached frozen-backbone maps
        from dermcir.data import category_counts

        model_cfg.categories = list(category_counts(cases))
        model = ComposedRetrievalModel(model_cfg)
        if args.profile == "cpu":
            prepare_inputs(model, cases, images, train_cfg, views, default_device(), args.cache, not args.quiet)
        prepare_companion(model, cases, images, train_cfg, default_device(), args.cache, not args.quiet)
    log.info("prepared %d cases", len(cases))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dermcir.checkpoint_folder import check_checkpoint_target

    # before the import below loads torch: a mistyped --set, --out or --data is named at once (the training checks
    # again, for callers of the Python API)
    overrides = _settings(args)
    check_checkpoint_target(args.out, overwrite=args.overwrite)
    cases, report = _load(args)
    from dermcir.training import train_on_cases

    ckpt = train_on_cases(cases, args.out, profile=args.profile, cache_dir=args.cache, progress=not args.quiet,
                          seed=args.seed, load_report=report, overwrite=args.overwrite, **overrides)
    print(ckpt)
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from dermcir.evaluation.results import check_run_folder

    composed = args.method == "composed"
    if not composed:
        for option, value in (("--time-budget", args.time_budget), ("--only-fold", args.only_folds),
                              ("--companion-workers", args.companion_workers)):
            if value is not None:
                raise ValueError(f"{option} applies to --method composed only")
    # before the cases and torch load: an --out that holds an earlier run is refused in a fraction of a second, and
    # so is a fold the split does not have (it came after ~27 s of loading) (the run code checks both again, for
    # callers of the Python API)
    check_run_folder(args.out, rerun_method=None if composed else args.method)
    for fold in args.only_folds or ():
        if fold >= args.folds:
            raise ValueError(f"--only-fold {fold}: a {args.folds}-fold split has folds 0 to {args.folds - 1}")
    if args.only_folds and len(set(args.only_folds)) != len(args.only_folds):
        raise ValueError(f"--only-fold names a fold twice: {args.only_folds}")
    overrides = _settings(args, args.method)
    cases, report = _load(args)
    if composed:
        from dermcir.evaluation.cv import run_cv

        doc = run_cv(cases, args.out, profile=args.profile, n_folds=args.folds, seed=args.seed, cache_dir=args.cache,
                     progress=not args.quiet, time_budget=args.time_budget, only_folds=args.only_folds,
                     companion_workers=args.companion_workers, load_report=report, **overrides)
    else:
        from dermcir.baselines import run_baseline_cv

        doc = run_baseline_cv(args.method, cases, args.out, n_folds=args.folds, seed=args.seed, profile=args.profile,
                              cache_dir=args.cache, progress=not args.quiet, load_report=report, **overrides)
    print(json.dumps({"out": str(args.out), "mean": doc["mean"], "std": doc["std"]}, indent=2))
    return 0
