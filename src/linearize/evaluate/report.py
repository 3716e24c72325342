"""Run records and reports: every evaluation command writes ``<kind>.json`` + ``<kind>.md`` (+ PNGs).

A record is ``{"kind": "eval"|"diagnose"|"attribution"|"probes", "meta": run_metadata(...), ...}``.
``meta`` holds the model (and its base, recipe and hybrid settings when known), the data directory,
the git commit (and whether the tree had uncommitted changes), the device, the seed, library
versions and the command line, so a number can always be traced back to how it was made.

:func:`side_by_side` (``linearize report DIR...``) reads the records of several runs and puts them
next to each other in Markdown tables: benchmark scores (one column per run and component mode),
passkey accuracy, the loss of each probe, and the mean LA share of the attribution.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["run_metadata", "write_record", "read_records", "side_by_side", "eval_markdown", "fmt_pct", "markdown_table", "git_commit"]

KINDS = ("eval", "diagnose", "attribution", "probes", "long")


def git_commit() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout holding this source file.

    Only a repository that tracks this file counts: a copy of the sources placed inside some other checkout
    (e.g. an exported tree on a remote machine) would otherwise report that checkout's HEAD. Without one,
    ``$LINEARIZE_COMMIT`` names the commit the copy was made from.
    """
    here = Path(__file__).resolve()
    repo = here.parents[3]
    fallback = {"commit": os.environ.get("LINEARIZE_COMMIT"), "dirty": None}

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)

    try:
        if git("ls-files", "--error-unmatch", str(here)).returncode != 0:
            return fallback
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return fallback
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return fallback


def device_info(device: str | None = None) -> dict[str, Any]:
    import torch

    dev = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out: dict[str, Any] = {"device": dev, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "platform": platform.platform()}
    if dev.startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(torch.device(dev))
    return out


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "lm_eval", "linearize"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing library is just not recorded
            pass
    return out


def run_metadata(*, model_info: dict[str, Any] | None = None, data_dir=None, device=None, seed=None,
                 argv: list[str] | None = None, **extra) -> dict[str, Any]:
    """The provenance block of a record (see the module doc)."""
    meta: dict[str, Any] = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(argv if argv is not None else ["linearize", *sys.argv[1:]]),
        **git_commit(),
        **device_info(device),
        "seed": seed,
        "data_dir": str(data_dir) if data_dir is not None else None,
        "versions": _versions(),
    }
    if model_info:
        meta.update({k: model_info.get(k) for k in ("model", "kind", "base", "recipe", "hybrid")})
    meta.update(extra)
    return meta


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_record(out_dir, kind: str, record: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<kind>.json`` (``record`` plus ``"kind"``) and ``<kind>.md``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}.json"
    path.write_text(json.dumps(_jsonable({"kind": kind, **record}), indent=2) + "\n")
    md = out / f"{kind}.md"
    md.write_text(markdown.rstrip() + "\n")
    return path, md


def write_json_with_provenance(path, record: dict[str, Any], device: str) -> Path:
    """Write ``record`` as JSON with this checkout's commit and ``device`` on top; atomically, so that a
    reader (another process of a study) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_jsonable({**git_commit(), "device": device, **record})))
    os.replace(tmp, path)
    return path


def benchmark_header(env: dict[str, Any]) -> dict[str, Any]:
    """The top of a `linearize bench` results file: commit, device and command from its environment record
    (``git_commit``, ``device``, ``command``), then that record whole."""
    return {"commit": env["git_commit"], "device": env["device"], "command": env["command"], "environment": env}


def save_figure(fig, path) -> Path:
    """Lay out, write (creating folders) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is None:  # a figure made with its own layout (constrained: colorbars) keeps it
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_records(path) -> list[dict[str, Any]]:
    """Every record in a run directory (or one record file); each gets ``"_path"``."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.json"))
    out = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("kind") in KINDS:
            data["_path"] = str(f)
            out.append(data)
    return out


# ----------------------------------------------------------------------------- formatting


def fmt_pct(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{100 * x:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def benchmark_runs(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{label: harness report}`` of an eval or diagnose record."""
    return dict(record.get("runs", {}))


def _run_name(record: dict[str, Any], i: int) -> str:
    meta = record.get("meta", {})
    name = meta.get("model") or f"run{i}"
    return Path(str(name)).name or str(name)


