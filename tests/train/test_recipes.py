"""Recipe files, overrides, presets, validation, and the resolved recipe in the run directory."""

import dataclasses
import json
import re
from typing import ClassVar, Literal

import pytest
import yaml

from linearize.errors import LinearizeError
from linearize.train import run_recipe
from linearize.train.recipes import (
    PRESETS, RECIPE_DIR, Recipe, RecipeError, Section, available_recipes, dump_recipe, load_recipe, resolve_recipe,
)
from lz_train_helpers import random_data, tiny_llama, tiny_recipe


@dataclasses.dataclass
class _Sketch(Section):
    """A section with the annotations a HybridConfig field may come with (checked as a recipe's are)."""

    where: ClassVar[str] = "sketch"
    kind: Literal["a", "b"] = "a"
    pair: tuple[int, int] = (1, 2)
    extra: dict | None = None
    count: int | None = None
    rate: float = 1.0


def test_shipped_recipes():
    assert set(available_recipes()) >= {"lolcats", "la-only", "hedgecats", "ssd", "long-context", "long-context-all",
                                        "long-context-kl"}
    for name in available_recipes():
        text = (RECIPE_DIR / f"{name}.yaml").read_text()
        assert text.startswith("#"), f"{name}.yaml needs a header comment saying what it reproduces"
        r = load_recipe(name)
        assert r["reproduces"] and r["name"] == name and r["stage1"]["lr"] == 1e-2
        if not name.startswith("long-context"):  # the paper recipes: LoLCATs' 1024-token rows, no inference settings
            assert r["data"]["seq_len"] == 1024 and r["inference"] == {"hybrid": {}}
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
    assert ssd["stage2"]["lora"] == {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0,
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
                                 "stage1.batch_size=0", "nonsense",
                                 ("stage1.gradient_checkpointing=true", "runtime.distributed=fsdp")])
def test_invalid_recipes_are_rejected(bad):
    with pytest.raises(RecipeError):
        load_recipe("ssd", [bad] if isinstance(bad, str) else list(bad))


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


# -- the typed schema ---------------------------------------------------------------------------------

def test_every_recipe_field_is_documented_and_hybrid_is_hybridconfig():
    import dataclasses

    from linearize.config import HybridConfig
    from linearize.train.recipes import Recipe

    rows = Recipe.describe()
    assert all(help_text.strip() for _, _, help_text in rows), [p for p, _, h in rows if not h.strip()]
    hybrid = {p.split(".", 1)[1] for p, _, _ in rows if p.startswith("hybrid.")}
    assert hybrid == {f.name for f in dataclasses.fields(HybridConfig)}  # whatever fields HybridConfig has
    assert isinstance(resolve_recipe("ssd").hybrid, HybridConfig)


def test_every_hybridconfig_field_can_be_set():
    import dataclasses

    from linearize.config import HybridConfig

    defaults = HybridConfig()
    for f in dataclasses.fields(HybridConfig):
        default = getattr(defaults, f.name)
        value = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        r = resolve_recipe("ssd", [f"hybrid.{f.name}={value}"])
        assert getattr(r.hybrid, f.name) == default, f.name


def test_typed_recipe_round_trips_through_its_yaml_form(tmp_path):
    r = resolve_recipe("hedgecats", ["stage2.lora.r=4", "stage1.max_steps=3"], preset="cpu")
    assert r.stage2.lora.r == 4 and r.stage1.max_steps == 3 and r.data.seq_len == 256 and r.stage2.lr == 1e-4
    assert Recipe.from_dict(r.to_dict()) == r
    dump_recipe(r, tmp_path / "recipe.yaml")
    again = resolve_recipe(tmp_path / "recipe.yaml")
    assert again.resolved and dataclasses.replace(again, resolved=False) == r


def test_one_set_of_loop_defaults():
    """The training loop's spec and both recipe stages share LoopConfig's fields and defaults."""
    from linearize.train import loop
    from linearize.train.recipes import LoopConfig, Stage1Config

    spec, stage1 = loop.LoopSpec(), Stage1Config()
    for f in dataclasses.fields(LoopConfig):
        assert getattr(spec, f.name) == getattr(stage1, f.name), f.name
    assert (spec.lr, spec.grad_accum, spec.epochs) == (1e-2, 8, 2)
    with pytest.raises(RecipeError, match="stage1.grad_accum must be an integer >= 1"):
        loop.LoopSpec(name="stage1", grad_accum=0)


