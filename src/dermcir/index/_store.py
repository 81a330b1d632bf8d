"""Versioned index folders: every write builds a complete new version beside the live one, then swaps a pointer.

Layout of an index root::

    INDEX_DIR/
      CURRENT             # one line: the name of the live version folder
      v000002-3fa9c1/     # a complete version (see dermcir.index for its files); 6 or more digits, ordered as numbers
      v000003-b07d22/
      .lock               # held by the one writer at a time
      .tmp-*/             # a version being written (left behind only by a killed writer)

A reader resolves ``CURRENT`` once and reads that folder, which is never modified after it is published; the pointer
is replaced with ``os.replace`` (atomic on POSIX), so a reader sees either the old or the new version, never a mix.
A writer that fails or is killed leaves at most a ``.tmp-*`` folder, which the next writer removes. The
:data:`KEEP_VERSIONS` highest-numbered versions are kept, and so is the version that was live before the latest swap
(after ``CURRENT`` was pointed back at an older version by hand, that is the restored one), so that a reader that
resolved the pointer just before a swap can still open the version it was given and the latest write can be undone.

Writers take an exclusive ``flock`` on ``.lock``. A failed first build removes ``.lock`` and the folder it created
while still holding the lock; a writer that was waiting on that (now unlinked) file notices, after getting the lock,
that ``.lock`` is no longer the file it locked, and starts again (re-creating the folder for a build).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from dermcir.files import fsync_path

log = logging.getLogger(__name__)

POINTER = "CURRENT"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
KEEP_VERSIONS = 3
# Six digits at least (zero-padded), more once there have been a million writes: versions are ordered by their number,
# never by their name ("v1000000-..." sorts before "v999999-..." as text).
_VERSION_RE = re.compile(r"^v(\d{6,})-[0-9a-f]{6}$")


def version_number(name: str) -> int | None:
    """The sequence number of a version folder's name, or ``None`` when the name is not a version's."""
    m = _VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def current_version(root: Path) -> Path | None:
    """The live version folder of an index root, or ``None`` when the root holds no published version."""
    pointer = root / POINTER
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _VERSION_RE.match(name):
        raise ValueError(f"{pointer}: names {name!r}, expected a version folder like 'v000001-0a1b2c'")
    return root / name


def check_root(root: Path) -> None:
    """Refuse to manage a folder that holds anything other than index versions (a mistyped ``--out``)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise ValueError(f"{root}: exists and is not a folder; an index is a folder")
    foreign = [
        p.name
        for p in root.iterdir()
        if p.name not in (POINTER, LOCK) and not p.name.startswith(TMP_PREFIX) and not _VERSION_RE.match(p.name)
    ]
    if foreign:
        raise ValueError(
            f"{root}: holds files that are not part of a dermcir index ({', '.join(sorted(foreign)[:5])}); "
            "choose an empty or new folder"
        )


def live_version(root: Path) -> Path:
    """The live version folder of an index root, for a reader (:func:`current_version` that refuses a root without
    one).

    Raises:
        FileNotFoundError: no published index under ``root`` (e.g. a mistyped ``--index``).
        ValueError: a damaged ``CURRENT``.
    """
    folder = current_version(root)
    if folder is None:
        raise _no_index(root)
    return folder


