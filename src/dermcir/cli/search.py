"""``dermcir index | search | serve | demo``: build and update a case index, query it, serve it, and the one-command demo.

Each handler is a thin wrapper over :mod:`dermcir.index`, :mod:`dermcir.search` and :mod:`dermcir.service`; heavy
imports happen inside the handlers so ``dermcir --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dermcir.cli._memory import keep_freed_buffers
from dermcir.cli._types import device, positive, whole
from dermcir.cli._waits import run_in_child, wait_passively

log = logging.getLogger("dermcir.cli")
# faiss reports at INFO every optimised build it could not load, which is noise on the command line.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

NOTICE = "Research tool, not a diagnostic device."


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands."""
    _register_index(sub)
    _register_search(sub)
    _register_serve(sub)
    _register_demo(sub)


def _register_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="build a case index, or add/remove cases in one",
        description="Encode cases with a checkpoint and write (or update) an index folder atomically.",
    )
    p.add_argument("--out", required=True, type=Path, help="the index folder to create or update")
    p.add_argument(
        "--data",
        type=Path,
        help="a Derm7pt release folder, or a CSV with id,image,diagnosis[,checklist] (or a folder holding one CSV)",
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (for --add: default the index's own)")
    p.add_argument("--image-root", type=Path, help="folder the CSV's image paths are relative to (default: its folder)")
    p.add_argument(
        "--min-cases",
        type=whole(1),
        help="keep categories with at least this many cases (default for a Derm7pt release: the threshold the "
        "checkpoint was trained with, else 50; for a CSV: 1)",
    )
    p.add_argument("--add", action="store_true", help="add the --data cases to the existing index")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="replace an existing non-empty index by one of the --data cases alone (without it, that is refused)",
    )
    p.add_argument("--replace", action="store_true", help="with --add: re-encode cases whose id is already indexed")
    p.add_argument("--remove", nargs="+", metavar="ID", help="remove these case ids from the index")
    # Build-only options default to None so that giving one with --add/--remove can be refused (an update keeps the
    # index's own settings); the defaults are VectorParams' own.
    p.add_argument(
        "--kind",
        choices=("flat", "hnsw"),
        help="vector search: exact inner product (default) or HNSW for large collections",
    )
    p.add_argument("--hnsw-m", type=whole(2), help="HNSW graph degree (default 32)")
    p.add_argument("--ef-construction", type=whole(1), help="HNSW build beam width (default 100)")
    p.add_argument("--ef-search", type=whole(1), help="HNSW search beam width (default 128)")
    p.add_argument("--batch-size", type=whole(1), help="images per encoder pass (default 32 on a GPU, 4 on a CPU)")
    # default None so that --remove, which encodes nothing, can refuse it
    p.add_argument("--device", type=device, help="auto (CUDA when present; the default), cpu, cuda or cuda:N")
    p.add_argument("--cache", type=Path, default=None, help="preprocessing cache (default $DERMCIR_CACHE)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (shown only on a terminal anyway)")
    _threads_arg(p)
    p.set_defaults(handler=cmd_index)


def _register_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="rank the indexed cases for an image and/or text query",
        description=f"Composed, image-only or text-only case search. {NOTICE}",
    )
    p.add_argument("--index", required=True, type=Path, help="the index folder")
    p.add_argument("--image", type=Path, help="the query's dermoscopic image (leave out for a text-only query)")
    p.add_argument("--text", help="free clinical text")
    p.add_argument(
        "--checklist",
        nargs="+",
        action="extend",
        default=[],
        metavar="FIELD=VALUE",
        help='checklist fields, e.g. --checklist pigment_network=atypical "streaks=irregular"',
    )
    p.add_argument("-k", type=whole(1), default=10, help="how many cases to return")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--heatmaps", action="store_true", help="include attention heatmaps (needs --json)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: the one the index was built with)")
    p.add_argument("--device", type=device, default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    _threads_arg(p)
    p.set_defaults(handler=cmd_search)


def _register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the HTTP API and the web page over an index")
    _serve_args(p)
    p.add_argument("--index", required=True, type=Path, help="the index folder")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: the one the index was built with)")
    p.add_argument("--device", type=device, default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.set_defaults(handler=cmd_serve)


def _register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train (CPU profile), index and serve a Derm7pt folder: the first thing to run",
        description="Trains a model with the CPU profile (or reuses the one in --out), builds the index "
        "and starts the web page, printing its address.",
    )
    p.add_argument("--data", required=True, type=Path, help="a Derm7pt release folder (meta/meta.csv, images/)")
    p.add_argument("--out", type=Path, default=Path("dermcir-demo"), help="folder for the model and the index")
    p.add_argument("--min-cases", type=whole(1), default=50, help="keep categories with at least this many cases")
    p.add_argument("--cache", type=Path, default=None, help="preprocessing cache (default $DERMCIR_CACHE)")
    _serve_args(p)
    p.set_defaults(handler=cmd_demo)


