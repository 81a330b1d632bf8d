"""Worker processes that end themselves when the process that started them has ended.

A ``ProcessPoolExecutor`` worker whose parent is killed outright (SIGKILL, out of memory) is never told: it finishes
its job (minutes of training on every core it was given) and then waits for another job, for ever. Its initializer
calls :func:`exit_with_parent` to stop that: when the parent has ended, the worker removes what the parent can no
longer remove (``clean_up``), sends itself SIGTERM (a job that handles it as a SystemExit runs its own clean-up;
otherwise the process ends at once) and then ends.

For spawned workers only (both of dermcir's pools spawn): the parent's end of the spawn pipe, which tells the worker
that the parent has ended, is then held by the parent alone; forked siblings would hold it too.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable

#: Set by a job wrapper once its job has returned or raised; the worker then ends without waiting longer.
job_ended = threading.Event()

#: How long a job may take to clean up after the SIGTERM before the worker ends anyway.
CLEAN_UP_SECONDS = 60.0


def exit_with_parent(clean_up: Callable[[], None] | None = None) -> None:
    """In a worker process: end it (after ``clean_up`` and its job's own clean-up) when its parent has ended."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_end_when_ended, args=(parent, clean_up), daemon=True).start()


def _end_when_ended(parent: multiprocessing.process.BaseProcess, clean_up: Callable[[], None] | None) -> None:
    parent.join()  # returns when the parent process has ended
    if clean_up is not None:
        clean_up()
    # A real signal, which also ends a blocking wait in the main thread. Sent to that thread itself: a signal sent to
    # the process may be delivered to another thread (macOS), and then a blocking call there is not interrupted.
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
    else:  # Windows: ends the process at once
        os.kill(os.getpid(), signal.SIGTERM)
    # a job that took the SIGTERM as a SystemExit has cleaned up, and the executor's loop then waits for another job
    job_ended.wait(timeout=CLEAN_UP_SECONDS)
    os._exit(128 + signal.SIGTERM)
