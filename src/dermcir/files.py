"""Writing a file so that a failed write never destroys the previous good one.

Everything goes to a temporary file beside the target, which replaces the target by one rename only once it is
complete. A disk that fills up, a killed process or an exception half-way leaves the old file as it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    # Linux reports it without changing it; setting it to read it would, for an instant, give files that another
    # thread creates meanwhile (a service, the feature cache's writers) the permissions 0666
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)  # elsewhere the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | Path, binary: bool = False) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it replaces ``path``, on an error it is removed.

    The new contents are flushed to the disk before the rename, so a power loss leaves the old file or the new one.
    (The rename itself is made durable by ``fsync_path`` on the folder, where a caller needs that.)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            # mkstemp creates the file 0600; the result should have the permissions a plain write would give it,
            # or others sharing the folder (a team's runs, a shared cache) could not read it
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as fh:
            yield fh
            # the data reaches the disk before the rename can: otherwise, after a power loss, the new name may hold
            # a zero-length file in place of both the old and the new contents
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and str(path) not in str(exc):  # "[Errno 28] No space left on device": where?
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            raise OSError(exc.errno, f"{path}: could not be written ({exc.strerror or exc}); {kept}") from exc
        raise


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's contents to the disk (a folder: its entries, i.e. the renames into it).

    Without it a rename can reach the disk before the data it points to, so after a power loss the new name may hold
    a zero-length file. For a folder this is best effort: where it cannot be opened (not POSIX) or its file system
    refuses the call, nothing happens.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if Path(path).is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        # some file systems (network, FUSE) refuse fsync on a folder; the data itself was flushed, and a save
        # must not fail for that
        if not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path) as fh:
        fh.write(text)


def write_json_atomic(path: str | Path, data: Any) -> None:
    with atomic_write(path) as fh:
        json.dump(data, fh, indent=2)


@contextmanager
def lock_file(path: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created), and delete it on release, so that no lock file is
    left beside the work.

    A process that waited on the file while the holder deleted it holds a lock on a file no longer at ``path``: it
    sees that (the inode at ``path`` is not its own) and starts again, so two holders never overlap.

    Raises:
        BlockingIOError: ``wait`` is false and another process holds the lock.
    """
    while True:
        fh = open(path, "a")  # noqa: SIM115 (held past this block, closed in the finally below)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            try:
                same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            fh.close()
            raise
        if same:
            break
        fh.close()  # the holder deleted it: lock the file now at ``path``
    try:
        yield
    finally:
        try:
            path.unlink(missing_ok=True)  # while still locked: a waiter on it then starts again
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()


@contextmanager
def claim_folder(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``folder/.lock`` while held) for a run that writes into it.

    A second run into the same folder is refused at once (``what`` names the command in the message): two runs that
    both passed the "no earlier results" check interleaved their files, and one's results vanished.

    Raises:
        ValueError: another process holds the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    held = ExitStack()
    try:
        held.enter_context(lock_file(folder / ".lock", wait=False))
    except BlockingIOError:
        raise ValueError(f"{folder}: another {what} is writing into this folder now; give another folder, or wait "
                         "for it to finish") from None
    with held:
        yield
