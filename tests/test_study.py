"""The study tables: every run resolves to a valid recipe, and the plan repeats only the headline runs per seed."""

import json
import shutil

import pytest

from linearize.cli import main
from linearize.errors import LinearizeError
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


def test_runs_select_jobs_by_name_and_seed(tmp_path):
    from linearize.study import is_trained

    jobs = plan("remedies", (0, 1), runs=("ssd-0.75*", "hedgecats-seed1")).jobs
    assert [f"{r.name}-seed{s}" for r, s in jobs] == [f"ssd-0.75-0.5-ep{e}-seed0" for e in (1, 2, 5)] + ["hedgecats-seed1"]
    with pytest.raises(KeyError, match="no run"):
        plan("remedies", runs=("nothing*",))
    (tmp_path / "summary.json").write_text("{}")
    assert not is_trained(tmp_path)  # a record copied without its weights: train again
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert is_trained(tmp_path)


def test_dry_run_lists_the_runs(capsys):
    assert main(["study", "objectives", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "objective-weights-seed0: recipe la-only" in out and "hybrid.feature_map=elu1" in out


def _tiny_study_model(tmp_path, steps: int):
    """A tiny Llama with a BPE tokenizer saved under tmp_path, and the overrides that make a study run tiny."""
    from tiny_models import DATA, bpe_tokenizer, tiny_model

    if DATA is None:
        pytest.skip("benchmark data directory not found")
    tok = bpe_tokenizer()
    model_dir = tmp_path / "tiny"
    tiny_model("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    tiny = ("hybrid.window=8", "hybrid.chunk_size=8", "data.sources=[alpaca_demo]", "data.seq_len=32",
            "data.train_tokens=256", "data.val_tokens=64", "stage1.batch_size=2", "stage1.grad_accum=1",
            f"stage1.max_steps={steps}", "stage2.batch_size=2", "stage2.grad_accum=1", f"stage2.max_steps={steps}",
            "runtime.cpu=true", "runtime.show_progress=false")
    return model_dir, tiny


def test_execute_trains_diagnoses_and_resumes(tmp_path, monkeypatch):
    """A one-run table on a tiny saved model: an interrupted diagnosis resumes with the modes it lacks; a
    finished table is not redone; the base model's report is computed once for every run and table."""
    from tiny_models import DATA

    from linearize import study
    from linearize.evaluate import diagnose as diagnose_mod

    model_dir, tiny = _tiny_study_model(tmp_path, steps=2)
    for name in ("t1", "t2"):
        runs = (study.StudyRun("ssd", "ssd", tiny, ("hybrid", "la_only"), probes=name == "t1"),
                study.StudyRun("ssd-again", "ssd", (*tiny, "stage2.ssd.enabled=true")))  # the same resolved recipe
        monkeypatch.setitem(study.TABLES, name, study.StudyTable(name, runs))
    calls = []
    real = diagnose_mod.evaluate

    def counted(*args, **kw):
        calls.append(1)
        if len(calls) == 3 and interrupt:
            raise KeyboardInterrupt  # killed while evaluating the second mode
        return real(*args, **kw)

    monkeypatch.setattr(diagnose_mod, "evaluate", counted)
    monkeypatch.setattr(study, "PROBE_SETTINGS", dict(docs=1, doc_len=48, contexts=(128,), trials=1, modes=("hybrid",),
                                                      dtype="float32", device="cpu"))
    kwargs = dict(model=str(model_dir), out=tmp_path / "study", preset=None, limit=2, tasks=["piqa"], data_dir=str(DATA),
                  say=lambda _msg: None)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        study.execute("t1", **kwargs)
    interrupt = False
    calls.clear()
    table_md = study.execute("t1", **kwargs)
    assert len(calls) == 1  # base and hybrid came from the partial record: only la_only ran again
    record = json.loads((tmp_path / "study" / "t1" / "ssd-seed0" / "diagnose" / "diagnose.json").read_text())
    assert list(record["runs"]) == ["base", "hybrid", "la_only"]
    assert "ssd-seed0" in table_md.read_text()
    probes = json.loads((tmp_path / "study" / "t1" / "ssd-seed0" / "probes" / "probes.json").read_text())
    assert set(probes["position_loss"]["curves"]) == {"base", "hybrid"}  # the base model is probed too
    for path in ("base_reports.json", "t1/ssd-seed0/diagnose/partial.json", "t1/ssd-seed0/summary.json"):
        record = json.loads((tmp_path / "study" / path).read_text())
        assert record["commit"] and record["device"] == "cpu", path
    assert not (tmp_path / "study" / "t1" / "ssd-again-seed0").exists()  # same recipe: neither trained nor diagnosed
    study.execute("t1", **kwargs)
    assert len(calls) == 1  # finished: nothing trained or evaluated again
    stored = tmp_path / "study" / "base_reports.json"
    measured = json.loads(stored.read_text())  # as if measured at an earlier commit
    for entry in measured["reports"].values():
        entry["commit"] = "0ld0ne"
    stored.write_text(json.dumps(measured))
    base_reports = stored.read_text()
    study.execute("t2", **kwargs)
    assert len(calls) == 3  # a new table reuses the stored base report
    assert (tmp_path / "study" / "base_reports.json").read_text() == base_reports  # and keeps its provenance
    # records copied without the weights or the finished diagnosis (a fresh GPU machine): trained and diagnosed anew
    run = tmp_path / "study" / "t2" / "ssd-seed0"
    for stale in [*run.glob("*.safetensors"), run / "diagnose" / "diagnose.json"]:
        stale.unlink()
    (run / "diagnose" / "partial.json").write_text("{}")
    study.execute("t2", **kwargs)
    assert len(calls) == 5 and any(run.glob("*.safetensors"))
    assert json.loads((run / "diagnose" / "partial.json").read_text())["runs"].keys() == {"hybrid", "la_only"}
    # a diagnosed run without its weights or probes: trained again beside its records for the probes, not re-diagnosed
    run = tmp_path / "study" / "t1" / "ssd-seed0"
    diagnosed = (run / "diagnose" / "diagnose.json").read_text()
    for weights in run.glob("*.safetensors"):
        weights.unlink()
    shutil.rmtree(run / "probes")
    study.execute("t1", **kwargs)
    assert len(calls) == 5 and (run / "diagnose" / "diagnose.json").read_text() == diagnosed
    assert study.is_trained(run / study.RETRAINED) and (run / "probes" / "probes.json").is_file()
    retrained = json.loads((run / study.RETRAINED / "summary.json").read_text())
    original = json.loads((run / "summary.json").read_text())
    assert retrained["val"] == pytest.approx(original["val"], abs=1e-4)  # same recipe and seed: the same model


def test_long_context_table_is_the_states_script_comparison():
    """The runs of scripts/gpu_long_states.sh at window 512 (+ the qk_conv=4 variants and the gate starting at 0.9),
    trained at the measured-best size (4k-token rows, 1.5M tokens per stage), and its evaluation settings (LONG_ARGS,
    the base's baselines, the 'auto' one matched to the window-512 state)."""
    from linearize.study import LONG_COMMON, LongSettings

    table = TABLES["long-context"]
    runs = {r.name: r for r in table.runs}
    assert list(runs) == ["sum-w512", "gated-w512", "delta-w512", "gated-w512-qkconv4", "delta-w512-qkconv4",
                          "delta-w512-mix0.9", "sum-w512-3m"]
    assert {r.recipe for r in table.runs} == {"ssd"} and all(r.modes == ("hybrid", "swa_only", "la_only") for r in table.runs)
    assert runs["sum-w512"].overrides == LONG_COMMON
    assert {"hybrid.window=512", "hybrid.combine=mix", "hybrid.mix_gate=dynamic", "hybrid.softmax_sinks=8",
            "data.train_tokens=1500000", "data.seq_len=4096"} <= set(LONG_COMMON)
    assert runs["gated-w512-qkconv4"].overrides == (*LONG_COMMON, "hybrid.linear_state=gated", "hybrid.qk_conv=4")
    assert runs["delta-w512"].overrides[-2:] == ("hybrid.linear_state=delta", "stage1.objective=hybrid_output")
    assert runs["delta-w512-mix0.9"].overrides == (*runs["delta-w512"].overrides, "hybrid.mix_value=0.9")
    from linearize.train.recipes import load_recipe

    longer = load_recipe("ssd", list(runs["sum-w512-3m"].overrides), "gpu-small")
    assert longer["data"]["train_tokens"] == 3_000_000 and longer["hybrid"]["window"] == 512
    assert len(runs["sum-w512-3m"].overrides) == len(LONG_COMMON)  # train_tokens replaced, not repeated
    assert [(v.name, v.run, v.hybrid, v.modes) for v in table.variants] == [
        ("sum-w512-mem", "sum-w512", (("sparse_memory", 64),), ("hybrid",)),
        ("sum-w512-mem256", "sum-w512", (("sparse_memory", 256),), ("hybrid",)),
        ("delta-w512-mem256", "delta-w512", (("sparse_memory", 256),), ("hybrid",)),
        ("sum-w512-shift1", "sum-w512", (("mix_shift", 1.0),), ("hybrid",)),
        ("sum-w512-shift2", "sum-w512", (("mix_shift", 2.0),), ("hybrid",)),
        ("delta-w512-shift1", "delta-w512", (("mix_shift", 1.0),), ("hybrid",)),
        ("sum-w512-mem256-shift1", "sum-w512", (("sparse_memory", 256), ("mix_shift", 1.0)), ("hybrid",)),
        ("sum-w512-3m-mem256", "sum-w512-3m", (("sparse_memory", 256),), ("hybrid",)),
        ("sum-w512-3m-shift1", "sum-w512-3m", (("mix_shift", 1.0),), ("hybrid",)),
        # measured before memory_reread existed: the last prompt token only (HybridConfig's default is now 32); every
        # query-memory row before memory_fill existed (its default is now on)
        ("sum-w512-mem256-query", "sum-w512", (("sparse_memory", 256), ("memory_select", "query"), ("memory_fill", False), ("memory_reread", 1)),
         ("hybrid",)),
        ("sum-w512-mem256-la-off", "sum-w512", (("sparse_memory", 256), ("mix_shift", 30.0)), ("hybrid",)),
        *((f"sum-w512-mem{m}-query-shift1", "sum-w512",
           (("sparse_memory", m), ("memory_select", "query"), ("memory_fill", False), ("mix_shift", 1.0), ("memory_reread", 1)), ("hybrid",))
          for m in (1024, 2048)),
        ("sum-w512-mem2048-query-la-off", "sum-w512",
         (("sparse_memory", 2048), ("memory_select", "query"), ("memory_fill", False), ("mix_shift", 30.0), ("memory_reread", 1)), ("hybrid",)),
        ("sum-w512-mem2048-shift1", "sum-w512", (("sparse_memory", 2048), ("mix_shift", 1.0)), ("hybrid",)),
        *((f"sum-w512-mem{m}-query-shift1-reread32", "sum-w512",
           (("sparse_memory", m), ("memory_select", "query"), ("memory_fill", False), ("mix_shift", 1.0), ("memory_reread", 32)), ("hybrid",))
          for m in (256, 2048)),
        ("sum-w512-mem256-query-la-off-reread32", "sum-w512",
         (("sparse_memory", 256), ("memory_select", "query"), ("memory_fill", False), ("mix_shift", 30.0), ("memory_reread", 32)), ("hybrid",)),
        ("delta-w512-mem256-query-shift1-reread32", "delta-w512",
         (("sparse_memory", 256), ("memory_select", "query"), ("memory_fill", False), ("mix_shift", 1.0), ("memory_reread", 32)), ("hybrid",))]
    settings = table.long
    # the 'auto' baseline matches the runs' window-512 state; two more, the states with the larger query memories
    assert settings == LongSettings(window=512, more_baselines=(
        (("sparse_memory", 1024), ("memory_select", "query")), (("sparse_memory", 2048), ("memory_select", "query"))),
        memory_baselines=(256, 2048, (("sparse_memory", 2048), ("memory_select", "query"))), memory_reread=32,
        memory_fill=False)
    assert (settings.layers, settings.window, settings.baseline_windows) == ("global", 512, ("auto", 512, 64))
    assert settings.tasks == ("squad", "drop", "passkey", "niah_single", "qa_squad")
    assert (settings.limit, settings.cell_limit, settings.lengths, settings.qa_lengths, settings.depths) == (
        50, 3, (2048, 4096, 8192, 16384), (8192, 16384), (0.0, 0.5, 1.0))
    # the old tables are unchanged
    assert all(t.long is None for name, t in TABLES.items() if not name.startswith("long-context"))


def test_all_layers_table_is_the_measured_qwen_conversion_with_and_without_its_training_memory():
    """long-context-all-layers: the long-context-kl recipe as measured (RESULTS.md, session 27) and trained with the
    recall memory (sessions 24-26); their memory variants at load each beside its readout off; evaluated at 4k-32k
    with every layer cut in the baselines and the training-free query memories of 2048 / 4096 keys."""
    from linearize.study import LongSettings
    from linearize.train.recipes import load_recipe

    table = TABLES["long-context-all-layers"]
    runs = {r.name: r for r in table.runs}
    assert {n: (r.recipe, r.overrides, r.modes) for n, r in runs.items()} == {
        "kl-r8k": ("long-context-kl", ("hybrid.sparse_memory=2048",), ("hybrid",)),
        "kl-r8k-nomem": ("long-context-kl", (), ("hybrid",)),
        "kl-r8k-longdocs": ("long-context-kl", ("data.sources=[sharegpt,dolly,wikitext2,c4,wiki,longdocs:3]",),
                            ("hybrid",))}
    longdocs = load_recipe("long-context-kl", list(runs["kl-r8k-longdocs"].overrides), "gpu-small")
    assert longdocs["data"]["sources"][-1] == "longdocs:3" and longdocs["hybrid"]["sparse_memory"] == 0
    nomem = load_recipe("long-context-kl", list(runs["kl-r8k-nomem"].overrides), "gpu-small")
    assert nomem["hybrid"]["sparse_memory"] == 0 and nomem["data"]["seq_len"] == 8192
    assert nomem["inference"]["hybrid"] == {"sparse_memory": 2048, "memory_select": "query"}  # saved with the memory
    memtrain = load_recipe("long-context-kl", list(runs["kl-r8k"].overrides), "gpu-small")
    assert (memtrain["hybrid"]["sparse_memory"], memtrain["hybrid"]["memory_select"],
            memtrain["hybrid"]["memory_block"]) == (2048, "recall", 512)  # session 24's training memory
    off = (("mix_shift", 30.0),)
    assert [(v.name, v.run, v.hybrid, v.paired_with) for v in table.variants] == [
        ("kl-r8k-la-off", "kl-r8k", off, ("kl-r8k",)),
        ("kl-r8k-mem4096", "kl-r8k", (("sparse_memory", 4096),), ()),
        ("kl-r8k-mem4096-la-off", "kl-r8k", (("sparse_memory", 4096), *off), ("kl-r8k-mem4096",)),
        ("kl-r8k-recall", "kl-r8k", (("memory_select", "recall"),), ()),
        ("kl-r8k-nomem-la-off", "kl-r8k-nomem", off, ("kl-r8k-nomem",)),
        ("kl-r8k-nomem-mem4096", "kl-r8k-nomem", (("sparse_memory", 4096),), ()),
        ("kl-r8k-nomem-mem4096-la-off", "kl-r8k-nomem", (("sparse_memory", 4096), *off), ("kl-r8k-nomem-mem4096",)),
        # the memory spread over the layers at load, the same bytes (session 28's CPU diagnosis)
        ("kl-r8k-nomem-pyramid7", "kl-r8k-nomem", (("memory_pyramid", 7.0),), ()),
        ("kl-r8k-nomem-mem4096-pyramid7", "kl-r8k-nomem", (("sparse_memory", 4096), ("memory_pyramid", 7.0)), ()),
        ("kl-r8k-longdocs-la-off", "kl-r8k-longdocs", off, ("kl-r8k-longdocs",))]
    assert table.long == LongSettings(lengths=(4096, 8192, 16384, 32768), qa_lengths=(8192, 16384, 32768),
                                      layers="all", window=512, baseline_windows=("auto", 512),
                                      memory_baselines=(2048, 4096), memory_reread=32, memory_fill=True)
    assert table.long.tasks == ("squad", "drop", "passkey", "niah_single", "qa_squad")  # session 25's items


def test_long_context_names_error_in_one_line(capsys):
    assert main(["study", "long-context", "--runs", "nothing*", "--model", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("linearize study: error: no run of table 'long-context'") and "\n" not in err
    with pytest.raises(SystemExit):  # argparse: the table is one of TABLES
        main(["study", "no-such-table"])
    assert main(["study", "objectives", "--lengths", "64", "--model", "x"]) == 2
    assert "long-context tables" in capsys.readouterr().err


def test_long_context_table_end_to_end_and_resumable(tmp_path, monkeypatch):
    """One run of the table (its own overrides, then tiny sizes) and its sparse-memory variant on a tiny Llama:
    the base with its window+sinks baselines once, each run's long record in its modes, the variant at load, one
    merged record; a second call evaluates and trains nothing."""
    import dataclasses

    from tiny_models import DATA

    from linearize import study
    from linearize.evaluate import long_context

    model_dir, tiny = _tiny_study_model(tmp_path, steps=1)
    real = TABLES["long-context"]
    runs = tuple(dataclasses.replace(r, overrides=(*r.overrides, *tiny)) for r in real.runs)
    monkeypatch.setitem(study.TABLES, "long-context", dataclasses.replace(real, runs=runs, variants=real.variants[:1]))
    settings = study.LongSettings(tasks=("passkey", "niah_single"), limit=1, cell_limit=1, lengths=(256,), qa_lengths=(),
                                  depths=(0.0,), window=8, baseline_windows=("auto", 8), batch_tokens=4096,
                                  bootstrap=20, dtype="float32", device="cpu", more_baselines=((("sparse_memory", 16),),),
                                  memory_baselines=(4,))
    trainings, evaluations = [], []
    from linearize import train as train_mod

    real_train, real_long = train_mod.run_recipe, long_context.run_long
    monkeypatch.setattr(train_mod, "run_recipe", lambda *a, **kw: (trainings.append(a[2]), real_train(*a, **kw))[1])
    monkeypatch.setattr(long_context, "run_long", lambda *a, **kw: (evaluations.append(kw["modes"]), real_long(*a, **kw))[1])
    kwargs = dict(model=str(model_dir), out=tmp_path / "study", preset=None, runs=("sum-w512-seed*",),
                  data_dir=str(DATA), long=settings, say=lambda _msg: None)
    md = study.execute("long-context", **kwargs)
    root = tmp_path / "study" / "long-context"
    assert md == root / "merged" / "long.md" and md.read_text().startswith("## Overview")
    assert [p.name for p in trainings] == ["sum-w512-seed0"]  # the other runs are not selected
    # the base and its baselines, the cut matched to a 16-key memory and the 4-key query-memory baseline (each in its
    # own record), the run, its variant
    assert evaluations == [[], [], [], ["hybrid", "swa_only", "la_only"], ["hybrid"]]
    snap = json.loads((root / "base-memory-4-reread32" / "long.json").read_text())  # the default re-read
    assert list(snap["variants"]) == ["window+sinks+memory w=8 s=8 m=4 r=32 fill"]
    more = json.loads((root / "base-sparse_memory=16" / "long.json").read_text())
    (w_more,) = more["settings"]["baseline_windows"]
    assert list(more["variants"]) == [f"window+sinks w={w_more} s=8"]  # the base itself is not scored again
    for name in ("sum-w512-seed0", "sum-w512-mem-seed0"):
        record = json.loads((root / name / "long" / "long.json").read_text())
        assert record["meta"]["commit"] and record["meta"]["device"] == "cpu" and "base" not in record["variants"]
    variant = json.loads((root / "sum-w512-mem-seed0" / "long" / "long.json").read_text())
    assert list(variant["variants"]) == ["hybrid"] and variant["settings"]["hybrid"]["sparse_memory"] == 64
    trained = json.loads((root / "sum-w512-seed0" / "long" / "long.json").read_text())["settings"]["hybrid"]
    assert (trained["combine"], trained["mix_gate"], trained["softmax_sinks"]) == ("mix", "dynamic", 8)
    merged = json.loads((root / "merged" / "long.json").read_text())
    w = merged["settings"]["baseline_windows"][0]
    assert w_more > w  # 16 exact keys (with their features) weigh more keys of the cut
    assert list(merged["variants"]) == [
        "base", f"window+sinks w={w} s=8", "window+sinks w=8 s=8", f"window+sinks w={w_more} s=8",
        "window+sinks+memory w=8 s=8 m=4 r=32 fill", "sum-w512 hybrid",
        "sum-w512 swa_only", "sum-w512 la_only", "sum-w512-mem hybrid"]
    assert f"sum-w512-mem hybrid - window+sinks w={w_more} s=8" in merged["pairs"]
    assert {"sum-w512-mem hybrid - sum-w512 hybrid", "sum-w512-mem hybrid - sum-w512 swa_only"} <= set(merged["pairs"])
    assert "sum-w512-mem hybrid - window+sinks w=8 s=8" in merged["pairs"]
    stamp = (root / "merged" / "long.json").stat().st_mtime_ns
    trainings.clear()
    evaluations.clear()
    assert study.execute("long-context", **kwargs) == md
    assert trainings == [] and evaluations == [] and (root / "merged" / "long.json").stat().st_mtime_ns == stamp
    # the sum run's records came back without its weights and without the variant's: trained again beside them for
    # the variant only, then merged again
    run = root / "sum-w512-seed0"
    for weights in run.glob("*.safetensors"):
        weights.unlink()
    shutil.rmtree(root / "sum-w512-mem-seed0")
    study.execute("long-context", **kwargs)
    assert trainings == [run / study.RETRAINED] and evaluations == [["hybrid"]]
    assert (root / "merged" / "long.json").stat().st_mtime_ns > stamp
    assert "sum-w512-mem hybrid" in json.loads((root / "merged" / "long.json").read_text())["variants"]


def test_long_context_options_change_only_the_given_settings():
    from linearize.cli import build_parser
    from linearize.commands.study import _long_settings

    args = build_parser().parse_args(["study", "long-context", "--limit", "2", "--cell-limit", "1", "--lengths", "256,512",
                                      "--tasks", "passkey", "--dtype", "float32"])
    settings = _long_settings(TABLES["long-context"].long, args, 2, ["passkey"])
    assert (settings.limit, settings.cell_limit, settings.lengths, settings.tasks, settings.dtype) == (
        2, 1, (256, 512), ("passkey",), "float32")
    assert settings.qa_lengths == (8192, 16384) and settings.baseline_windows == ("auto", 512, 64)  # the table's
    args = build_parser().parse_args(["study", "long-context"])
    assert _long_settings(TABLES["long-context"].long, args, None, None) == TABLES["long-context"].long
    assert _long_settings(None, build_parser().parse_args(["study", "objectives"]), None, None) is None


def test_long_context_base_is_evaluated_by_one_process_at_a_time(tmp_path, monkeypatch):
    """Processes sharing a table (`--runs`): while one holds the base's lock, another goes on to its runs (wait=False)
    or waits for it, and finds the record written (no second evaluation)."""
    import fcntl

    from linearize import study

    calls = []

    def evaluate(spec, out, settings, **kw):
        calls.append(spec)
        (out / "long.json").write_text("{}")

    monkeypatch.setattr(study, "_long_evaluate", evaluate)
    root, settings = tmp_path / "long-context", study.LongSettings()
    (root / "base").mkdir(parents=True)
    with open(root / "base" / ".lock", "w") as other:  # another process at it
        fcntl.flock(other, fcntl.LOCK_EX)
        study._long_base("m", root, settings, None, lambda _msg: None, wait=False)
        assert calls == [] and not (root / "base" / "long.json").exists()
    study._long_base("m", root, settings, None, lambda _msg: None)  # the lock is free: evaluated once
    study._long_base("m", root, settings, None, lambda _msg: None, wait=False)
    assert calls == ["m"] and (root / "base" / "long.json").is_file()


def test_set_applies_to_every_run_and_a_run_of_other_settings_is_refused(tmp_path, capsys):
    """`--set KEY=VALUE` extends every run's overrides (dry run lists them); a run directory whose stored recipe
    differs (here: trained without the override) is refused in one line before anything runs."""
    from linearize import study
    from linearize.train.recipes import dump_recipe, load_recipe

    jobs = study.plan("long-context", (0,), ("delta-w512-seed*",), ("stage2.batch_size=2",)).jobs
    [(run, seed)] = jobs
    assert run.overrides[-1] == "stage2.batch_size=2" and run.overrides[:-1] == TABLES["long-context"].runs[2].overrides
    assert main(["study", "long-context", "--runs", "delta-w512-seed*", "--set", "stage2.batch_size=2",
                 "--seeds", "0", "--dry-run"]) == 0
    assert "stage2.batch_size=2 -> modes" in capsys.readouterr().out
    plain = TABLES["long-context"].runs[2]
    path = tmp_path / "long-context" / "delta-w512-seed0"
    path.mkdir(parents=True)
    dump_recipe(load_recipe(plain.recipe, [*plain.overrides, "seed=0"], "gpu-small"), path / "recipe.yaml")
    study._check_same_recipe(path, plain, 0, "gpu-small")  # the same settings: accepted
    assert main(["study", "long-context", "--runs", "delta-w512-seed*", "--set", "stage2.batch_size=2", "--seeds", "0",
                 "--out", str(tmp_path), "--model", "x"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another recipe: stage2.batch_size (8 -> 2)" in err and err.count("\n") == 1


def test_a_run_directory_from_before_the_inference_section_is_the_same_recipe(tmp_path):
    """A stored recipe.yaml written before recipes had an `inference` section (its default: no settings) is the run
    the table resolves to now; one with inference settings is not."""
    from linearize import study
    from linearize.train.recipes import recipe_yaml

    run = TABLES["long-context"].runs[0]
    path = tmp_path / run.name
    path.mkdir()
    old = load_recipe(run.recipe, [*run.overrides, "seed=0"], "gpu-small")
    assert old.pop("inference") == {"hybrid": {}}
    (path / "recipe.yaml").write_text(recipe_yaml(old))
    assert "inference" not in (path / "recipe.yaml").read_text()
    study._check_same_recipe(path, run, 0, "gpu-small")  # accepted
    changed = load_recipe(run.recipe, [*run.overrides, "seed=0", "inference.hybrid.sparse_memory=256"], "gpu-small")
    (path / "recipe.yaml").write_text(recipe_yaml(changed))
    with pytest.raises(LinearizeError, match=r"holds a run of another recipe: inference.hybrid \(\{'sparse_memory'"):
        study._check_same_recipe(path, run, 0, "gpu-small")
