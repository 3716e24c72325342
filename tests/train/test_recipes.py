"""Recipe files, overrides, presets, validation, and the resolved recipe in the run directory."""

import json

import pytest
import yaml

from linearize.errors import LinearizeError
from linearize.train import run_recipe
from linearize.train.recipes import (
    PRESETS, RECIPE_DIR, RecipeError, available_recipes, dump_recipe, load_recipe,
)
from lz_train_helpers import random_data, tiny_llama, tiny_recipe


def test_shipped_recipes():
    assert set(available_recipes()) >= {"lolcats", "la-only", "hedgecats", "ssd"}
    for name in available_recipes():
        text = (RECIPE_DIR / f"{name}.yaml").read_text()
        assert text.startswith("#"), f"{name}.yaml needs a header comment saying what it reproduces"
        r = load_recipe(name)
        assert r["reproduces"] and r["name"] == name
        assert r["data"]["seq_len"] == 1024 and r["stage1"]["lr"] == 1e-2
    lol = load_recipe("lolcats")
    assert lol["stage1"]["objective"] == "hybrid_output" and lol["stage1"]["loss_scale"] == 1000
    assert lol["hybrid"]["combine"] == "shared_norm" and lol["hybrid"]["gamma_trainable"] and lol["stage1"]["train_mixing"]
    assert lol["hybrid"]["gamma_init"] == 0.1
    la = load_recipe("la-only")
    assert la["stage1"]["objective"] == "weights" and not la["stage2"]["enabled"]
    hc = load_recipe("hedgecats")
    assert hc["stage1"]["objective"] == "weights" and hc["stage2"]["early_stopping"]["enabled"]
    ssd = load_recipe("ssd")
    assert ssd["stage2"]["ssd"]["enabled"] and ssd["stage2"]["lr"] == 1e-4
    assert [p for _, p in ssd["stage2"]["ssd"]["schedule"]] == [0.9, 0.75, 0.5]
    assert ssd["stage2"]["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0,
                                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def test_overrides_are_yaml_typed():
    r = load_recipe("ssd", ["stage2.lora.r=4", "stage1.lr=1e-3", "stage2.lora.target_modules=[q_proj, v_proj]",
                            "stage2.ssd.granularity=layer", "stage1.max_steps=null", "hybrid.window=32"])
    assert r["stage2"]["lora"]["r"] == 4 and isinstance(r["stage2"]["lora"]["r"], int)
    assert r["stage1"]["lr"] == 1e-3
    assert r["stage2"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert r["stage2"]["ssd"]["granularity"] == "layer" and r["stage1"]["max_steps"] is None
    assert r["hybrid"]["window"] == 32


@pytest.mark.parametrize("bad", ["stage2.lora.rank=4", "stage3.lr=1", "hybrid.windw=3", "stage1.objective=mse",
                                 "stage2.ssd.granularity=head", "stage2.ssd.schedule=[[0.5, 0.9]]", "hybrid.combine=x",
                                 "stage1.batch_size=0", "nonsense"])
def test_invalid_recipes_are_rejected(bad):
    with pytest.raises(RecipeError):
        load_recipe("ssd", [bad])


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(RecipeError, match="ssd"):
        load_recipe("nope")


def test_preset_and_override_order(tmp_path):
    r = load_recipe("ssd", ["stage1.max_steps=3"], preset="cpu")
    assert r["preset"] == "cpu" and r["data"]["seq_len"] == PRESETS["cpu"]["data"]["seq_len"]
    assert r["stage1"]["max_steps"] == 3  # --set wins over the preset
    assert r["stage2"]["ssd"]["enabled"]  # the recipe survives the preset
    dump_recipe(r, tmp_path / "recipe.yaml")
    again = load_recipe(str(tmp_path / "recipe.yaml"))
    assert {**again, "resolved": False} == {**r, "resolved": False}  # the preset is not re-applied over the override
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["stage1"]["max_steps"] == 3


def test_run_writes_resolved_recipe_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run"
    summary = run_recipe(tiny_llama(), "la-only", out, overrides=tiny_recipe(), data=random_data())
    assert set(summary["val"]) == {"hybrid", "swa_only", "la_only"}
    gamma = summary["mixing"]  # shared_norm's gamma, one per query head, in every converted layer
    assert gamma["weight"] == "gamma" and len(gamma["layers"]) == tiny_llama().config.num_hidden_layers
    assert json.loads((out / "summary.json").read_text())["mixing"] == gamma
    resolved = load_recipe(str(out / "recipe.yaml"))
    assert resolved["name"] == "la-only" and resolved["hybrid"]["window"] == 8
    for name in ("config.json", "model.safetensors", "train_log.jsonl", "loss.png", "data_manifest.json", "summary.json"):
        assert (out / name).is_file(), name
    with pytest.raises(LinearizeError, match="--overwrite"):
        run_recipe(tiny_llama(), "la-only", out, overrides=tiny_recipe(), data=random_data())
    run_recipe(tiny_llama(), "la-only", out, overrides=tiny_recipe(), data=random_data(), overwrite=True)


def test_cli_registers_convert():
    from linearize.cli import build_parser

    args = build_parser().parse_args(["convert", "--model", "m", "--out", "o", "--set", "stage2.lora.r=4",
                                      "--set", "seed=3", "--preset", "cpu", "--resume"])
    assert args.overrides == ["stage2.lora.r=4", "seed=3"] and args.preset == "cpu" and args.resume
