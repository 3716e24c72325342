"""Compare two JSON records number by number, leaving out what differs between runs by nature (timings, commit, dates).

    python scripts/compare_records.py results/demo/diagnose.json runs/demo/diagnose/diagnose.json --allow-new-keys

Used to check that a refactor regenerates committed results exactly: `linearize demo` (the `ssd` recipe at the `cpu`
preset, then `diagnose --limit 25`) on a CPU, then this script against `results/demo/diagnose.json`. Exit code 1 and
one line per difference when any number, list length or key differs; `--allow-new-keys` accepts keys only the new
record has (settings added since, at their defaults, show up in the new record's config).
"""

from __future__ import annotations

import json
import sys

#: Keys whose values legitimately change from run to run.
VOLATILE = ("meta", "commit", "dirty", "device", "date", "time", "model", "out_dir")


def volatile(key: str) -> bool:
    return key in VOLATILE or "seconds" in key or "tokens_per_s" in key


def differences(a, b, path: str = "", *, new_keys: bool = False) -> list[str]:
    """Lines naming each difference; `new_keys`: keys only in `b` (fields added since `a` was written) are allowed."""
    if isinstance(a, dict):
        if not isinstance(b, dict):
            return [f"{path}: object vs {type(b).__name__}"]
        out = []
        for key in sorted(set(a) | set(b)):
            if volatile(key):
                continue
            if key not in a and new_keys:
                continue
            if key not in a or key not in b:
                out.append(f"{path}/{key}: only in {'first' if key in a else 'second'}")
            else:
                out += differences(a[key], b[key], f"{path}/{key}", new_keys=new_keys)
        return out
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return [f"{path}: lists of different lengths"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]", new_keys=new_keys)]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main(argv: list[str]) -> int:
    new_keys = "--allow-new-keys" in argv
    paths = [a for a in argv if a != "--allow-new-keys"]
    if len(paths) != 2:
        print("usage: compare_records.py OLD.json NEW.json [--allow-new-keys]", file=sys.stderr)
        return 2
    first, second = (json.load(open(p, encoding="utf-8")) for p in paths)
    found = differences(first, second, new_keys=new_keys)
    for line in found:
        print(line)
    print(f"{len(found)} differences" if found else "identical (timings, commits and dates left out)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
