"""`dermcir index | search` mistakes: each is refused with one line (exit 2) naming what is wrong, before any work.

Synthetic images and a tiny random checkpoint only (tests/searchkit.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from dermcir.cli import main
from dermcir.data import Case
from dermcir.index import open_index

from .conftest import write_release
from .searchkit import make_cases, make_index, one_torch_thread, write_case_csv  # noqa: F401 (fixture)


@pytest.fixture
def small(tmp_path):
    """(checkpoint, index root, cases) of a 4-case index, and a CSV of 2 other cases beside it."""
    ckpt, root, cases = make_index(tmp_path, 4)
    csv = write_case_csv(tmp_path / "new" / "cases.csv", make_cases(tmp_path / "new", 2, start=60))
    return ckpt, root, cases, csv


def _index(tmp_path, *args: str) -> list[str]:
    return ["index", "--cache", str(tmp_path / "cache"), "--quiet", *args]


def _one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1, err
    return err[0]


def test_building_over_an_index_needs_rebuild(tmp_path, small, capsys):
    ckpt, root, _cases, csv = small
    live = open_index(root).version
    build = _index(tmp_path, "--checkpoint", str(ckpt), "--data", str(csv), "--out", str(root))
    assert main(build) == 2  # forgot --add: every case would have been replaced
    err = _one_error(capsys)
    assert f"{root}: already holds an index of 4 cases" in err and "--add" in err and "--rebuild" in err
    assert open_index(root).version == live and len(open_index(root)) == 4
    assert main([*build, "--rebuild"]) == 0
    assert f"version {open_index(root).version}: +2 -4, 2 cases" in capsys.readouterr().out
    assert (root / live).is_dir()  # the replaced version stays: going back is rewriting CURRENT (docs/search.md)
    (root / "CURRENT").write_text(live + "\n")
    assert open_index(root).version == live and len(open_index(root)) == 4
    assert main(_index(tmp_path, "--out", str(root), "--remove", "c000")) == 0  # the next write starts from it
    assert "-1, 3 cases" in capsys.readouterr().out
    assert main([*build, "--rebuild", "--add"]) == 2
    assert "--rebuild" in _one_error(capsys)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda"])
def test_a_device_is_checked_while_parsing(tmp_path, capsys, bad):
    if bad == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as code:
        main(["search", "--index", str(tmp_path / "nowhere"), "--text", "streaks absent", "--device", bad])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device:" in err and "Traceback" not in err
    assert ("CUDA is not available" if bad == "cuda" else "expected auto, cpu, cuda or cuda:N") in err


def test_a_weights_file_given_as_the_checkpoint_is_named(tmp_path, small, capsys):
    ckpt, root, _cases, csv = small
    weights = next(p for p in ckpt.iterdir() if p.suffix == ".safetensors")
    assert main(_index(tmp_path, "--out", str(root), "--add", "--data", str(csv), "--checkpoint", str(weights))) == 2
    assert f"{weights}: is a file; expected a checkpoint folder" in _one_error(capsys)


def test_an_unwritable_out_is_one_line_before_encoding(tmp_path, small, capsys, monkeypatch):
    import dermcir.index.build

    ckpt, _root, _cases, csv = small
    monkeypatch.setattr(dermcir.index.build, "encode_cases", lambda *a, **k: pytest.fail("encoded before writing"))
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "index"
    assert main(_index(tmp_path, "--checkpoint", str(ckpt), "--data", str(csv), "--out", str(out))) == 2
    assert f"{out}: Not a directory" in _one_error(capsys)


def test_an_os_error_is_one_line_naming_the_path(tmp_path, small, capsys, monkeypatch):
    import dermcir.index.build

    _ckpt, root, _cases, _csv = small

    def denied(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", str(root / ".lock"))

    monkeypatch.setattr(dermcir.index.build, "writer_lock", denied)
    assert main(_index(tmp_path, "--out", str(root), "--remove", "c001")) == 2
    assert _one_error(capsys).endswith(f"error: {root / '.lock'}: Permission denied")


def test_a_checklist_field_given_twice_is_refused(tmp_path, capsys):
    args = ["search", "--index", str(tmp_path / "index"), "--checklist", "streaks=absent", "Streaks=irregular"]
    assert main(args) == 2
    err = _one_error(capsys)
    assert "--checklist gives streaks twice ('streaks=absent' and 'Streaks=irregular')" in err


@pytest.mark.parametrize(
    ("pair", "expected"),
    [
        ("streak=irregular", "unknown checklist field 'streak'; allowed fields: pigment_network"),
        ("streaks=wavy", "unknown value 'wavy' for checklist field 'streaks'; allowed values: absent, regular, irregular"),
    ],
)
def test_a_mistyped_checklist_is_refused_before_the_index_is_opened(tmp_path, capsys, pair, expected):
    # The index folder does not exist: an error about the checklist shows it was checked before anything was loaded.
    assert main(["search", "--index", str(tmp_path / "no-such-index"), "--checklist", pair]) == 2
    err = _one_error(capsys)
    assert expected in err
    assert "no-such-index" not in err


def _refused_without_torch(argv: list[str]) -> str:
    """Run ``dermcir ARGV`` in a child process (this one has torch loaded already); assert that it was refused (exit
    status 2) with torch never imported, and return its stderr."""
    code = f"import sys; from dermcir.cli import main; rc = main({argv!r}); print(rc, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], (done.stdout, done.stderr)
    return done.stderr


def test_a_mistyped_query_is_refused_without_loading_torch(tmp_path):
    # Loading torch and the model takes seconds; a clinician's typo should cost none of them.
    err = _refused_without_torch(["search", "--index", str(tmp_path), "--checklist", "streaks=wavy"])
    assert "unknown value 'wavy' for checklist field 'streaks'" in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--replace", "--data", "x"], "--replace works only with --add"),
        (["--add", "--kind", "flat", "--data", "x"], "--kind: only for building an index"),
        (["--remove", "c001", "--checkpoint", "x"], "--checkpoint: not used by --remove"),
        (["--data", "x"], "--checkpoint is required to build an index"),
    ],
)
def test_a_mistyped_index_command_is_refused_without_loading_torch(tmp_path, options, message):
    assert message in _refused_without_torch(["index", "--out", str(tmp_path / "idx"), *options])


def test_a_benchmark_into_an_earlier_runs_folder_is_refused_without_loading_torch(tmp_path):
    # The check reads one file; the run it prevents would overwrite the earlier figures after its first fold.
    (tmp_path / "results.json").write_text(json.dumps({"method": "dermcir-composed"}))
    err = _refused_without_torch(["cv", "--data", str(tmp_path / "release"), "--out", str(tmp_path)])
    assert f"{tmp_path}: holds the results of an earlier dermcir-composed run" in err
    assert [f.name for f in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "--index", "{tmp}/none", "--text", "streaks absent"], "{tmp}/none: no dermcir index here"),
        (["serve", "--index", "{tmp}/none"], "{tmp}/none: no dermcir index here"),
        (["index", "--out", "{tmp}/none", "--remove", "c001"], "{tmp}/none: no dermcir index here"),
        (["index", "--out", "{tmp}/none", "--add", "--data", "{tmp}/cases.csv"], "{tmp}/none: no dermcir index here"),
        (["index", "--out", "{tmp}", "--data", "{tmp}/cases.csv", "--checkpoint", "{tmp}/model"],
         "{tmp}: holds files that are not part of a dermcir index (model, notes.txt)"),
        (["index", "--out", "{tmp}/idx", "--data", "{tmp}/none", "--checkpoint", "{tmp}/model"],
         "{tmp}/none: expected a Derm7pt release folder, a .csv file of cases"),
        (["index", "--out", "{tmp}/idx", "--data", "{tmp}/cases.csv", "--checkpoint", "{tmp}/nomodel"],
         "{tmp}/nomodel/config.json: not found; a checkpoint folder holds config.json"),
        (["index", "--out", "{tmp}/idx", "--data", "{tmp}/cases.csv", "--checkpoint", "{tmp}/notes.txt"],
         "{tmp}/notes.txt: is a file; expected a checkpoint folder"),
        (["train", "--data", "{tmp}/none", "--profile", "cpu", "--out", "{tmp}/new"], "{tmp}/none/meta/meta.csv"),
        (["train", "--data", "{tmp}/none", "--out", "{tmp}"],
         "{tmp}: holds model, notes.txt, so it is not a checkpoint folder"),
    ],
)
def test_a_folder_without_what_the_command_needs_is_refused_without_loading_torch(tmp_path, argv, message):
    # an --index, --out, --checkpoint or --data typo costs a fraction of a second, not the seconds of loading torch
    # and the model
    (tmp_path / "notes.txt").write_text("not an index")
    (tmp_path / "model").mkdir()  # a checkpoint as far as the disk checks go, so that the other mistakes show
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model": {}}))
    err = _refused_without_torch([a.format(tmp=tmp_path) for a in argv])
    assert message.format(tmp=tmp_path) in err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["model", "notes.txt"]  # nothing created
    assert [f.name for f in (tmp_path / "model").iterdir()] == ["config.json"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--out", "{tmp}/model", "--set", "epochz=3"], "unknown setting(s) ['epochz']; model: ["),
        (["train", "--out", "{tmp}/model", "--set", "epochs=0"], "setting epochs=0: expected an integer >= 1"),
        (["cv", "--out", "{tmp}/run", "--set", "grid=5"], "grid=5: a model on cached backbone features"),
        (["cv", "--out", "{tmp}/run", "--profile", "gpu", "--set", "backbone=resnet"],
         "setting backbone='resnet': expected a registered backbone: lite0, swin_t"),
        (["prepare", "--set", "views=9"], "setting views=9: expected a whole number from 1 to 4"),
        # no offline weights: were refused when the model was built, after every image had been preprocessed
        (["cv", "--out", "{tmp}/run", "--profile", "gpu", "--set", "backbone=swin_t"],
         "backbone=swin_t has no offline weights: add --set backbone_weights=... (a local checkpoint"),
        (["train", "--out", "{tmp}/model", "--set", "text_encoder=bert"],
         "text_encoder=bert has no offline weights: add --set text_weights=... (a local Hugging Face folder"),
        # what the run sets for itself: was overwritten, or (the template) saved into a checkpoint no dermcir loads
        (["train", "--out", "{tmp}/model", "--set", 'template_version="mine"'],
         "template_version: set by the run from this dermcir's query-text template, not a setting"),
        (["cv", "--out", "{tmp}/run", "--set", "mean=[0,0,0]", "--set", 'categories=["x"]'],
         "categories: set by the run from the cases' categories, not a setting; mean: set by the run from"),
        # a baseline's settings too (dermcir.baselines.configs), with the same words as create_baseline
        (["cv", "--out", "{tmp}/run", "--method", "dahnet", "--set", "epochz=1"],
         "dahnet (cpu profile): unknown setting(s) ['epochz'] for DahnetConfig"),
        (["cv", "--out", "{tmp}/run", "--method", "snf-dca", "--profile", "gpu", "--set", "cross_fit=1"],
         "snf-dca (gpu profile): setting cross_fit=1: expected an integer >= 2"),
        (["cv", "--out", "{tmp}/run", "--method", "maskrcnn-fusion", "--set", "device=tpu"],
         "setting device='tpu': expected 'auto' or a torch device"),
        (["cv", "--out", "{tmp}/run", "--method", "resnet50-cossim", "--set", "seed=1"], "--set 'seed=1': use --seed"),
        # settings the run would never read: recorded as used while the run went on unchanged
        (["cv", "--out", "{tmp}/run", "--set", "lr=0.5"],
         "lr: the cpu profile's backbone is frozen, and lr is the backbone's learning rate; the heads train at head_lr"),
        (["train", "--out", "{tmp}/model", "--set", "companion_weight=0.9"],
         "companion_weight: this model has no companion"),
        (["cv", "--out", "{tmp}/run", "--profile", "gpu", "--set", "companion=null", "--set", "companion_epochs=3"],
         "companion_epochs: this model has no companion"),
        # a weights path that is not there: was taken for a hub name, and failed 13-22 s later in the hub's words
        (["cv", "--out", "{tmp}/run", "--profile", "gpu", "--set", "backbone=swin_t",
          "--set", 'backbone_weights="{tmp}/swim.safetensors"'],
         "backbone_weights={tmp}/swim.safetensors: no such file or folder on this machine"),
        (["train", "--out", "{tmp}/model", "--set", "text_encoder=bert", "--set", 'text_weights="./bret"'],
         "text_weights=./bret: no such file or folder on this machine"),
        (["cv", "--out", "{tmp}/run", "--folds", "3", "--only-fold", "3"],
         "--only-fold 3: a 3-fold split has folds 0 to 2"),
        (["cv", "--out", "{tmp}/run", "--only-fold", "1", "--only-fold", "1"], "--only-fold names a fold twice: [1, 1]"),
    ],
)
def test_a_mistyped_setting_is_refused_without_loading_torch(tmp_path, argv, message):
    # every --set is checked (its name and value) before the cases, the model and torch load
    release = tmp_path / "release"  # never read: the setting is refused first
    err = _refused_without_torch([*[a.format(tmp=tmp_path) for a in argv], "--data", str(release),
                                  "--cache", str(tmp_path / "cache")])
    assert message.format(tmp=tmp_path) in err
    assert list(tmp_path.iterdir()) == []


def test_an_index_or_a_checkpoint_mistake_of_a_real_index_is_refused_without_loading_torch(tmp_path, small):
    ckpt, root, _cases, csv = small
    live = open_index(root).version
    err = _refused_without_torch(["index", "--out", str(root), "--data", str(csv), "--checkpoint", str(ckpt)])
    assert f"{root}: already holds an index of 4 cases" in err and "--rebuild" in err  # forgot --add
    for command in (["search", "--text", "streaks absent"], ["serve"]):
        err = _refused_without_torch([*command, "--index", str(root), "--checkpoint", str(tmp_path / "nomodel")])
        assert f"{tmp_path / 'nomodel' / 'config.json'}: not found" in err
    assert open_index(root).version == live and len(open_index(root)) == 4


def test_updates_of_a_mistyped_out_create_nothing(tmp_path, small, capsys):
    _ckpt, _root, _cases, csv = small
    typo = tmp_path / "typo" / "runs" / "idx"
    for update in (["--remove", "c001"], ["--add", "--data", str(csv)]):
        assert main(_index(tmp_path, "--out", str(typo), *update)) == 2
        assert f"{typo}: no dermcir index here" in _one_error(capsys)
    assert not (tmp_path / "typo").exists()


def test_remove_refuses_the_options_it_would_ignore(tmp_path, small, capsys):
    _ckpt, root, _cases, _csv = small
    given = ["--checkpoint", "x", "--image-root", "y", "--min-cases", "3", "--device", "cpu"]
    assert main(_index(tmp_path, "--out", str(root), "--remove", "c001", *given)) == 2
    assert "--checkpoint, --image-root, --min-cases, --device: not used by --remove" in _one_error(capsys)
    assert len(open_index(root)) == 4


def test_heatmaps_without_json_are_refused(tmp_path, small, capsys):
    _ckpt, root, _cases, _csv = small
    assert main(["search", "--index", str(root), "--text", "streaks absent", "--heatmaps"]) == 2
    assert "--heatmaps needs --json" in _one_error(capsys)


def test_image_root_with_a_derm7pt_release_is_refused(tmp_path, small, capsys):
    ckpt = small[0]
    release = write_release(tmp_path / "release", [])
    out = tmp_path / "index7"
    args = _index(tmp_path, "--checkpoint", str(ckpt), "--data", str(release), "--out", str(out))
    assert main([*args, "--image-root", str(tmp_path)]) == 2
    assert "--image-root applies to a CSV of cases" in _one_error(capsys)
    assert not out.exists()


def test_an_add_with_no_usable_case_exits_2(tmp_path, small, capsys):
    _ckpt, root, _cases, _csv = small
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "missing.csv").write_text("id,image,diagnosis\nz1,nope1.png,melanoma\nz2,nope2.png,nevus\n")
    assert main(_index(tmp_path, "--out", str(root), "--add", "--data", str(tmp_path / "m" / "missing.csv"))) == 2
    assert "no usable new case (2 left out" in _one_error(capsys)
    assert len(open_index(root)) == 4
    # a clinic re-exporting its archive: the indexed rows, and a new one whose image is missing
    gone = Case("z3", tmp_path / "m" / "nope3.png", "melanoma", "melanoma")
    archive = write_case_csv(tmp_path / "m" / "archive.csv", [*_cases, gone])
    assert main(_index(tmp_path, "--out", str(root), "--add", "--data", str(archive))) == 2
    assert "no usable new case (1 left out, e.g. " in _one_error(capsys)
    assert len(open_index(root)) == 4


def test_the_demo_index_tolerates_new_cases_it_cannot_read(tmp_path, small):
    from dermcir.cli.search import _demo_index

    ckpt, root, cases, _csv = small
    broken = make_cases(tmp_path / "broken", 1, start=90)
    broken[0].image.write_bytes(b"not an image")  # left out of the first build, so "new" on every run
    _demo_index([*cases, *broken], ckpt, root, tmp_path / "cache")
    assert len(open_index(root)) == 4


def test_sigterm_ends_a_command_through_its_clean_up(monkeypatch):
    """``timeout`` and ``kill`` send SIGTERM, which by default ends Python at once: no ``finally``, no worker stopped,
    no temporary file removed. While a command runs it is a SystemExit instead, and the handler before it comes back."""
    import os
    import signal

    from dermcir import cli

    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def handler(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            seen["cleaned up"] = True

    monkeypatch.setattr(cli, "build_parser", lambda: _Parser(handler))
    with pytest.raises(SystemExit) as stopped:
        cli.main(["anything"])
    assert stopped.value.code == 128 + signal.SIGTERM and seen == {"cleaned up": True}
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_ends_a_command_with_one_line_and_code_130(monkeypatch, capsys):
    from dermcir import cli

    seen = {}

    def handler(args):
        try:
            raise KeyboardInterrupt
        finally:
            seen["cleaned up"] = True

    monkeypatch.setattr(cli, "build_parser", lambda: _Parser(handler))
    assert cli.main(["anything"]) == 130
    assert capsys.readouterr().err == "dermcir anything: interrupted\n" and seen == {"cleaned up": True}


class _Parser:
    """Stands in for the argument parser: every command runs ``handler``."""

    def __init__(self, handler):
        self.handler = handler

    def parse_args(self, argv):
        import argparse

        return argparse.Namespace(command="anything", verbose=False, handler=self.handler)


# A stand-in for a command's work, run as the `dermcir` command itself (argv from sys.argv): ``compare`` is patched
# so that no run folder is needed.
_AS_THE_COMMAND = """
import signal, sys
import dermcir.cli.compare as compare
from dermcir.cli import main

