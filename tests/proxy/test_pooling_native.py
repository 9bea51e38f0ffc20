"""The pooler's compiled modules (proxy/native.py): loaded when the build matches the sources,
never when a source changed since, and the interpreted ones otherwise."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILT = (REPO / "proxy" / "_native" / "stamp.json").exists()
PROBE = "import proxy.pooler, proxy.native as n; print(n.compiled())"


def _probe(cwd: Path, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not BUILT, reason="no build of the pooler (scripts/setup.sh makes one when a C compiler is there)")
def test_the_build_is_used_only_while_it_matches_the_sources(tmp_path: Path) -> None:
    assert _probe(REPO) == "True"
    assert _probe(REPO, LAKELET_INTERPRETED="1") == "False"
    # A copy of the code with one hot module edited: its build no longer matches, so all three
    # run interpreted (a stale build never runs code other than what the sources say).
    for room in ("proxy", "compute", "storage", "lakelet"):
        shutil.copytree(REPO / room, tmp_path / room, ignore=shutil.ignore_patterns("__pycache__"))
    assert _probe(tmp_path) == "True"
    with open(tmp_path / "proxy" / "pooled_client.py", "a") as f:
        f.write("\n# edited\n")
    assert _probe(tmp_path) == "False"


def test_the_interpreted_modules_serve_alone() -> None:
    """What runs without a build: the modules import and say so."""
    assert _probe(REPO, LAKELET_INTERPRETED="1") == "False"
