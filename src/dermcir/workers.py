"""Worker processes that end themselves when the process that started them has ended.

A ``ProcessPoolExecutor`` worker whose parent is killed outright (SIGKILL, out of memory) is never told: it finishes
its job (minutes of training on every core it was given) and then waits for another job, for ever. Its initializer
calls :func:`exit_with_parent` to stop that: when the parent has ended, the worker sends itself SIGTERM (a job that
handles it as a SystemExit runs its clean-up; otherwise the process ends at once) and then ends.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

#: Set by a job wrapper once its job has returned or raised; the worker then ends without waiting longer.
job_ended = threading.Event()

#: How long a job may take to clean up after the SIGTERM before the worker ends anyway.
CLEAN_UP_SECONDS = 60.0


def exit_with_parent() -> None:
    """In a worker process: end it (after its job's clean-up) when its parent process has ended."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_end_when_ended, args=(parent,), daemon=True).start()


def _end_when_ended(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()  # returns when the parent process has ended
    # a real signal, which also ends a blocking wait in the main thread
    os.kill(os.getpid(), signal.SIGTERM)
    # a job that took the SIGTERM as a SystemExit has cleaned up, and the executor's loop then waits for another job
    job_ended.wait(timeout=CLEAN_UP_SECONDS)
    os._exit(128 + signal.SIGTERM)