def test_print_recipe_shows_the_resolved_recipe_and_runs_nothing(tmp_path, capsys, monkeypatch):
    from linearize.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["convert", "--print-recipe", "--recipe", "ssd", "--preset", "cpu", "--set", "stage1.lr=1e-3",
                 "--set", "hybrid.window=32"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# resolved linearize recipe 'ssd' (preset cpu)")
    printed = yaml.safe_load(text)
    expected = load_recipe("ssd", ["stage1.lr=1e-3", "hybrid.window=32"], "cpu")
    assert printed == {**expected, "resolved": True}
    assert printed["stage1"]["lr"] == 1e-3 and printed["hybrid"]["window"] == 32 and printed["data"]["seq_len"] == 256
    (tmp_path / "printed.yaml").write_text(text)  # the printed recipe is a recipe: it resolves to the same one
    assert resolve_recipe(tmp_path / "printed.yaml") == dataclasses.replace(
        resolve_recipe("ssd", ["stage1.lr=1e-3", "hybrid.window=32"], "cpu"), resolved=True)
    assert [p.name for p in tmp_path.iterdir()] == ["printed.yaml"]  # nothing else written


def test_print_recipe_refuses_a_bad_setting_in_one_line(capsys):
    from linearize.cli import main

    assert main(["convert", "--print-recipe", "--set", "stage2.lora.rank=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown recipe key 'stage2.lora.rank'" in err[0] and "target_modules" in err[0]


def test_recipe_values_are_checked_against_their_annotations():
    s = _Sketch(pair=[3, 4], count=2.0, rate=1)
    assert s.pair == (3, 4) and s.count == 2 and type(s.count) is int and type(s.rate) is float
    for bad, message in [({"kind": "c"}, "sketch.kind='c'; expected one of ('a', 'b')"),
                         ({"pair": 5}, "sketch.pair must be a list"), ({"extra": [1]}, "sketch.extra must be a mapping"),
                         ({"count": 2.5}, "sketch.count must be an integer"), ({"rate": True}, "sketch.rate must be a finite")]:
        with pytest.raises(RecipeError, match=re.escape(message)):
            _Sketch(**bad)
    with pytest.raises(RecipeError, match=r"unknown recipe key 'sketch.knd'; known keys here: \['count', 'extra'"):
        _Sketch.from_dict({"knd": "a"})


# -- the long-context recipe and the inference section ---------------------------------------------------

def test_long_context_recipe_is_ssd_with_the_study_settings():
    """long-context.yaml is the `ssd` recipe with study.LONG_COMMON's overrides (the measured sum-w512 run) plus the
    settings of its measured variant as inference settings: nothing else differs, so the file and the study cannot
    drift apart."""
    from linearize.study import LONG_COMMON, TABLES

    variant = {v.name: v for v in TABLES["long-context"].variants}["sum-w512-mem256-query-shift1-reread32"]
    measured = {"hybrid": dict(variant.hybrid)}

    long, ssd = load_recipe("long-context"), load_recipe("ssd", list(LONG_COMMON))
    own = ("name", "description", "reproduces", "inference")
    assert {k: v for k, v in long.items() if k not in own} == {k: v for k, v in ssd.items() if k not in own}
    assert variant.run == "sum-w512" and long["inference"] == measured
    assert measured["hybrid"]["memory_reread"] == 32 and measured["hybrid"]["memory_select"] == "query"
    assert ssd["inference"] == {"hybrid": {}}
    assert long["hybrid"]["layers"] == "global" and long["data"]["seq_len"] == 4096
    with_preset = resolve_recipe("long-context", preset="gpu-small")  # the preset of the measured run applies
    assert with_preset.stage1.epochs == 1 and with_preset.inference.hybrid == measured["hybrid"]
    # the command the file documents resolves to the study's run exactly: the study sets its overrides after the
    # preset, the file's `presets` entry keeps its 1.5M tokens over the preset's 1M
    study_run = load_recipe("ssd", list(LONG_COMMON), "gpu-small")
    documented = load_recipe("long-context", preset="gpu-small")
    assert {k: v for k, v in documented.items() if k not in own} == {k: v for k, v in study_run.items() if k not in own}
    assert documented["data"]["train_tokens"] == 1_500_000 and "presets" not in documented
    assert "--recipe long-context --preset gpu-small --out" in (RECIPE_DIR / "long-context.yaml").read_text()
    # --set still comes last; the cpu preset is the cpu preset's
    assert load_recipe("long-context", ["data.train_tokens=2000"], "gpu-small")["data"]["train_tokens"] == 2000
    assert load_recipe("long-context", preset="cpu")["data"]["train_tokens"] == PRESETS["cpu"]["data"]["train_tokens"]


@pytest.mark.parametrize("run", ["s16/runs/delta-all-memtrain", "runs/delta-all", "s14/runs/delta-all"])
def test_long_context_all_recipe_is_the_measured_qwen_run(run):
    """long-context-all.yaml with its documented preset resolves to the recipe the measured Qwen run wrote
    (results/long/qwen2.5-coder-1.5b/s16/runs/delta-all-memtrain/recipe.yaml, scripts/gpu_long_qwen.sh at 0a69ac1),
    key for key, plus the inference settings its best row was measured with; the earlier delta-all runs (82bca26,
    0444c9a) are the same recipe without the memory in training."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    measured = load_recipe(yaml.safe_load((repo / "results/long/qwen2.5-coder-1.5b" / run / "recipe.yaml").read_text()))
    documented = load_recipe("long-context-all", preset="gpu-small")
    if not run.startswith("s16/"):  # trained without the memory: the training memory's fields at their defaults
        defaults = load_recipe("ssd")["hybrid"]
        for key in ("sparse_memory", "memory_select", "memory_block"):
            documented["hybrid"][key] = defaults[key]
    own = ("name", "description", "reproduces", "inference", "resolved")
    assert {k: v for k, v in documented.items() if k not in own} == {k: v for k, v in measured.items() if k not in own}
    assert documented["inference"] == {"hybrid": {"sparse_memory": 2048, "memory_select": "query", "mix_shift": 1.0,
                                                  "memory_fill": False}}  # (measured before memory_fill existed)
    assert (documented["hybrid"]["layers"], documented["hybrid"]["linear_state"]) == ("all", "delta")
    assert "--recipe long-context-all --preset gpu-small --out" in (RECIPE_DIR / "long-context-all.yaml").read_text()


def test_long_context_kl_recipe_is_the_measured_qwen_run():
    """long-context-kl.yaml with its documented preset resolves to the recipe the session-27 Qwen run wrote
    (results/long/qwen2.5-coder-1.5b/s27/runs/kl-r8k-nomem/recipe.yaml, 6a94149) key for key (progress bars aside),
    with the inference memory it was read with (the keys chosen by the prompt's last queries)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    run = repo / "results/long/qwen2.5-coder-1.5b/s27/runs/kl-r8k-nomem/recipe.yaml"
    measured = load_recipe(yaml.safe_load(run.read_text()))
    documented = load_recipe("long-context-kl", preset="gpu-small")
    own = ("name", "description", "reproduces", "inference", "resolved")

    def settings(recipe):
        return {k: v if k != "runtime" else {**v, "show_progress": None} for k, v in recipe.items() if k not in own}

    assert settings(documented) == settings(measured)
    assert documented["inference"] == measured["inference"]
    assert documented["hybrid"]["sparse_memory"] == 0
    assert documented["inference"] == {"hybrid": {"sparse_memory": 2048, "memory_select": "query"}}
    assert (documented["stage2"]["objective"], documented["stage2"]["lora"]["enabled"]) == ("kl", False)
    assert "--recipe long-context-kl --preset gpu-small --out" in (RECIPE_DIR / "long-context-kl.yaml").read_text()


def test_long_context_memory_recipe_is_the_training_free_query_memory_model(tmp_path):
    """long-context-memory trains nothing and saves query_memory_baseline's model: the same settings, and through a
    cached prefill (where the memory is chosen and re-read) the same logits; its validation is the cut's."""
    import torch

    import linearize
    from linearize.models.window_sinks import query_memory_baseline

    r = load_recipe("long-context-memory")
    assert not r["stage1"]["enabled"] and not r["stage2"]["enabled"]
    assert r["inference"]["hybrid"] == {"sparse_memory": 2048, "memory_select": "query", "memory_reread": 32}
    small = ["hybrid.window=6", "hybrid.softmax_sinks=2", "inference.hybrid.sparse_memory=4", "data.seq_len=32",
             "eval.batch_size=2", "runtime.cpu=true", "runtime.show_progress=false"]
    summary = run_recipe(tiny_llama(), "long-context-memory", tmp_path / "run", overrides=small, data=random_data())
    assert summary["stages"] == {} and summary["val"]["hybrid"] == summary["val"]["swa_only"]
    saved = linearize.load(tmp_path / "run")
    want = query_memory_baseline(tiny_llama(), 6, 2, 4, layers="global")
    assert linearize.hybrid_config_of(saved).to_dict() == linearize.hybrid_config_of(want).to_dict()
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, want(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_recipe_files_preset_entries_are_checked(tmp_path):
    """A `presets` entry names a known preset and known keys, checked whichever preset is chosen: one line."""
    base = yaml.safe_load((RECIPE_DIR / "ssd.yaml").read_text())
    for bad, match in (({"nope": {"data": {"train_tokens": 1}}}, "presets: a mapping of preset names"),
                       ({"gpu-small": {"data": {"no_such_key": 1}}}, "unknown recipe key 'presets.gpu-small.data.no_such_key'"),
                       ([1, 2], "presets: a mapping")):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({**base, "presets": bad}))
        with pytest.raises(RecipeError, match=re.escape(match)):
            resolve_recipe(str(path))


def test_long_context_is_listed_where_recipes_are_listed(capsys):
    from linearize.cli import build_parser, main

    assert main(["convert", "--list-recipes"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert listed == set(available_recipes()) and "long-context" in listed
    convert = build_parser()._subparsers._group_actions[0].choices["convert"]
    assert all(name in convert.description for name in available_recipes())  # the help names every recipe


def test_inference_settings_are_set_typed_and_merged():
    r = resolve_recipe("long-context", ["inference.hybrid.sparse_memory=64.0", "inference.hybrid.memory_block=32"])
    assert r.inference.hybrid == {"sparse_memory": 64, "memory_select": "query", "mix_shift": 1.0, "memory_reread": 32,
                                  "memory_fill": False, "memory_block": 32}
    assert type(r.inference.hybrid["sparse_memory"]) is int
    assert Recipe.from_dict(r.to_dict()) == r
    assert resolve_recipe("ssd", ["inference.hybrid.window=128"]).inference.hybrid == {"window": 128}
    assert resolve_recipe("ssd").inference.hybrid == {}


@pytest.mark.parametrize("bad, message", [
    ("inference.hybrid.feature_map=relu", "inference.hybrid cannot set ['feature_map']: they decide the converted"),
    ("inference.hybrid.linear_state=gated", "inference.hybrid cannot set ['linear_state']"),
    ("inference.hybrid.windw=3", "unknown HybridConfig fields ['windw'] in 'inference.hybrid'"),
    ("inference.hybrid.window=0", "inference.hybrid: HybridConfig.window must be >= 1"),
    ("inference.hybrid.sparse_memory=x", "inference.hybrid.sparse_memory must be an integer"),
    ("inference.hybrid=3", "inference.hybrid is a section, not a value"),
    ("inference.hybrid.mix_shift=1.0", "inference.hybrid: mix_shift=1.0 moves a learned or dynamic mix gate"),
])
def test_bad_inference_settings_are_refused_in_one_line(bad, message, capsys):
    from linearize.cli import main

    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe("ssd", [bad])  # ssd's shared_norm has no gate to shift
    assert main(["convert", "--print-recipe", "--set", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_inference_settings_need_a_saved_model():
    with pytest.raises(RecipeError, match="output.merge_lora=false saves only the LoRA adapter"):
        load_recipe("long-context", ["output.merge_lora=false"])
    # a query memory without keys is refused in one line; with every inference setting at its default it loads
    with pytest.raises(RecipeError, match="inference.hybrid: memory_select='query' chooses the sparse memory's keys"):
        load_recipe("long-context", ["output.merge_lora=false", "inference.hybrid.sparse_memory=0"])
    assert load_recipe("long-context", ["output.merge_lora=false", "inference.hybrid.sparse_memory=0",
                                        "inference.hybrid.memory_select=recall", "inference.hybrid.memory_reread=32",
                                        "inference.hybrid.mix_shift=0", "inference.hybrid.memory_fill=true"]
                       )["output"]["merge_lora"] is False
