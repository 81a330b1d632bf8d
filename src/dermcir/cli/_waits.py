"""How this process's OpenMP threads wait, and running a job in a child process that waits as the user set it.

Idle OpenMP threads spin by default. With one core busy (any other job on the machine) a query then waits for a
descheduled peer thread at every parallel region: 2.6 s instead of 0.17 s per composed query on 2 cores
(docs/search.md). So the commands that answer queries (``index | search | serve | demo``) make their threads sleep
instead (``OMP_WAIT_POLICY=PASSIVE``), unless the user set a policy. The policy is read once, when torch loads.

Training the many small steps of the heads is the opposite case: each step wakes the sleeping threads again, and the
demo's training took 248 s instead of 134 s on the 2-core machine (same model, to the last bit). The demo therefore
trains in a child process started with the user's own environment (``run_in_child``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any, TypeVar

from dermcir import workers

POLICY = "OMP_WAIT_POLICY"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the dermcir command's, in its child processes too
_set_here = False  # whether this process set POLICY itself (a user's own setting is never changed)

T = TypeVar("T")


def wait_passively() -> None:
    """Make this process's OpenMP threads sleep while idle, unless the user chose a policy. Call before torch loads."""
    global _set_here
    if POLICY not in os.environ:
        os.environ[POLICY] = "PASSIVE"
        _set_here = True


@contextmanager
def users_waits() -> Iterator[None]:
    """Within the block, ``os.environ`` (which child processes inherit) holds the user's own wait policy."""
    if not _set_here or os.environ.get(POLICY) != "PASSIVE":
        yield
        return
    del os.environ[POLICY]
    try:
        yield
    finally:
        os.environ[POLICY] = "PASSIVE"


def run_in_child(fn: Callable[..., T], *args: Any, threads: int | None = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a fresh (spawned) process with the user's wait policy; its result or its exception.

    The child logs to this process's console as the ``dermcir`` command does, and uses ``threads`` torch threads
    (None: torch's default). If this process stops (an error, Ctrl+C, SIGTERM), the child is stopped too, and on
    POSIX it runs its job's clean-up first (Windows ends it at once); if this process is killed outright, the child
    stops by itself. A child that dies (killed, out of memory) is a ``ChildProcessError`` here, not a wait for ever.
    As with any spawned process, a script calling this must guard its own top level with
    ``if __name__ == "__main__":``, since the child imports the script's main module again.
    """
    context = multiprocessing.get_context("spawn")
    pool = future = None
    processes: list = []
    try:
        with users_waits():  # the worker is started (and inherits the environment) at submit
            pool = ProcessPoolExecutor(1, mp_context=context, initializer=_init_child,
                                       initargs=(threads, logging.getLogger().getEffectiveLevel()))
            future = pool.submit(_job, fn, args, kwargs)
        # ProcessPoolExecutor has no public way to stop a running job before Python 3.14
        processes = list((getattr(pool, "_processes", None) or {}).values())
        while True:
            try:  # in short waits: a wait without a timeout cannot be interrupted by Ctrl+C on Windows
                return future.result(timeout=0.5)
            except FutureTimeout:
                continue
            except BrokenProcessPool:
                pool.shutdown(wait=True)  # its manager thread reaps the dead child: then its exit code is known
                codes = ", ".join(str(p.exitcode) for p in processes)
                raise ChildProcessError(
                    f"the child process running {getattr(fn, '__name__', fn)} stopped without a result (exit code "
                    f"{codes or 'unknown'}; killed, or out of memory?)"
                ) from None
    finally:
        if pool is not None:
            if future is not None and not future.done():  # this process is failing or was interrupted: stop the job
                _stop(future, processes)
            # the executor's own thread joins the child (a second join here would race it for the exit status)
            pool.shutdown(wait=True, cancel_futures=True)


def _stop(future: Future, processes: list, grace: float = 30.0) -> None:
    """Stop a running job: SIGTERM, a SystemExit in the job on POSIX, whose clean-up runs, after which the executor
    ends the worker; a job that has not ended ``grace`` seconds later (stuck outside Python) is killed."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    if not wait([future], timeout=grace).done:
        for process in processes:
            if process.is_alive():
                process.kill()


def _job(fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    """The child's side of ``run_in_child``: ``fn``, and a note that it has ended (``dermcir.workers``)."""
    try:
        return fn(*args, **kwargs)
    finally:
        workers.job_ended.set()


def _init_child(threads: int | None, level: int) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)
    # Ctrl+C reaches the whole process group: the parent stops the child itself, with SIGTERM, which is a SystemExit
    # here so that the job's own clean-up (its temporary log folder) runs
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, exit_once)
    # a parent killed outright (SIGKILL, out of memory) cannot stop the child: the child watches for that itself
    workers.exit_with_parent()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def exit_once(signum: int, frame: object) -> None:
    """A signal handler that makes the signal a ``SystemExit`` (so ``finally`` blocks run), once: a second signal
    (``kill`` repeated, a process group's, the parent's after a group's) must not cut the clean-up short."""
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)
