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
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

POLICY = "OMP_WAIT_POLICY"
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
    (None: torch's default). If this process stops (an error, Ctrl+C, SIGTERM), the child is stopped too; a child
    that dies (killed, out of memory) is an error here, not a wait for ever.
    """
    context = multiprocessing.get_context("spawn")
    with users_waits():  # the worker is started (and inherits the environment) at submit
        pool = ProcessPoolExecutor(1, mp_context=context, initializer=_init_child,
                                   initargs=(threads, logging.getLogger().getEffectiveLevel()))
        future = pool.submit(fn, *args, **kwargs)
    try:
        return future.result()
    finally:
        # stop a child still running (this process is failing or was interrupted): ProcessPoolExecutor has no public
        # way to stop a running job before Python 3.14
        processes = list((getattr(pool, "_processes", None) or {}).values()) if not future.done() else []
        pool.shutdown(wait=not processes, cancel_futures=True)
        for process in processes:
            process.terminate()
            process.join()


def _init_child(threads: int | None, level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl+C reaches the whole process group: the parent stops the child itself, with SIGTERM, which is a SystemExit
    # here so that the job's own clean-up (its temporary log folder) runs
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
