"""Put the table `linearize demo` printed into README.md, from the run's own record (never typed by hand).

    python scripts/readme_demo.py [runs/demo]

Copies the run's diagnose record (JSON with commit, device and command, and its Markdown) to results/demo/ and
rewrites the README between the `demo-table` markers: the component table, and how long the demo took and where.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- demo-table:begin (scripts/readme_demo.py writes this block) -->", "<!-- demo-table:end -->"


def table(record: dict) -> str:
    from linearize.records import fmt_pct, markdown_table

    tasks = list(record["lengths"])
    first = next(iter(record["runs"].values()))
    rows = [[label] + [fmt_pct(row["scores"][t]) for t in tasks] + [fmt_pct(row["scores"]["average"]),
                                                                     fmt_pct(row["above_floor"]["average"])]
            for label, row in record["table"].items()]
    n = {first[t].get("n") for t in tasks}
    meta = record["meta"]
    conversion = record.get("conversion", {}).get("wall_seconds")
    diagnose = record["seconds"]["total"]
    where = meta.get("gpu") or f"{meta.get('cpu_count')}-core {str(meta.get('device', '')).upper()}"
    conv_commit = str(record.get("conversion", {}).get("commit") or meta.get("commit"))[:10]
    commits = (f"commit {conv_commit}" if conv_commit == str(meta.get("commit"))[:10]
               else f"commits {conv_commit} (conversion) and {str(meta.get('commit'))[:10]} (diagnostics)")
    timing = (f"Run at {commits} on a {where} machine: conversion {conversion / 60:.0f} min, "
              f"component diagnostics {diagnose / 60:.0f} min ({'/'.join(str(x) for x in sorted(n))} questions per "
              "benchmark, so ±15-20 points); the record is `results/demo/diagnose.json`.")
    return timing + "\n\n" + markdown_table(["Active attention"] + tasks + ["AVG", "Rec. above floor %"], rows)


def main(run_dir: str = "runs/demo") -> None:
    src = Path(run_dir) / "diagnose"
    record = json.loads((src / "diagnose.json").read_text())
    dest = ROOT / "results" / "demo"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("diagnose.json", "diagnose.md"):
        shutil.copy(src / name, dest / name)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + table(record) + "\n" + END + tail)
    print(table(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
