"""Provenance and records, below every layer that writes results: the git commit and device of a run, its metadata
block, JSON and Markdown record files, figures and Markdown tables.

Train, evaluate and the benchmarks all write through these helpers, so they live here rather than in any of them
(see ARCHITECTURE.md). ``linearize.evaluate.report`` builds the evaluation reports on top.
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

__all__ = ["git_commit", "device_info", "run_metadata", "write_record", "write_json_with_provenance", "benchmark_header",
           "save_figure", "fmt_pct", "markdown_table"]


def git_commit() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout holding this source file.

    ``$LINEARIZE_COMMIT``, when set, names the commit a copy of the sources was made from and wins: a remote
    machine's copy may carry git metadata of another commit (the device machines' copies do: their records said
    the session's first commit, dirty). Otherwise only a repository that tracks this file counts: a copy of the
    sources placed inside some other checkout would report that checkout's HEAD.
    """
    here = Path(__file__).resolve()
    repo = here.parents[2]  # <repo>/src/linearize/records.py
    fallback = {"commit": os.environ.get("LINEARIZE_COMMIT"), "dirty": None}
    if fallback["commit"]:
        return fallback

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


# ----------------------------------------------------------------------------- formatting


def fmt_pct(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{100 * x:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)
