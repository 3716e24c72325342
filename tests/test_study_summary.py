"""scripts/study_summary.py: the SSD grid is read from resolved recipes, the long-context bands from probe records."""

import importlib.util
import json
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study_summary.py"
spec = importlib.util.spec_from_file_location("study_summary", SCRIPT)
study_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study_summary)


def report(value: float) -> dict:
    return {"piqa": {"headline_metric": "acc", "acc": value}, "average": {"value": value, "ci95": [value - 0.01, value + 0.01]}}


def recipe(schedule, epochs, seed=0, combine="shared_norm", layers="all") -> dict:
    return {"seed": seed, "hybrid": {"combine": combine, "layers": layers},
            "stage2": {"enabled": True, "epochs": epochs, "ssd": {"enabled": True, "schedule": schedule}}}


def write_run(root: Path, name: str, recipe_: dict, reports: dict, probes: dict | None = None,
              mixing: dict | None = None) -> None:
    run = root / name
    (run / "diagnose").mkdir(parents=True)
    (run / "diagnose" / "diagnose.json").write_text(json.dumps({"runs": {"base": report(0.5), **reports}}))
    (run / "summary.json").write_text(json.dumps({"model": "/m/tiny.gguf", "val": {"hybrid": 2.0, "la_only": 3.0},
                                                  "mixing": mixing}))
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe_))
    if probes:
        (run / "probes").mkdir()
        (run / "probes" / "probes.json").write_text(json.dumps(probes))


def test_position_bands_and_means():
    assert study_summary.position_bands(64, 4096) == [(0, 64), (64, 256), (256, 1024), (1024, 2048), (2048, 4096)]
    assert study_summary.position_bands(8, 48) == [(0, 8), (8, 32), (32, 48)]
    curve = {"binned": [1.0, 2.0, 3.0, 4.0], "bin": 16}
    assert study_summary.band_means(curve, [(0, 16), (16, 64)]) == [1.0, 3.0]


def test_summary_fills_the_ssd_grid_from_recipes_and_bands_the_probes(tmp_path):
    modes = {"hybrid": report(0.47), "swa_only": report(0.46), "la_only": report(0.40)}
    three = [[0.0, 0.9], [0.33, 0.75], [0.67, 0.5]]
    curve = {"binned": [3.0] * 4 + [5.0] * 4, "bin": 8}
    probes = {"position_loss": {"window": 8, "num_docs": 2, "seq_len": 64,
                                "curves": {"base": curve, "hybrid": {**curve, "binned": [4.0] * 8}}},
              "passkey": {"accuracy": {"base": {"128": 1.0, "256": 1.0}, "hybrid": {"128": 0.0, "256": 0.5}}}}
    frozen = {"weight": "gamma", "gate": None, "mean": 0.1, "min": 0.1, "max": 0.1, "layers": {"0": [0.1, 0.1]}}
    learned = {"weight": "g (SWA share)", "gate": "learned", "mean": 0.5, "min": 0.4, "max": 0.6,
               "layers": {"0": [0.4, 0.5], "1": [0.5, 0.6]}}
    write_run(tmp_path, "remedies/ssd-seed0", recipe(three, 1), modes, probes, frozen)  # the headline run: a grid cell
    write_run(tmp_path, "remedies/ssd-fixed-0.5-ep2-seed0", recipe([[0.0, 0.5]], 2), modes)
    write_run(tmp_path, "remedies/ssd-seed1", recipe(three, 1, seed=1), modes)  # other seed: not in the grid
    write_run(tmp_path, "beyond/ssd-mix-fixed-seed0", recipe(three, 1, combine="mix"), modes, probes)
    write_run(tmp_path, "beyond/ssd-mix-learned-seed0", recipe(three, 1, combine="mix"), modes, mixing=learned)
    runs = study_summary.load_runs(tmp_path)
    grid = study_summary.ssd_grid(runs)
    assert {key: name for key, (name, _) in grid.items()} == {
        ("0.9→0.75→0.5", 1): "remedies/ssd-seed0", ("fixed 0.5", 2): "remedies/ssd-fixed-0.5-ep2-seed0"}
    study_summary.main(tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "| 0.9→0.75→0.5 | 1 | remedies/ssd-seed0 | 47.00 [46.00, 48.00] |" in text
    assert "| base | 3.00 | 3.00 | 5.00 | 100% |" in text  # bands 0-8, 8-32, 32-64; the base row once
    assert text.count("| base | 3.00") == 1
    assert "| remedies/ssd-seed0 hybrid | 4.00 | 4.00 | 4.00 | 25% |" in text
    # where the gates ended, per layer averaged over heads; a frozen gamma is left out
    assert "| beyond/ssd-mix-learned-seed0 | g (SWA share), learned | 0.500 | 0.400 – 0.600 | 0.45 0.55 |" in text
    assert text.split("## Mixing weights")[1].count("remedies/ssd-seed0") == 0
    for figure in ("summary.png", "ssd_grid.png", "long_context.png"):
        assert (tmp_path / figure).stat().st_size > 0
