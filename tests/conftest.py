"""Shared fixtures: synthetic Derm7pt-layout releases (never real images) and tiny model configs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DERM7PT = Path(__file__).resolve().parents[1].parent / "shared" / "derm7pt" / "release_v0"

META_COLUMNS = [
    "case_num", "diagnosis", "seven_point_score", "pigment_network", "streaks", "pigmentation",
    "regression_structures", "dots_and_globules", "blue_whitish_veil", "vascular_structures",
    "level_of_diagnostic_difficulty", "elevation", "location", "sex", "management", "clinic", "derm", "case_id",
    "notes",
]


@pytest.fixture(autouse=True)
def _wait_policy_left_as_found():
    """The commands that serve queries set OMP_WAIT_POLICY=PASSIVE in this process (``dermcir.cli._waits``); left
    set, every later test's child processes (companion workers, ``run_in_child``) would wait passively too."""
    from dermcir.cli import _waits

    before, set_here = os.environ.get(_waits.POLICY), _waits._set_here
    yield
    if before is None:
        os.environ.pop(_waits.POLICY, None)
    else:
        os.environ[_waits.POLICY] = before
    _waits._set_here = set_here


@contextmanager
def held_in_another_process(lock: str) -> Iterator[None]:
    """Run ``with <lock>:`` in a child Python (``lock``: an expression over ``dermcir`` and ``Path``) while the body
    runs: a lock that another process holds, as a concurrent run would."""
    code = ("import sys, time\nfrom pathlib import Path\nimport dermcir.checkpoint_folder, dermcir.files\n"
            f"with {lock}:\n    print('held', flush=True)\n    sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        yield
    finally:
        child.stdin.close()  # the child leaves the with block and exits
        child.wait(timeout=60)


def synthetic_lesion(seed: int, colour: tuple[int, int, int], size=(96, 64), border: int = 6) -> Image.Image:
    """A skin-coloured image with a coloured blob and a black scanner-like frame."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (225, 190, 160)
    yy, xx = np.mgrid[:h, :w]
    cy, cx = h / 2 + rng.integers(-4, 5), w / 2 + rng.integers(-6, 7)
    blob = ((yy - cy) / (h / 4)) ** 2 + ((xx - cx) / (w / 5)) ** 2 < 1
    img[blob] = colour
    img = np.clip(img.astype(int) + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    if border:
        img[:border] = 0
        img[-border:] = 0
        img[:, : border + 2] = 0
        img[:, -border:] = 0
    return Image.fromarray(img)


def write_release(root: Path, rows: list[dict], colours: dict[str, tuple[int, int, int]] | None = None) -> Path:
    """Write a Derm7pt-layout release; each row needs ``diagnosis`` and may set any meta column."""
    import csv

    colours = colours or {}
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "images" / "SYN").mkdir(parents=True, exist_ok=True)
    with open(root / "meta" / "meta.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=META_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for i, row in enumerate(rows):
            full = {c: "" for c in META_COLUMNS}
            full.update({"case_num": str(i + 1), "derm": f"SYN/img{i:03d}.jpg", "seven_point_score": "0",
                         "pigment_network": "typical", "streaks": "absent", "pigmentation": "absent",
                         "regression_structures": "absent", "dots_and_globules": "regular",
                         "blue_whitish_veil": "absent", "vascular_structures": "absent",
                         "level_of_diagnostic_difficulty": "low", "elevation": "flat", "location": "back",
                         "sex": "female", "management": "clinical follow up"})
            full.update(row)
            writer.writerow(full)
            if row.get("_no_image"):
                continue
            colour = colours.get(full["diagnosis"], (90, 60, 40))
            synthetic_lesion(i, colour).save(root / "images" / full["derm"], quality=92)
    return root


@pytest.fixture
def toy_release(tmp_path: Path) -> Path:
    """24 cases in three categories whose image colour and checklist text both reveal the category."""
    rows, colours = [], {"clark nevus": (120, 80, 50), "melanoma (in situ)": (40, 30, 60), "seborrheic keratosis": (150, 140, 60)}
    for i in range(24):
        dx = ["clark nevus", "melanoma (in situ)", "seborrheic keratosis"][i % 3]
        veil = "present" if dx.startswith("melanoma") else "absent"
        net = {"clark nevus": "typical", "melanoma (in situ)": "atypical", "seborrheic keratosis": "absent"}[dx]
        rows.append({"diagnosis": dx, "blue_whitish_veil": veil, "pigment_network": net})
    return write_release(tmp_path / "release_v0", rows, colours)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMCIR_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


TINY = {"image_size": 64, "grid": 4, "dim": 32, "heads": 2, "n_masks": 2, "max_text_tokens": 64}
