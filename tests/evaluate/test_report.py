"""Records (JSON + Markdown with provenance) and `linearize report` side by side."""

from __future__ import annotations

import json

from linearize.cli import main
from linearize.evaluate.report import eval_markdown, read_records, run_metadata, side_by_side, write_record


def _bench(value):
    return {"piqa": {"acc": value, "acc_ci95": [value - 0.05, value + 0.05], "n": 10, "num_fewshot": 0,
                     "headline_metric": "acc"},
            "average": {"value": value, "ci95": [value - 0.05, value + 0.05], "metrics": {"piqa": "acc"}}}


def test_metadata_has_provenance():
    meta = run_metadata(model_info={"model": "m", "kind": "base", "base": None, "recipe": "ssd", "hybrid": None},
                        data_dir="/data", device="cpu", seed=7, argv=["linearize", "eval", "m"], extra_field=1)
    for key in ("time", "command", "commit", "dirty", "device", "seed", "data_dir", "versions", "model", "recipe"):
        assert key in meta
    assert meta["command"] == "linearize eval m" and meta["seed"] == 7 and meta["extra_field"] == 1
    assert meta["recipe"] == "ssd" and "torch" in meta["versions"]


def test_commit_of_a_source_copy_inside_another_checkout(tmp_path):
    """An exported copy of the sources inside an unrelated repository reports $LINEARIZE_COMMIT, not that HEAD."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import linearize

    outer = tmp_path / "outer"
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    shutil.copytree(Path(linearize.__file__).parent, outer / "copy" / "src" / "linearize")
    code = "from linearize.evaluate.report import git_commit; print(git_commit())"
    env = {**os.environ, "PYTHONPATH": str(outer / "copy" / "src"), "LINEARIZE_COMMIT": "abc123"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{'commit': 'abc123', 'dirty': None}"
    # a copy that carries git metadata of another commit (what the device machines' copies do): the variable wins
    tracked = tmp_path / "tracked"
    shutil.copytree(Path(linearize.__file__).parents[1], tracked / "src")
    subprocess.run(["git", "init", "-q", str(tracked)], check=True)
    subprocess.run(["git", "-C", str(tracked), "add", "src"], check=True)
    subprocess.run(["git", "-C", str(tracked), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], check=True)
    env["PYTHONPATH"] = str(tracked / "src")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{'commit': 'abc123', 'dirty': None}"
    env.pop("LINEARIZE_COMMIT")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "abc123" not in out and "'dirty': False" in out


def test_write_read_and_side_by_side(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    rec_a = {"meta": run_metadata(model_info={"model": "runs/alpha"}, seed=1), "runs": {"hybrid": _bench(0.6),
                                                                                        "none": _bench(0.5)}}
    path, md = write_record(a, "eval", rec_a, eval_markdown(rec_a))
    assert json.loads(path.read_text())["kind"] == "eval" and "| piqa | acc | 0 | 10 |" in md.read_text()
    write_record(b, "diagnose", {"meta": {"model": "runs/beta"}, "runs": {"base": _bench(0.7)}}, "x")
    write_record(b, "probes", {"meta": {"model": "runs/beta"},
                               "passkey": {"accuracy": {"base": {"512": 1.0, "1024": 0.5}}},
                               "position_loss": {"curves": {"base": {"mean_in_window": 3.0, "mean_beyond_window": 2.5}}}},
                 "x")
    write_record(b, "attribution", {"meta": {"model": "runs/beta"},
                                    "summary": {"la_mass_share": 0.25, "la_output_share": 0.5, "loss_hybrid": 3.0,
                                                "max_loss_increase_no_la": 0.1, "max_loss_increase_no_swa": 2.0}}, "x")
    (b / "other.json").write_text("{\"not\": \"a record\"}")
    assert [r["kind"] for r in read_records(b)] == ["attribution", "diagnose", "probes"]
    md = side_by_side([a, b])
    assert "alpha [hybrid]" in md and "alpha [none]" in md and "beta [base]" in md
    assert "| piqa | 60.00 | 50.00 | 70.00 |" in md
    assert "| average | 60.00 | 50.00 | 70.00 |" in md
    assert "Passkey" in md and "| beta | base | 100 | 50 |" in md
    assert "| beta | 25.00 | 50.00 | 3.0000 | +0.1000 | +2.0000 |" in md
    out = tmp_path / "r.md"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    assert out.read_text() == md
    assert "linearize report" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "empty")]) == 2  # no records: an error, not a crash