def side_by_side(paths) -> str:
    """Markdown comparing the runs in ``paths`` (directories or record files)."""
    records = []
    for p in paths:
        found = read_records(p)
        if not found:
            raise FileNotFoundError(f"{p}: no linearize records (*.json with a 'kind')")
        records.extend(found)
    parts = ["# linearize report", ""]
    parts.append(markdown_table(["#", "kind", "model", "commit", "device", "file"], [
        [i, r["kind"], _run_name(r, i), (r.get("meta", {}).get("commit") or "?")[:10],
         r.get("meta", {}).get("gpu") or r.get("meta", {}).get("device", "?"), r["_path"]]
        for i, r in enumerate(records)]))

    bench = [(i, r) for i, r in enumerate(records) if r["kind"] in ("eval", "diagnose")]
    if bench:
        columns, tasks = [], []
        for i, r in bench:
            for label, rep in benchmark_runs(r).items():
                columns.append((f"{_run_name(r, i)} [{label}]", rep))
                tasks += [t for t in rep if t != "average" and t not in tasks]
        header = ["benchmark"] + [c for c, _ in columns]
        rows = []
        for t in tasks + ["average"]:
            row = [t]
            for _, rep in columns:
                e = rep.get(t)
                if e is None:
                    row.append("–")
                elif t == "average":
                    row.append(fmt_pct(e.get("value")))
                else:
                    row.append(fmt_pct(e.get(e.get("headline_metric", "acc"))))
            rows.append(row)
        parts += ["", "## Benchmarks (headline metric, %)", "", markdown_table(header, rows)]

    probes = [(i, r) for i, r in enumerate(records) if r["kind"] == "probes"]
    if probes:
        rows = []
        for i, r in probes:
            for label, pk in r.get("passkey", {}).get("accuracy", {}).items():
                rows.append([_run_name(r, i), label] + [fmt_pct(v, 0) for v in pk.values()])
        if rows:
            lengths = list(next(iter(probes[0][1].get("passkey", {}).get("accuracy", {}).values()), {}).keys())
            parts += ["", "## Passkey accuracy (%)", "", markdown_table(["model", "variant"] + lengths, rows)]
        rows = []
        for i, r in probes:
            for label, curve in r.get("position_loss", {}).get("curves", {}).items():
                rows.append([_run_name(r, i), label, f"{curve.get('mean_in_window', float('nan')):.3f}",
                             f"{curve.get('mean_beyond_window', float('nan')):.3f}"])
        if rows:
            parts += ["", "## Per-position loss (mean nats/token)", "",
                      markdown_table(["model", "variant", "positions < window", "positions >= window"], rows)]

    attr = [(i, r) for i, r in enumerate(records) if r["kind"] == "attribution"]
    if attr:
        rows = []
        for i, r in attr:
            s = r.get("summary", {})
            rows.append([_run_name(r, i), fmt_pct(s.get("la_mass_share")), fmt_pct(s.get("la_output_share")),
                         f"{s.get('loss_hybrid', float('nan')):.4f}", f"{s.get('max_loss_increase_no_la', float('nan')):+.4f}",
                         f"{s.get('max_loss_increase_no_swa', float('nan')):+.4f}"])
        parts += ["", "## Attribution (means over layers and heads)", "",
                  markdown_table(["model", "LA mass %", "LA output-norm %", "loss (hybrid)",
                                  "max Δloss LA off", "max Δloss SWA off"], rows)]
    return "\n".join(parts) + "\n"


def _score_cell(entry: dict[str, Any] | None, with_ci: bool = True) -> str:
    if not entry:
        return "–"
    metric = entry.get("headline_metric", "acc")
    value = entry.get(metric)
    ci = entry.get(f"{metric}_ci95")
    cell = fmt_pct(value)
    if with_ci and ci:
        cell += f" [{fmt_pct(ci[0], 1)}, {fmt_pct(ci[1], 1)}]"
    return cell


def eval_markdown(record: dict[str, Any]) -> str:
    """Markdown of an ``eval`` record: one row per benchmark, one column per run (mode)."""
    meta = record.get("meta", {})
    runs = benchmark_runs(record)
    tasks: list[str] = []
    for rep in runs.values():
        tasks += [t for t in rep if t != "average" and t not in tasks]
    header = ["benchmark", "metric", "shots", "n"] + [f"{label} (%, 95% CI)" for label in runs]
    rows = []
    for t in tasks:
        first = next((rep[t] for rep in runs.values() if t in rep), {})
        rows.append([t, first.get("headline_metric", "?"), first.get("num_fewshot", "?"), first.get("n", "?")]
                    + [_score_cell(rep.get(t)) for rep in runs.values()])
    avg_cells = []
    for rep in runs.values():
        a = rep.get("average", {})
        cell = fmt_pct(a.get("value"))
        if a.get("ci95"):
            cell += f" [{fmt_pct(a['ci95'][0], 1)}, {fmt_pct(a['ci95'][1], 1)}]"
        avg_cells.append(cell)
    rows.append(["**average**", "", "", ""] + avg_cells)
    lines = [f"# eval: {meta.get('model')}", "",
             f"commit {str(meta.get('commit'))[:10]}{' (dirty)' if meta.get('dirty') else ''} · "
             f"device {meta.get('gpu') or meta.get('device')} · seed {meta.get('seed')} · limit {meta.get('limit')}",
             f"`{meta.get('command')}`", "", markdown_table(header, rows)]
    return "\n".join(lines) + "\n"
