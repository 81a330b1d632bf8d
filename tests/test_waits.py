"""The commands' OpenMP wait policy, and ``run_in_child``, in which the demo trains with the user's own policy.

Kept free of heavy imports: each child imports this module to find its job.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from dermcir.cli import _waits
from dermcir.cli._waits import POLICY, run_in_child, wait_passively


def _facts(torch_threads: bool = False) -> dict:
    facts = {"pid": os.getpid(), "policy": os.environ.get(POLICY)}
    if torch_threads:
        import torch

        facts["threads"] = torch.get_num_threads()
    return facts


def _fail(what: str) -> None:
    raise ValueError(f"bad {what}")


def _die() -> None:
    os._exit(3)


@pytest.fixture
def passive_set_here(monkeypatch):
    """This process as a serving command leaves it: PASSIVE, set by dermcir rather than by the user."""
    monkeypatch.delenv(POLICY, raising=False)
    monkeypatch.setattr(_waits, "_set_here", False)
    wait_passively()
    assert os.environ[POLICY] == "PASSIVE" and _waits._set_here


def test_the_child_gets_the_users_policy_and_returns_its_result(passive_set_here):
    facts = run_in_child(_facts)
    assert facts["pid"] != os.getpid()
    assert facts["policy"] is None  # the user had set none: the child spins, as torch does by default
    assert os.environ[POLICY] == "PASSIVE"  # this process keeps its own
    assert run_in_child(_facts, torch_threads=True, threads=1)["threads"] == 1  # the job's keywords reach it


def test_a_policy_the_user_set_is_kept_for_both(monkeypatch):
    monkeypatch.setenv(POLICY, "PASSIVE")
    monkeypatch.setattr(_waits, "_set_here", False)
    wait_passively()
    assert not _waits._set_here
    assert run_in_child(_facts)["policy"] == "PASSIVE"
    monkeypatch.setenv(POLICY, "ACTIVE")
    assert run_in_child(_facts)["policy"] == "ACTIVE"


def test_the_childs_error_is_raised_here(passive_set_here):
    with pytest.raises(ValueError, match="bad input"):
        run_in_child(_fail, "input")
    assert os.environ[POLICY] == "PASSIVE"


def test_a_child_that_dies_is_an_error_not_a_wait():
    with pytest.raises(ChildProcessError, match=r"running _die stopped without a result \(exit code 3;"):
        run_in_child(_die)


def _sleep_then_clean_up(folder: str) -> None:
    Path(folder, "started").write_text(str(os.getpid()))
    try:
        time.sleep(120)
    finally:  # what a job's own clean-up does (train_on_cases: its failed log kept, its temporary folder removed)
        Path(folder, "cleaned up").touch()


def _ended(pid: int, seconds: float = 30) -> bool:
    """Whether process ``pid`` has ended within ``seconds`` (a zombie counts: a container's init may not reap it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z":
            return True
        time.sleep(0.05)
    return False


def _wait_for(path: Path, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


def test_an_interrupted_caller_stops_the_child_after_its_clean_up(monkeypatch, tmp_path):
    """Ctrl+C or SIGTERM while the child trains: the child is stopped, not left running or waited for, and its job's
    clean-up runs first (on POSIX)."""
    real_result = Future.result

    def interrupted(self, timeout=None):
        if not (tmp_path / "started").exists():
            return real_result(self, timeout)  # a TimeoutError while the child starts: the caller waits again
        raise KeyboardInterrupt

    monkeypatch.setattr(Future, "result", interrupted)
    earlier = set(multiprocessing.active_children())  # an earlier test's, not yet reaped
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_in_child(_sleep_then_clean_up, str(tmp_path))
    assert time.monotonic() - start < 60
    assert not set(multiprocessing.active_children()) - earlier
    if os.name == "posix":
        assert (tmp_path / "cleaned up").exists()


def _orphan(folder: str) -> None:
    """A parent killed outright: its child (the grandchild here) must stop by itself, after its clean-up."""
    import threading

    def killed_while_the_job_runs() -> None:
        _wait_for(Path(folder, "started"))
        os._exit(9)

    threading.Thread(target=killed_while_the_job_runs, daemon=True).start()
    run_in_child(_sleep_then_clean_up, folder)


@pytest.mark.skipif(os.name != "posix", reason="the clean-up on SIGTERM is POSIX's")
def test_a_child_whose_parent_dies_stops_by_itself(tmp_path):
    with pytest.raises(ChildProcessError, match="exit code 9"):  # the dying parent as the grandchild's parent
        run_in_child(_orphan, str(tmp_path))
    assert _wait_for(tmp_path / "started")
    assert _wait_for(tmp_path / "cleaned up", 30)  # well before its 120 s sleep would have ended
    assert _ended(int((tmp_path / "started").read_text()))  # and then ended: not left waiting for another job
