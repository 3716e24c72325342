"""The study tables: every run resolves to a valid recipe, and the plan repeats only the headline runs per seed."""

import pytest

from linearize.cli import main
from linearize.study import TABLES, plan
from linearize.train.recipes import load_recipe


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_study_run_is_a_valid_recipe(table):
    for run in TABLES[table].runs:
        recipe = load_recipe(run.recipe, [*run.overrides, "seed=3"], "gpu-small")
        assert recipe["seed"] == 3
        for override in run.overrides:
            key, value = override.split("=", 1)
            node = recipe
            for part in key.split("."):
                node = node[part]
            assert str(node).replace(" ", "").lower() == value.replace(" ", "").lower() or value.startswith("[")


def test_plan_repeats_headline_runs_per_seed():
    jobs = plan("remedies", seeds=(0, 1)).jobs
    names = [(r.name, s) for r, s in jobs]
    assert ("ssd", 0) in names and ("ssd", 1) in names and ("hedgecats", 1) in names
    assert ("ssd-fixed-0.5-ep5", 0) in names and ("ssd-fixed-0.5-ep5", 1) not in names
    objectives = {r.name: r for r, _ in plan("objectives").jobs}
    assert objectives["objective-hybrid_output"].modes == ("la_only", "none")
    assert "stage2.enabled=false" in objectives["activation-relu"].overrides
    with pytest.raises(KeyError, match="known"):
        plan("nope")


def test_dry_run_lists_the_runs(capsys):
    assert main(["study", "objectives", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "objective-weights-seed0: recipe la-only" in out and "hybrid.feature_map=elu1" in out