def _no_index(root: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{root}: no dermcir index here; build one first with `dermcir index`")


def require_index(root: Path) -> None:
    """Refuse an update of a root that holds no published index, before anything is created there (a mistyped
    ``--out`` must not leave a folder tree and a lock file behind).

    Raises:
        FileNotFoundError: no index under ``root``.
        ValueError: ``root`` holds foreign files or a damaged ``CURRENT``.
    """
    check_root(root)
    try:
        live_version(root)
    except FileNotFoundError:
        # The index's first build holds the lock and has not published yet: an update waits for it in writer_lock,
        # as behind any other writer, and then reads the index that build published (or finds none, if it failed).
        if not _first_build_in_progress(root):
            raise


def _first_build_in_progress(root: Path) -> bool:
    """Whether a writer holds ``root/.lock`` now (a lock file that nobody holds is left by a killed build)."""
    try:
        fh = open(root / LOCK)  # noqa: SIM115 - closed below
    except OSError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


@contextmanager
def writer_lock(root: Path, create: bool = True) -> Iterator[None]:
    """Hold the root's exclusive writer lock, so concurrent updates cannot lose each other's cases.

    ``create``: make the root folder when it is missing (a build); an update passes ``False`` and calls
    :func:`require_index` first, so that nothing is created for a root that holds no index. When another writer holds
    the lock, an INFO message says so before waiting (a build holds it for its whole encoding). Readers never wait.

    Raises:
        FileNotFoundError: ``create`` is false and the root is not (or no longer) a folder.
    """
    check_root(root)
    fh = _acquire(root, create)
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _acquire(root: Path, create: bool) -> IO[str]:
    """Open and lock ``root/.lock``; return the open file once it is locked and still the file at that path."""
    waited = False
    while True:
        if create:
            root.mkdir(parents=True, exist_ok=True)
        elif not root.is_dir():
            raise _no_index(root)
        try:
            fh = open(root / LOCK, "a")  # noqa: SIM115 - returned locked; writer_lock closes it
        except FileNotFoundError:  # the folder was removed (a failed first build cleaning up) since it was checked
            if create:
                continue
            raise _no_index(root) from None
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    log.info("waiting for another writer of %s (a build or an update is in progress)", root)
                    waited = True
                fcntl.flock(fh, fcntl.LOCK_EX)
            if _is_lock_file(fh, root):
                return fh
            # A failed first build unlinked .lock (and perhaps the folder) while this writer waited on it: locking
            # that orphaned file excludes nobody, so start again with the file now at root/.lock.
            log.debug("%s was replaced while waiting for it; locking again", root / LOCK)
            fcntl.flock(fh, fcntl.LOCK_UN)
        except BaseException:
            fh.close()
            raise
        fh.close()


def _is_lock_file(fh: IO[str], root: Path) -> bool:
    """Whether the open, locked ``fh`` is still the file at ``root/.lock`` (not one unlinked meanwhile)."""
    try:
        there = os.stat(root / LOCK)
    except FileNotFoundError:
        return False
    mine = os.fstat(fh.fileno())
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def remove_created(root: Path, top: Path) -> None:
    """Undo a failed first build's folder creation: ``.lock``, then the empty folders from ``root`` up to ``top``.

    Must be called while holding :func:`writer_lock` (a writer waiting on the lock file then notices it was removed
    and starts again). Nothing is removed when ``root`` holds anything else (another writer's files).
    """
    try:
        if {p.name for p in root.iterdir()} - {LOCK}:
            return
        (root / LOCK).unlink(missing_ok=True)
        remove_empty_folders(root, top)
    except OSError:
        pass


def remove_empty_folders(root: Path, top: Path) -> None:
    """Remove ``root`` and its parents up to ``top`` while they are empty (a folder in use is left alone)."""
    for folder in (root, *root.parents):
        try:
            folder.rmdir()
        except OSError:  # not empty (another writer created something there) or already gone
            return
        if folder == top:
            return


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_path(folder)  # a folder: best effort (some file systems refuse it, EINVAL: every write failed there)


def _next_name(root: Path) -> str:
    seqs = [n for p in root.iterdir() if (n := version_number(p.name)) is not None]
    return f"v{max(seqs, default=0) + 1:06d}-{secrets.token_hex(3)}"


@contextmanager
def publish_version(root: Path) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on a clean exit it becomes the live version.

    Must be called while holding :func:`writer_lock` (read the new version's name with :func:`current_version`
    before releasing it). On any exception (including ``KeyboardInterrupt``) the temporary folder is deleted and the
    live version is left as it was.
    """
    for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a killed writer; we hold the lock, so nobody owns it
        log.info("removing %s left by an interrupted index write", stale)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:  # a .tmp-CURRENT-* file from a pointer swap cut short
            stale.unlink(missing_ok=True)
    try:
        before = current_version(root)  # kept by the garbage collection, so that this write can be undone
    except ValueError:  # a damaged CURRENT being replaced by a rebuild
        before = None
    tmp = root / f"{TMP_PREFIX}{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except FileNotFoundError:
        raise FileNotFoundError(f"{root}: the index folder was removed while this write ran; nothing was written") from None
    final, unpublished = root / _next_name(root), False
    try:
        yield tmp
        _fsync_tree(tmp)
        os.replace(tmp, final)
        unpublished = True
        _swap_pointer(root, final.name)  # raises only before the pointer is replaced
        unpublished = False
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if unpublished:  # complete, but the pointer could not be written: it would take a kept slot and the space
            shutil.rmtree(final, ignore_errors=True)  # of a whole version, on what is likely a full disk
        if isinstance(exc, OSError):  # "[Errno 28] No space left on device", "340608 requested and 294880 written"
            live = f"version {before.name} stays live" if before is not None else "nothing was published"
            raise OSError(exc.errno, f"{root}: the new index version could not be written ({exc}); {live}") from exc
        raise
    log.info("index %s now at version %s", root, final.name)
    _collect_garbage(root, before)


def _swap_pointer(root: Path, name: str) -> None:
    tmp = root / f"{TMP_PREFIX}{POINTER}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w") as fh:
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, root / POINTER)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Best effort, as the swap has happened: an error now (EIO, or EINVAL where a file system refuses to sync a
    # folder) would report as failed an update that is live, and a retry would then find its work done.
    fsync_path(root)


def _collect_garbage(root: Path, before: Path | None = None) -> None:
    """Remove old versions: keep the :data:`KEEP_VERSIONS` highest-numbered ones, the live one, and ``before`` (the
    version that was live before the latest swap; after going back by hand to an older version, it is the restored
    one, which is not among the highest numbers)."""
    keep = {current_version(root), before}
    versions = sorted((p for p in root.iterdir() if _VERSION_RE.match(p.name)), key=lambda p: version_number(p.name))
    for old in versions[:-KEEP_VERSIONS]:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
