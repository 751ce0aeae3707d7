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
