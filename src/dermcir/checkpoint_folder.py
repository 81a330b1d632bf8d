"""A checkpoint folder's layout and the checks that read only the disk (no torch).

Kept apart from :mod:`dermcir.checkpoint`, which builds the model, so that the command line can refuse a mistyped
``--checkpoint`` or ``--out`` in a fraction of a second instead of after torch loads (seconds).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from dermcir.files import lock_file

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: What a checkpoint folder may hold besides its two files: the training run's logs (``dermcir train``). A folder
#: holding anything else is not replaced by a new checkpoint (``check_checkpoint_target``).
CHECKPOINT_LOGS = ("train.log", "train.failed.log")


#: How long a reader waits for a running save to put its folder in place (its two renames take milliseconds).
BUSY_WAIT_S = 10.0


class CheckpointBusyError(ValueError):
    """Another process is training into, or saving, the checkpoint folder."""


# lock file -> depth, for the locks this process holds: training holds its folder's lock for the whole run and
# saving takes it again (a second flock on the same file from one process would wait for itself). Threads of one
# process share it, so two threads saving into one folder are not ordered by it; separate processes are.
_held: dict[Path, int] = {}
_held_guard = threading.Lock()


@contextmanager
def checkpoint_lock(out_dir: str | Path, wait: bool = True) -> Iterator[None]:
    """Hold the exclusive lock of a checkpoint folder: a ``flock`` on ``.NAME.lock`` beside it, deleted on release.

    Training holds it for its whole run (``wait=False``: a second run into the same folder is refused at once,
    where both ran and the later one replaced the earlier's checkpoint without a word, under an index built with
    it); saving holds it while it writes and renames (its temporary and ``.NAME.old`` folders are then its own); a
    reader restores an interrupted save only under it.

    Raises:
        CheckpointBusyError: ``wait=False`` and another process holds it.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = out_dir.parent.resolve() / f".{out_dir.name}.lock"
    with _held_guard:
        reentrant = path in _held
        if reentrant:
            _held[path] += 1
    if reentrant:
        try:
            yield
        finally:
            with _held_guard:
                _held[path] -= 1
        return
    held = ExitStack()
    try:
        held.enter_context(lock_file(path, wait=wait))
    except BlockingIOError:
        raise CheckpointBusyError(
            f"{out_dir}: another process is training or saving a checkpoint into this folder now; wait for it to "
            "finish, or give another folder"
        ) from None
    with held:
        with _held_guard:
            _held[path] = 1
        try:
            yield
        finally:
            with _held_guard:
                del _held[path]


def check_checkpoint_target(out_dir: str | Path, overwrite: bool = True) -> None:
    """Refuse to write a checkpoint over a folder that is not one, or where it could not be written.

    Saving replaces the whole folder, so ``--out runs`` where ``--out runs/model`` was meant would delete earlier
    runs and indexes. Training calls this before it starts, so the slip costs nothing; a folder that cannot be
    written is found then too, not after hours of training (which were lost with the error).

    ``overwrite=False``: refuse a folder that holds a checkpoint already (``dermcir train`` without
    ``--overwrite``): an index built with it could no longer be searched or updated once it is replaced.

    Raises:
        ValueError: ``out_dir`` is a file, a folder holding anything but a checkpoint's files and logs, or (without
            ``overwrite``) a checkpoint. OSError: it cannot be written.
    """
    out_dir = Path(out_dir)
    restore_interrupted_save(out_dir)
    if not out_dir.exists():
        _require_writable(out_dir.parent)
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir}: is a file; a checkpoint is written as a folder")
    allowed = {WEIGHTS, CONFIG, *CHECKPOINT_LOGS}
    # hidden files (a file browser's .DS_Store) go with the old checkpoint; hidden folders and anything else do not
    others = sorted(p.name for p in out_dir.iterdir()
                    if not p.is_file() or (p.name not in allowed and not p.name.startswith(".")))
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ValueError(
            f"{out_dir}: holds {shown}, so it is not a checkpoint folder, and writing a checkpoint replaces the whole "
            f"folder; give a new or a checkpoint folder (e.g. {out_dir / 'model'})"
        )
    if not overwrite and (out_dir / CONFIG).is_file():
        raise ValueError(
            f"{out_dir}: holds a checkpoint already; an index built with it could not be searched or updated once it "
            "is replaced. Train into another folder, or pass --overwrite (overwrite=True) and rebuild such indexes "
            "with `dermcir index --rebuild`"
        )
    _require_writable(out_dir.parent)


def _require_writable(folder: Path) -> None:
    """Create and remove a file in ``folder`` (or in its nearest existing parent, where the folders would be made)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise OSError(exc.errno, f"{folder}: cannot be written ({exc.strerror}); give an --out where the checkpoint "
                                 "can be saved") from None


def restore_interrupted_save(out_dir: str | Path) -> bool:
    """Put back a checkpoint that a save killed between its two renames left aside (``.NAME.old``); returns whether.

    Saving moves the old folder aside, then renames the new one into place: a kill in between left no ``out_dir``
    at all, the previous checkpoint hidden, and the next save deleted it.
    """
    out_dir = Path(out_dir)
    old = out_dir.with_name(f".{out_dir.name}.old")

    def interrupted() -> bool:
        return not out_dir.exists() and (old / CONFIG).is_file() and (old / WEIGHTS).is_file()

    if not interrupted():  # the usual case: no lock taken, so a read-only checkpoint folder is read as it is
        return False
    try:
        # A save that is running holds the lock: between its two renames it looks interrupted, and moving its old
        # folder back then made the save fail (and lost the training). Such a save is left to finish.
        with checkpoint_lock(out_dir, wait=False):
            if not interrupted():
                return False
            os.replace(old, out_dir)
    except CheckpointBusyError:
        # a save between its renames puts the new folder in place within moments: wait for it a little, rather than
        # tell the reader "not found" (a training holds the lock for hours, so not for the lock itself)
        deadline = time.monotonic() + BUSY_WAIT_S
        while not out_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return False
    except OSError:  # a read-only disk: the loader's "not found" says where to look
        return False
    log.warning("%s: restored the checkpoint that an interrupted save had moved aside to %s", out_dir, old.name)
    return True


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """A checkpoint's ``config.json``, checked to be a JSON object with the model's settings under ``"model"``.

    Raises:
        FileNotFoundError: no ``config.json`` in ``ckpt_dir``. ValueError: it cannot be read as one.
    """
    path = Path(ckpt_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; a checkpoint folder holds {CONFIG} and {WEIGHTS}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable checkpoint config (corrupt JSON: {exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):  # a ValueError: the CLI names it
        raise ValueError(f"{path}: expected a JSON object with the model's settings under \"model\"")  # noqa: TRY004
    return meta


def require_checkpoint(ckpt_dir: str | Path) -> dict[str, Any]:
    """Refuse what is not a checkpoint folder before anything loads; returns its config (:func:`read_config`).

    A weights file given instead of its folder (``--checkpoint runs/model/model.safetensors``) is named as such.
    """
    ckpt_dir = Path(ckpt_dir)
    restore_interrupted_save(ckpt_dir)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise ValueError(
            f"{ckpt_dir}: is a file; expected a checkpoint folder (the one holding {CONFIG} and {WEIGHTS}, e.g. "
            f"{ckpt_dir.parent})"
        )
    return read_config(ckpt_dir)
