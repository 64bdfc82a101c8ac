"""The command blocks of README.md and docs/ that are marked runnable run as written.

A fenced block whose info string is ``bash runnable`` (or ``python runnable``) is an example a reader can
paste: every such block of one page runs, in page order, in one fresh folder (so a later block may use what
an earlier one wrote), with the project's ``configs/`` beside it and the ``micronet`` command of this Python
on the PATH. A block that fails fails the test with its output. Blocks without the marker are output
listings or take too long for the suite (full-data training).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+) runnable\s*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def runnable_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of each block of ``page`` marked runnable, in page order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text(encoding="utf-8"))]


def _run(language: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    command = ["bash", "-euo", "pipefail", "-c", code] if language in ("bash", "sh", "console") else [sys.executable, "-c", code]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_has_runnable_examples():
    """The tour runs here; the own-model block (it needs a trained network first) in test_top_level_api."""
    assert runnable_blocks(ROOT / "README.md")
    assert "<!-- runnable: own-model -->" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("page", [p for p in PAGES if runnable_blocks(p)], ids=lambda p: p.name)
def test_runnable_blocks_run(page: Path, tmp_path: Path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for number, (language, code) in enumerate(runnable_blocks(page), 1):
        result = _run(language, code, tmp_path)
        assert result.returncode == 0, (f"{page.name}, runnable block {number} ({language}) exited with "
                                        f"{result.returncode}:\n{code}\n--- output ---\n{result.stdout[-3000:]}"
                                        f"\n{result.stderr[-3000:]}")


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces → hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", page.read_text(encoding="utf-8"), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    """Every link from README.md or docs/ to a file of the repository (and a heading in it) exists."""
    broken = []
    for url in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", url):
            continue
        path, _, anchor = url.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists() or (anchor and target.suffix == ".md" and anchor not in _anchors(target)):
            broken.append(url)
    assert not broken, f"{page.name}: broken links {broken}"