def _port(text: str) -> int:
    # checked here, not when binding: the model and the index are loaded first, which takes a while
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {port}")
    return port


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (0 picks a free one)")
    p.add_argument("--max-upload-mb", type=positive, default=10.0, help="largest accepted request body")
    p.add_argument("--max-concurrent", type=whole(1), default=2,
                   help="searches run at once, the others wait (each decodes its upload and uses all --threads)")
    p.add_argument("--max-waiting", type=whole(0), default=32,
                   help="searches that may wait for a turn; one more is answered 503 (each holds its upload)")
    p.add_argument("--max-connections", type=whole(1), default=None,
                   help="at most this many open connections (page, images, searches, uploads still arriving); a "
                        "request beyond them is answered 503 (default: no bound; idle connections count too, so a "
                        "reverse proxy in front is the place to limit connections per client)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name to answer besides the address itself: on a loopback address, also NAME (e.g. a "
                        "reverse proxy that passes its clients' Host on); on another address, only the NAMEs given "
                        "(without any, every name is answered); repeatable")
    _threads_arg(p)


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=whole(1),
        default=None,
        help="CPU threads per model pass (default: all cores; 1 is faster on a machine busy with other jobs)",
    )


def _apply_threads(args: argparse.Namespace) -> None:
    # Idle OpenMP threads sleep instead of spinning (see _waits). Takes effect only before torch is first imported,
    # which the handlers do after this call.
    wait_passively()
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


