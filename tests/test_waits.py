"""The commands' OpenMP wait policy, and ``run_in_child``, in which the demo trains with the user's own policy.

Kept free of heavy imports: each child imports this module to find its job.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

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
    with pytest.raises(BrokenProcessPool):
        run_in_child(_die)


def test_an_interrupted_caller_stops_the_child(monkeypatch):
    """Ctrl+C or SIGTERM while the child trains: the child is stopped, not left running or waited for."""

    def interrupted(self, timeout=None):
        deadline = time.monotonic() + 60
        while not multiprocessing.active_children() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise KeyboardInterrupt

    monkeypatch.setattr(Future, "result", interrupted)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_in_child(time.sleep, 120)
    assert time.monotonic() - start < 60
    assert not multiprocessing.active_children()
