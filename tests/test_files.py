"""Every output the benchmark writes replaces its previous version only once the new one is complete."""

from __future__ import annotations

import json
import os
import stat

import pytest

from dermcir.config import TrainConfig, to_json
from dermcir.evaluation.compare import write_comparison
from dermcir.evaluation.report import write_tables
from dermcir.evaluation.results import build_results
from dermcir.files import atomic_write, write_json_atomic
from tests.test_compare import _rows, _write_run


def test_an_error_while_writing_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    write_json_atomic(target, {"good": 1})
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(target) as fh:
        fh.write('{"half": ')
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"good": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_full_disk_is_named_by_the_file_it_stopped(tmp_path):
    """A cv run on a full disk printed "[Errno 28] No space left on device": no path, no word of what was kept."""
    target = tmp_path / "results.json"
    for kept in ("nothing was written", "the previous file is unchanged"):
        says = f"{target}: could not be written \\(No space left on device\\); {kept}"
        with pytest.raises(OSError, match=says) as info, atomic_write(target) as fh:
            fh.write("{")
            raise OSError(28, "No space left on device")
        assert info.value.errno == 28
        write_json_atomic(target, {"good": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_written_files_get_the_permissions_a_plain_write_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", [1])
        (tmp_path / "plain.json").write_text("[1]")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o644


@pytest.mark.parametrize("writer", ["config", "tables", "comparison"])
def test_the_benchmark_writers_keep_the_previous_output_when_a_write_fails(tmp_path, monkeypatch, writer):
    doc = build_results("dermcir", _rows(2.0), profile="cpu", n_folds=3, n_cases=12, seed=0)
    if writer == "config":
        target = tmp_path / "train_config.json"
        to_json(TrainConfig(), target)
        write = lambda: to_json(TrainConfig(epochs=3), target)
    elif writer == "tables":
        target = tmp_path / "tables.md"
        write_tables(doc, target)
        write = lambda: write_tables({**doc, "method": "another"}, target)
    else:
        target = tmp_path / "comparison.md"
        run = _write_run(tmp_path / "run", "dermcir", 2.0)
        write_comparison([run], target)
        write = lambda: write_comparison([run], target, title="another title")
    before = target.read_bytes()

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match="No space left"):
        write()
    assert target.read_bytes() == before
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]


def test_the_new_contents_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """Without an fsync before the rename, a power loss could leave the new name on a zero-length file."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_json_atomic(tmp_path / "results.json", {"good": 1})
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace"]
    assert events[0][1] == events[1][1]  # the temporary file itself was flushed, then renamed
    assert json.loads((tmp_path / "results.json").read_text()) == {"good": 1}