# ---- handlers ---------------------------------------------------------------------------------------------------------
def _load_cases(data: Path, image_root: Path | None, min_cases: int | None):
    """A Derm7pt release folder, a CSV of cases, or a folder of images holding exactly one CSV of cases.

    Returns the cases and the loader's report (rows and missing image files left out, each already logged), which
    goes on to the build so that its summary lists them with the images that fail to decode.
    """
    from dermcir.data import category_counts, load_case_csv, load_derm7pt

    csv = data if data.is_file() and data.suffix.lower() == ".csv" else None
    if csv is None and data.is_dir() and not _is_release(data):
        found = sorted(data.glob("*.csv"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"{data}: not a Derm7pt release (no meta/meta.csv) and holds {len(found)} CSV files; "
                "pass the cases CSV itself with --data"
            )
        csv = found[0]
    if csv is not None:
        cases, report = load_case_csv(csv, image_root, min_cases=min_cases or 1)
    elif data.is_dir():
        if image_root is not None:  # a release's image paths are relative to its own images/ folder
            raise ValueError(
                f"--image-root applies to a CSV of cases; {data} is a Derm7pt release, whose images are read from "
                "its images/ folder"
            )
        cases, report = load_derm7pt(data, min_cases=50 if min_cases is None else min_cases)
    else:
        raise FileNotFoundError(
            f"{data}: expected a Derm7pt release folder, a .csv file of cases, or a folder with one"
        )
    log.info("%d cases from %s: %s", len(cases), csv or data, category_counts(cases))
    return cases, report


def _is_release(data: Path) -> bool:
    return data.is_dir() and (data / "meta" / "meta.csv").is_file()


def _training_min_cases(checkpoint: Path | None, index_root: Path | None) -> int | None:
    """The category threshold the model was trained with (recorded in its checkpoint), as an index's default: with a
    fixed 50, a model trained with ``--min-cases 10`` indexed a release without the categories it had learnt.

    ``checkpoint``: the one given; else the one recorded in the index at ``index_root`` (an ``--add``). ``None`` when
    neither records a threshold (a checkpoint trained on a CSV, or before thresholds were recorded): the loader's
    default then applies.
    """
    from dermcir.checkpoint_folder import CONFIG, read_config

    if checkpoint is None and index_root is not None:
        from dermcir.index._store import live_version
        from dermcir.index.case_index import read_manifest

        checkpoint = Path(read_manifest(live_version(index_root))["checkpoint"])
    if checkpoint is None or not (checkpoint / CONFIG).is_file():
        return None  # (a moved checkpoint of an --add is named when the index opens)
    left_out = read_config(checkpoint).get("categories_left_out")
    threshold = left_out.get("min_cases") if isinstance(left_out, dict) else None
    if isinstance(threshold, int) and not isinstance(threshold, bool) and threshold >= 1:
        log.info("--min-cases %d: the threshold %s was trained with", threshold, checkpoint)
        return threshold
    return None


def _print_update(what: str, update, fields_left_out: list[tuple[str, str]] = ()) -> None:
    """One summary line: what changed, the rows and images left out (the first five of each list), and the checklist
    values left out of cases that were kept (a clinic CSV's values outside a field's allowed ones)."""
    skipped = (
        f"; skipped {len(update.skipped)}: " + "; ".join(f"{w} ({r})" for w, r in update.skipped[:5])
        if update.skipped
        else ""
    )
    fields = (
        f"; checklist values left out of kept cases {len(fields_left_out)}: "
        + "; ".join(f"{w} ({r})" for w, r in fields_left_out[:5])
        if fields_left_out
        else ""
    )
    print(
        f"{what}: {update.root} version {update.version}: +{update.added} -{update.removed}, "
        f"{update.total} cases{skipped}{fields}"
    )


def cmd_index(args: argparse.Namespace) -> int:
    # Option mistakes are refused before torch and the index code load (seconds).
    if args.replace and not args.add:  # without --add this would rebuild the index from the new cases alone
        raise ValueError(
            "--replace works only with --add (it re-encodes cases already in the index); without --add the index "
            "would be rebuilt from the --data cases alone"
        )
    if args.rebuild and (args.add or args.remove):
        raise ValueError("--rebuild is for building an index anew; it does not go with --add or --remove")
    vector_options = {
        "kind": args.kind,
        "hnsw_m": args.hnsw_m,
        "ef_construction": args.ef_construction,
        "ef_search": args.ef_search,
    }
    given = {name: value for name, value in vector_options.items() if value is not None}
    if given and (args.add or args.remove):
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(
            f"{options}: only for building an index; --add and --remove keep the index's own vector-search settings "
            "(rebuild it without --add to change them)"
        )
    # The folders and the cases are read before torch loads too (the index code checks them again, for callers of
    # the Python API): a mistyped --out or --data is named in a fraction of a second.
    from dermcir.checkpoint_folder import require_checkpoint
    from dermcir.index._store import check_root, require_index
    from dermcir.index.case_index import refuse_existing_index

    if args.remove:
        if args.add or args.data:
            raise ValueError("--remove takes only --out and the ids; run --add separately")
        ignored = {
            "--checkpoint": args.checkpoint,
            "--image-root": args.image_root,
            "--min-cases": args.min_cases,
            "--device": args.device,
        }  # (--batch-size, --cache and --quiet are accepted, so that one set of options serves every update)
        named = [option for option, value in ignored.items() if value is not None]
        if named:
            raise ValueError(f"{', '.join(named)}: not used by --remove, which encodes nothing (it takes --out and ids)")
        require_index(args.out)
        _apply_threads(args)  # before the import below loads torch
        from dermcir.index import remove_cases

        _print_update("removed", remove_cases(args.out, args.remove))
        return 0
    if args.data is None:
        raise ValueError("--data is required to build or add (a Derm7pt folder or a CSV of cases)")
    if args.add:
        require_index(args.out)
    else:
        if args.checkpoint is None:
            raise ValueError("--checkpoint is required to build an index")
        check_root(args.out)
        if not args.rebuild:
            refuse_existing_index(args.out)
    if args.checkpoint is not None:  # (--add without it uses the index's own, checked when the index opens)
        require_checkpoint(args.checkpoint)
    min_cases = args.min_cases
    if min_cases is None and _is_release(args.data):
        min_cases = _training_min_cases(args.checkpoint, args.out if args.add else None)
    cases, report = _load_cases(args.data, args.image_root, min_cases)
    _apply_threads(args)  # before the imports below load torch
    from dermcir.index import VectorParams, add_cases, build_index

    common = {
        "device": args.device or "auto",
        "batch_size": args.batch_size,
        "cache_dir": args.cache,
        "report": report,
        "progress": not args.quiet,
    }
    if args.add:
        update = add_cases(args.out, cases, checkpoint=args.checkpoint, replace=args.replace, **common)
        _print_update("added", update, report.fields_left_out)
        return 0
    params = VectorParams(**given)
    update = build_index(cases, args.checkpoint, args.out, params=params, overwrite=args.rebuild, **common)
    _print_update("rebuilt" if update.removed else "indexed", update, report.fields_left_out)
    return 0


def _parse_checklist(pairs: list[str]) -> dict[str, str]:
    """``FIELD=VALUE`` pairs as a checked checklist, so that a mistyped field or value is refused at once, not after
    the model has loaded (seconds)."""
    from dermcir.data.text import checklist_key, validate_checklist

    out: dict[str, str] = {}
    given: dict[str, str] = {}  # normalised field -> the pair that gave it
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--checklist {pair!r}: expected FIELD=VALUE, e.g. pigment_network=atypical")
        field = checklist_key(key)
        if field in given:  # keeping the last one would search with a value the user may not have meant
            raise ValueError(f"--checklist gives {field} twice ({given[field]!r} and {pair!r}); give each field once")
        given[field] = pair
        out[key.strip()] = value
    return validate_checklist(out)


def _check_search_folders(args: argparse.Namespace) -> None:
    """Refuse an ``--index`` that holds no index, or a ``--checkpoint`` that is no checkpoint, before torch and the
    model load (seconds); opening them checks the rest."""
    from dermcir.checkpoint_folder import require_checkpoint
    from dermcir.index._store import live_version

    live_version(args.index)
    if args.checkpoint is not None:
        require_checkpoint(args.checkpoint)


def cmd_search(args: argparse.Namespace) -> int:
    # Mistakes in the query are refused before torch and the model load (seconds).
    checklist = _parse_checklist(args.checklist)
    if args.heatmaps and not args.json:  # the table has no room for them
        raise ValueError("--heatmaps needs --json (the table output does not show heatmaps)")
    if args.image is None and not (args.text or "").strip() and not checklist:
        raise ValueError("give --image, --text or --checklist (or an image with text for a composed query)")
    if args.image is not None and not args.image.exists():
        raise FileNotFoundError(f"{args.image}: query image not found")
    if args.image is not None and args.image.is_dir():
        raise ValueError(f"{args.image}: is a folder; --image takes one image file")
    _check_search_folders(args)
    _apply_threads(args)  # before the import below loads torch
    keep_freed_buffers()
    from dermcir.search import CaseSearcher

    searcher = CaseSearcher(args.index, checkpoint=args.checkpoint, device=args.device, auto_reload=False)
    response = searcher.search(image=args.image, text=args.text, checklist=checklist, k=args.k, heatmaps=args.heatmaps)
    if args.json:
        json.dump(response.to_dict(), sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"{response.mode} query on {args.index} ({response.index_size} cases), {response.took_ms:.0f} ms. {NOTICE}")
    if response.text:
        print(f"text: {response.text}")
    print(f"{'rank':>4}  {'score':>7}  {'local':>7}  {'global':>7}  {'case':<12} {'category':<24} diagnosis")
    for r in response.results:
        d = r.to_dict()
        print(
            f"{r.rank:>4}  {r.score:7.3f}  {d['local']:7.3f}  {d['global']:7.3f}  {r.case_id:<12} "
            f"{r.category:<24} {r.diagnosis}"
        )
    return 0


def _run_server(searcher, args: argparse.Namespace, banner: str) -> int:
    from dermcir.service import create_app, serve

    keep_freed_buffers()  # from here on: the demo's training and indexing ran with the allocator as it was
    app = create_app(searcher, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                     max_concurrent_searches=args.max_concurrent, max_waiting_searches=args.max_waiting)

    def ready(url: str) -> None:
        print(f"{banner}: open {url} in a browser (Ctrl+C stops it). {NOTICE}", flush=True)

    try:
        serve(app, args.host, args.port, on_ready=ready, allowed_host_names=args.allowed_host,
              max_connections=args.max_connections)
    except OSError as exc:  # the port is taken or the address is not this machine's
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _check_search_folders(args)
    _apply_threads(args)  # before the imports below load torch
    from dermcir.search import CaseSearcher

    searcher = CaseSearcher(args.index, checkpoint=args.checkpoint, device=args.device)
    return _run_server(searcher, args, "dermcir serve")


def cmd_demo(args: argparse.Namespace) -> int:
    _apply_threads(args)  # before the imports below load torch
    from dermcir.search import CaseSearcher

    cases, _report = _load_cases(args.data, None, args.min_cases)
    if not cases:
        raise ValueError(f"{args.data}: no usable cases")
    checkpoint = _demo_checkpoint(cases, args.out / "model", args.cache, args.threads)
    _demo_index(cases, checkpoint, args.out / "index", args.cache)
    return _run_server(CaseSearcher(args.out / "index", checkpoint=checkpoint), args, "dermcir demo")


def _demo_checkpoint(cases, folder: Path, cache: Path | None, threads: int | None) -> Path:
    """Reuse the demo's trained model, or train one with the CPU profile (a few minutes on 2 cores).

    The training runs in a child process: this one's OpenMP threads sleep while idle, for serving, which made the
    heads' many small training steps 1.85 times slower (``_waits``)."""
    if (folder / "config.json").is_file():  # checkpoints are written atomically: present means complete
        log.info("reusing the model in %s (delete it to retrain)", folder)
        return folder
    from dermcir.training import train_on_cases

    log.info("training a model on %d cases with the CPU profile into %s", len(cases), folder)
    return Path(run_in_child(train_on_cases, cases, folder, profile="cpu", cache_dir=cache, threads=threads))


def _demo_index(cases, checkpoint: Path, folder: Path, cache: Path | None) -> None:
    """Reuse the demo's index when it was built by this checkpoint, adding any case it lacks; otherwise build it."""
    from dermcir.checkpoint import fingerprint
    from dermcir.index import NothingToIndexError, add_cases, build_index, open_index

    try:
        index = open_index(folder)
    except FileNotFoundError:
        index = None
    except (OSError, ValueError) as exc:
        # A damaged index or one in another format: build a new version. Publishing is atomic and the old version
        # folder stays on disk (among the last versions kept) until later builds collect it.
        log.warning("cannot reuse the index in %s (%s); building a new version", folder, exc)
        index = None
    if index is not None and index.fingerprint == fingerprint(checkpoint):
        known = set(index.case_ids)
        new = [c for c in cases if c.case_id not in known]
        if new:
            try:
                add_cases(folder, new, checkpoint=checkpoint, cache_dir=cache)
            except NothingToIndexError as exc:  # e.g. unreadable images, left out of the first build too
                log.warning("no new case could be added to %s: %s", folder, exc)
        log.info("reusing the index in %s (%d cases)", folder, len(open_index(folder)))
        return
    build_index(cases, checkpoint, folder, cache_dir=cache, overwrite=True)  # on purpose: see above
