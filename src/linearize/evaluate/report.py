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

import json
from pathlib import Path
from typing import Any

from linearize.records import (benchmark_header, device_info, fmt_pct, git_commit, markdown_table, run_metadata,  # noqa: F401
                               save_figure, write_json_with_provenance, write_record)

__all__ = ["run_metadata", "write_record", "read_records", "side_by_side", "eval_markdown", "fmt_pct", "markdown_table", "git_commit"]

KINDS = ("eval", "diagnose", "attribution", "probes", "long")


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