def work(args):
    {body}

compare.cmd_compare = work
sys.argv = ["dermcir", "compare", "run", "--out", "x.md"]
code = main()
{after}
sys.exit(code)
"""


def _as_the_command(body: str, after: str = "") -> subprocess.Popen:
    script = _AS_THE_COMMAND.format(body=body, after=after)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_reader_that_stops_early_is_no_error():
    """`dermcir search ... --json | head -c 10` said "error: [Errno 32] Broken pipe" with the bad-input code 2, or
    Python's "Exception ignored ... BrokenPipeError" with 120: a script could not tell it from bad input."""
    proc = _as_the_command("for _ in range(20_000): print('x' * 100)")
    assert proc.stdout.read(10) == b"x" * 10
    proc.stdout.close()  # the reader stops, as `head` does
    proc.wait(timeout=60)
    assert proc.returncode == 141, proc.stderr.read()
    assert proc.stderr.read() == b""


def test_a_broken_pipe_that_is_not_stdout_is_an_error(monkeypatch, capsys):
    """Only a stopped reader of stdout is quiet: a worker process's pipe breaking is reported like any error."""
    from dermcir.cli import compare

    def work(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(compare, "cmd_compare", work)
    assert main(["compare", "run", "--out", "x.md"]) == 2
    assert "dermcir compare: error: " in capsys.readouterr().err
    proc = _as_the_command("raise BrokenPipeError(32, 'Broken pipe')")  # stdout still read: the same, as a command
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and b"dermcir compare: error: " in err


def test_a_ctrl_c_once_the_work_is_done_is_ignored_by_the_command_only(monkeypatch):
    """Ctrl+C during the second or two of the interpreter's shutdown printed a traceback over the result."""
    proc = _as_the_command("return 0", after="print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)")
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out.strip()) == (0, b"True"), err
    # called as a function (a test, a library), the caller's own Ctrl+C handling is left as it was
    from dermcir.cli import compare

    monkeypatch.setattr(compare, "cmd_compare", lambda args: 0)
    before = signal.getsignal(signal.SIGINT)
    assert main(["compare", "run", "--out", "x.md"]) == 0
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_only_on_a_terminal(tmp_path, monkeypatch, terminal):
    """In a log file a bar was every update after a carriage return on one line, with log records glued to it."""
    from dermcir.cli import core

    seen = {}
    monkeypatch.setattr(core, "cmd_prepare", lambda args: seen.update(quiet=args.quiet))  # None: exit 0
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert main(["prepare", "--data", str(tmp_path)]) == 0
    assert seen["quiet"] is (not terminal)
