"""environment.yml and pyproject.toml must name the same packages with the same version ranges."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _norm(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    assert m, f"cannot parse requirement {req!r}"
    name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
    spec = ",".join(sorted(s.strip() for s in m.group(2).replace(" ", "").split(",") if s.strip()))
    return name, spec


def _pyproject() -> dict[str, str]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"])
    for extra in ("test", "mnist-sample"):
        reqs += proj["optional-dependencies"][extra]
    return dict(_norm(r) for r in reqs)


def _environment() -> tuple[dict[str, str], list[str]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    reqs = [r for r in pip if not r.startswith("-e")]
    return dict(_norm(r) for r in reqs), conda


def test_environment_yml_matches_pyproject_packages_and_versions():
    py, (env, _) = _pyproject(), _environment()
    assert set(env) == set(py), (
        f"only in environment.yml: {set(env) - set(py)}; only in pyproject: {set(py) - set(env)}"
    )
    diff = {k: (py[k], env[k]) for k in py if py[k] != env[k]}
    assert not diff, f"version ranges differ (pyproject, environment.yml): {diff}"


def test_environment_pins_python_311_and_torch():
    py, (_, conda) = _pyproject(), _environment()
    assert "python=3.11" in conda
    assert py["torch"] == "==2.14.1" and py["torchvision"] == "==0.29.1"


def test_requirement_parser_detects_a_drift():
    a = dict([_norm("numpy>=2.4,<3")])
    b = dict([_norm("numpy>=2.3,<3")])
    assert a != b
    assert _norm("Scikit_Image >=0.26, <0.27") == ("scikit-image", "<0.27,>=0.26")
