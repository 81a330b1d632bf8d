"""Fitting a model's companion for several folds in CPU worker processes, while the main models train on the GPU.

A companion (``ModelConfig.companion``) trains small heads on cached frozen-backbone maps. On a GPU, where the
arithmetic of such a step is quick, what remains is per-operation overhead, which the GPU does not remove: the step's
overhead alone is 45 ms on one CPU thread (batch 2, ``scripts/bench_companion_step.py``), times some 600 steps per
fold. Fitted there, the companion would take that from the fine-tuned model's time budget. Here each fold's companion
trains on the host's spare cores instead, in parallel with the fine-tuned model, and the benchmark collects it when
the main models are done (``dermcir cv --companion-workers N``).

A worker holds a CPU copy of the companion at its initial weights and the fold-independent inputs (cached maps, text
tokens, labels); each job resets it, runs ``fit`` exactly as ``fit_companion`` does and returns the heads' weights.
A job that fails (or a worker that dies) is fitted again in the calling process, so a run never loses a fold to it.

What crosses between processes is plain ``pickle`` data (tensors serialised into it), not torch's shared-memory
tensor passing, which would hold one file descriptor per tensor (several hundred per worker) against the host's limit.
The workers' start-up data (~150 MB: the companion, cached maps, text tokens) goes through a file in a private
temporary folder, not through the spawn pipe: the parent writes a spawned child's arguments into that pipe while the
child is still importing torch, so each worker's start-up would block the calling process for a whole import (about
10 s per worker measured here), one worker after the other, inside the run's time budget.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import torch

from dermcir.models import ComposedRetrievalModel
from dermcir.training.pipeline import fit_companion, run_log
from dermcir.training.trainer import FitResult, Inputs, fit, trainable_state
from dermcir.workers import exit_with_parent

log = logging.getLogger(__name__)

_WORKER: dict = {}  # in a worker process: the companion, its inputs and settings (set by ``_init_worker``)


def host_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers often show the
    whole host's cores but may only use their quota's worth)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable here: the affinity mask is all we know
    return cores


def default_workers(device: torch.device, jobs: int, cores: int | None = None) -> int:
    """How many companion workers a run uses unless told: none on a CPU run (the main model needs those cores), and
    on a GPU run one per job while each can have two cores beside the two the GPU's driving process keeps."""
    if torch.device(device).type != "cuda":
        return 0
    return max(0, min(jobs, ((cores or host_cores()) - 2) // 2))


def _init_worker(payload: str, threads: int) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a worker trains on the host only; never a second CUDA context
    # a run killed outright (SIGKILL) must leave neither its workers training and then waiting, nor this start-up file
    exit_with_parent(clean_up=lambda: shutil.rmtree(os.path.dirname(payload), ignore_errors=True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group; the run stops its workers
    torch.set_num_threads(threads)
    with open(payload, "rb") as fh:  # written by the calling process into its own private (0700) temporary folder
        companion, inputs, train_cfg, n_categories = pickle.load(fh)
    _WORKER.update(model=companion, initial=trainable_state(companion, train_backbone=False), inputs=inputs,
                   cfg=train_cfg, n_categories=n_categories)


def _ready() -> bool:
    return "model" in _WORKER


def _local_deadline(wall_deadline: float | None) -> float | None:
    """A ``time.time()`` deadline as this process's ``time.perf_counter()`` value (what ``fit`` compares with);
    wall-clock time is what two processes are sure to share."""
    return None if wall_deadline is None else time.perf_counter() + (wall_deadline - time.time())


def _fit_job(train_idx: np.ndarray, val_idx: np.ndarray, refit_idx: np.ndarray | None,
             wall_deadline: float | None, log_path: str) -> bytes:
    """Fit the worker's companion on one fold; returns the pickled ``(heads' weights, FitResult)``."""
    model: ComposedRetrievalModel = _WORKER["model"]
    model.load_state_dict(_WORKER["initial"], strict=False)  # every job starts where the main process's companion did
    with run_log(Path(log_path)):
        result = fit(model, _WORKER["inputs"], train_idx, val_idx, _WORKER["cfg"], torch.device("cpu"),
                     _WORKER["n_categories"], progress=False, refit_idx=refit_idx,
                     deadline=_local_deadline(wall_deadline))
        log.info("companion (CPU worker, %d threads): best epoch %d of %d (stopped by %s), validation mAP %.2f, "
                 "%.0f s", torch.get_num_threads(), result.best_epoch, result.epochs_run, result.stopped_by,
                 result.best_val_map, result.seconds)
    return pickle.dumps((trainable_state(model, train_backbone=False), result))


class CompanionPool:
    """Fits ``model.companion`` per fold in ``workers`` CPU processes; :meth:`collect` loads a fold's result.

    ``companion`` is what ``prepare_companion`` returned (cached maps and the companion's training settings).
    ``threads`` per worker: by default the workers share the host's cores, keeping two for the calling process
    (which drives the GPU).
    """

    #: Seconds :meth:`collect` waits past a job's deadline before giving up on its worker (the job itself stops
    #: training by the deadline; this covers handing its weights back on a loaded host).
    GRACE = 30.0

    def __init__(self, model: ComposedRetrievalModel, companion: tuple[Inputs, object], workers: int,
                 threads: int | None = None) -> None:
        if model.companion is None:
            raise ValueError("CompanionPool needs a model with a companion (ModelConfig.companion)")
        if workers < 1:
            raise ValueError(f"companion workers must be at least 1, got {workers}")
        inputs, train_cfg = companion
        self.model, self.companion = model, companion
        self.initial = trainable_state(model.companion, train_backbone=False)
        # small matrices gain little beyond a few threads; more workers than spare cores would only contend
        self.threads = threads or min(4, max(1, (host_cores() - 2) // workers))
        cpu = torch.device("cpu")
        worker_copy = copy.deepcopy(model.companion).to(cpu)  # the main model's (shared) text encoder stays put
        self._payload_dir = tempfile.mkdtemp(prefix="dermcir-companions-")  # removed by close()
        try:
            payload = os.path.join(self._payload_dir, "start.pkl")
            with open(payload, "wb") as fh:
                pickle.dump((worker_copy, inputs.on(cpu), train_cfg, len(model.config.categories)), fh,
                            protocol=pickle.HIGHEST_PROTOCOL)
            self._pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                initargs=(payload, self.threads))
            try:  # the first submit starts the processes: a host at its process limit fails here
                self._ping = self._pool.submit(_ready)  # first in the queue: answered once a worker has started
            except BaseException:
                self._pool.shutdown(wait=False, cancel_futures=True)
                raise
        except BaseException:
            shutil.rmtree(self._payload_dir, ignore_errors=True)
            raise
        self._jobs: dict[int, tuple[Future, tuple]] = {}
        self._abandoned = False  # a job given up on (it overran): close() must stop it rather than wait for it
        log.info("companions: %d CPU worker process(es), %d thread(s) each", workers, self.threads)

    def started(self, timeout: float = 120.0) -> bool:
        """Whether a worker has started and holds its inputs (False: the pool is broken, e.g. a worker could not
        start; close it and fit in-process). A worker still starting after ``timeout`` seconds counts as started."""
        try:
            return bool(self._ping.result(timeout=timeout))
        except FutureTimeout:
            log.warning("companions: no CPU worker has started after %.0f s; their jobs stay queued", timeout)
            return True
        except Exception as exc:  # noqa: BLE001 — whatever stopped the workers, the caller falls back
            log.warning("companions: the CPU workers could not start (%s: %s)", type(exc).__name__, exc)
            return False

    def submit(self, fold: int, train_idx: np.ndarray, val_idx: np.ndarray, refit_idx: np.ndarray | None,
               log_path: Path, wall_deadline: float | None = None) -> None:
        """Queue ``fold``'s companion. ``wall_deadline`` (a ``time.time()`` value): its training stops like early
        stopping when another epoch and the refit would end after it (``fit``'s ``deadline``), so that a run with a
        time budget never waits past its budget for a companion."""
        args = (np.asarray(train_idx), np.asarray(val_idx), None if refit_idx is None else np.asarray(refit_idx),
                wall_deadline)
        try:
            future = self._pool.submit(_fit_job, *args, str(log_path))
        except Exception as exc:  # noqa: BLE001 — a broken pool refuses new jobs: collect fits this fold here
            future = Future()
            future.set_exception(exc)
        self._jobs[fold] = (future, args)

    def ready(self, fold: int) -> bool:
        """Whether ``fold``'s job has ended well (its companion can be collected at once, without a refit here). A
        failed job is not ready: its refit in this process waits until the main models have trained, as before."""
        future = self._jobs[fold][0]
        return future.done() and not future.cancelled() and future.exception() is None

    def collect(self, fold: int, device: torch.device, progress: bool = False) -> FitResult:
        """Wait for ``fold``'s companion and load its weights into ``model.companion``. A job that failed is fitted
        again here, from the same initial weights, and the failure is logged.

        A job with a ``wall_deadline`` is waited for until :attr:`GRACE` seconds after it (it stops training by
        then); one still running later (a hung worker) is given up on and fitted here too, so that the run's
        results are never held back past its time budget by a worker."""
        future, (train_idx, val_idx, refit_idx, wall_deadline) = self._jobs.pop(fold)
        timeout = None if wall_deadline is None else max(0.0, wall_deadline - time.time()) + self.GRACE
        try:
            state, result = pickle.loads(future.result(timeout=timeout))  # bytes from our own worker, never a file
        except Exception as exc:  # noqa: BLE001 — a failed or hung worker: the fold is fitted here instead
            if isinstance(exc, FutureTimeout):
                self._abandoned = True
                why = f"has not answered {self.GRACE:.0f} s after the deadline"
            else:
                why = f"failed ({type(exc).__name__}: {exc})"
            log.warning("fold %d: the companion's CPU worker %s; fitting it in this process", fold, why)
            self.model.companion.load_state_dict(self.initial, strict=False)
            return fit_companion(self.model, self.companion, train_idx, val_idx, device, progress, refit_idx,
                                 deadline=_local_deadline(wall_deadline))
        self.model.companion.load_state_dict(state, strict=False)  # copied onto the companion's own device
        return result

    def close(self, terminate: bool = False) -> None:
        """Shut the workers down; ``terminate``: stop running jobs too (the run is failing or was interrupted, so
        waiting minutes for companions nobody will collect would only delay the error)."""
        terminate = terminate or self._abandoned
        processes = []
        if terminate:  # ProcessPoolExecutor has no public way to stop running jobs before Python 3.14
            processes = list((getattr(self._pool, "_processes", None) or {}).values())
        try:
            self._pool.shutdown(wait=not terminate, cancel_futures=True)
            for process in processes:
                process.terminate()
        finally:  # a Ctrl+C while the workers shut down must not leave their inputs (~100 MB) in the temp folder
            shutil.rmtree(self._payload_dir, ignore_errors=True)
