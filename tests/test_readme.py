"""The README's commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _first_fenced_block(text: str) -> str:
    m = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert m, "README.md must open with a fenced block of commands"
    return m.group(1)


def test_readme_test_command_is_what_ci_runs():
    block = _first_fenced_block((ROOT / "README.md").read_text())
    commands = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.split("#")[0].strip()]
    assert "make test" in commands
    ci = (ROOT / ".ci" / "run").read_text()
    ci_commands = [ln.split(" #")[0].strip() for ln in ci.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert "make test" in ci_commands, ".ci/run must call the README's test command"


def test_makefile_has_the_readme_targets():
    mk = (ROOT / "Makefile").read_text()
    block = _first_fenced_block((ROOT / "README.md").read_text())
    for target in re.findall(r"make (\w+)", block):
        assert re.search(rf"^{target}:", mk, re.M), f"README uses `make {target}` but the Makefile has no such target"


def test_readme_opens_with_each_paper_its_notebooks_and_status():
    """Before the commands, one table: every paper of the companion, with a status, and only notebooks that exist."""
    text = (ROOT / "README.md").read_text()
    head = text[: text.index("```")]
    rows = [ln for ln in head.splitlines() if ln.startswith("| ") and not ln.startswith("| ---")]
    assert rows and rows[0].startswith("| paper |"), "README.md must open with the table of papers"
    stems = {p.name[:2] for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}
    for paper in ("JPMAP", "PnP-HVAE", "VBLE", "AIPO"):
        mine = [r for r in rows[1:] if f"**{paper}" in r or r.startswith(f"| {paper},")]
        assert mine, f"the papers table has no row for {paper}"
        for r in mine:
            status = r.rstrip(" |").rsplit(" | ", 1)[-1]
            assert re.search(r"reproduced|partly|not yet|rows below", status), f"{paper}: no status in {r!r}"
    for row in rows[1:]:
        notebooks = row.split(" | ")[2]
        for lo, hi in re.findall(r"`(\d\d)`(?:-`(\d\d)`)?", notebooks):
            for n in range(int(lo), int(hi or lo) + 1):
                assert f"{n:02d}" in stems, f"the papers table names notebook {n:02d}, which does not exist"
