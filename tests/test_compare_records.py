"""scripts/compare_records.py: the check that a change regenerates committed results number for number."""

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("compare_records", Path(__file__).parents[1] / "scripts" / "compare_records.py")
compare = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(compare)


def test_numbers_must_match_and_timings_are_left_out():
    old = {"meta": {"commit": "a"}, "train_seconds": 1.0, "val": {"hybrid": 3.25, "la_only": [1, 2]}}
    same = {"meta": {"commit": "b"}, "train_seconds": 9.0, "val": {"hybrid": 3.25, "la_only": [1, 2]}}
    assert compare.differences(old, same) == []
    changed = {"meta": {}, "train_seconds": 1.0, "val": {"hybrid": 3.2500001, "la_only": [1, 2, 3]}}
    assert compare.differences(old, changed) == ["/val/hybrid: 3.25 != 3.2500001", "/val/la_only: lists of different lengths"]


def test_new_keys_only_when_allowed():
    old, new = {"hybrid": {"window": 64}}, {"hybrid": {"window": 64, "linear_state": "sum"}}
    assert compare.differences(old, new) == ["/hybrid/linear_state: only in second"]
    assert compare.differences(old, new, new_keys=True) == []
    assert compare.differences(new, old, new_keys=True) == ["/hybrid/linear_state: only in first"]
