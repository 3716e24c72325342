"""The study of issue 7 as data: each table is a list of conversion runs (recipe + overrides) and the component
modes to evaluate them in. `linearize study TABLE` runs what is missing (a finished run is skipped, an interrupted one
resumed), diagnoses each run, and writes `results/study/<table>/` (one directory per run, plus `table.md`). A run
whose long-context probes are missing and whose weights did not come back with its records is trained again (same
recipe and seed) into `<run>/retrained/` for them.

Run sizes come from the recipe preset (`gpu-small` by default); `--seeds` repeats the headline runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from linearize.config import COMPONENT_MODES
# Gemma's global layers only (its sliding layers stay softmax): 'none' here drops only those layers' attention
GLOBAL_ONLY = (("hybrid.layers=global",), ("hybrid", "swa_only", "la_only", "none"))


@dataclass(frozen=True)
class StudyRun:
    name: str
    recipe: str
    overrides: tuple[str, ...] = ()
    modes: tuple[str, ...] = COMPONENT_MODES
    headline: bool = False  # repeated for every seed
    probes: bool = False  # long-context probes (per-position loss, passkey; base model included) after diagnosis


@dataclass(frozen=True)
class StudyTable:
    title: str
    runs: tuple[StudyRun, ...]
    notes: str = ""


def _stage1_only(*extra: str) -> tuple[str, ...]:
    return ("stage2.enabled=false", *extra)


SCHEDULES = {"0.9-0.75-0.5": "[[0.0,0.9],[0.3333333333333333,0.75],[0.6666666666666666,0.5]]",
             "0.75-0.5": "[[0.0,0.75],[0.5,0.5]]", "fixed-0.5": "[[0.0,0.5]]"}

TABLES: dict[str, StudyTable] = {
    "diagnosis": StudyTable(
        "Table 1: the LoLCATs recipe in the five component modes",
        (StudyRun("lolcats", "lolcats", headline=True, probes=True), StudyRun("lolcats-global", "lolcats", *GLOBAL_ONLY)),
        "lolcats-global: only the base's full-attention layers converted (Gemma 3: 3 of 18); on a model without "
        "sliding layers it converts every layer, like lolcats"),
    "objectives": StudyTable(
        "Tables 2-4: transfer objective, feature-map size and activation, evaluated LA-only after stage 1",
        tuple(StudyRun(f"objective-{o}", "la-only", _stage1_only(f"stage1.objective={o}"), ("la_only", "none"))
              for o in ("weights", "output", "hybrid_output"))
        + (StudyRun("size-half", "la-only", _stage1_only("hybrid.feature_size=half"), ("la_only", "none")),)
        + tuple(StudyRun(f"activation-{a}", "la-only", _stage1_only(f"hybrid.feature_map={a}"), ("la_only", "none"))
                for a in ("exp", "relu", "elu1", "none"))),
    "inference-hybrid": StudyTable(
        "Inference-time hybridisation: an LA-only conversion with SWA added at inference (no training)",
        (StudyRun("la-only", "la-only", headline=True, probes=True),)),
    "remedies": StudyTable(
        "HedgeCATs and SSD in the five modes; SSD schedules and early-stopping epochs",
        (StudyRun("hedgecats", "hedgecats", headline=True, probes=True),
         StudyRun("ssd", "ssd", headline=True, probes=True), StudyRun("ssd-global", "ssd", *GLOBAL_ONLY))
        + tuple(StudyRun(f"ssd-{name}-ep{ep}", "ssd", (f"stage2.ssd.schedule={sched}", f"stage2.epochs={ep}"),
                         ("hybrid", "swa_only", "la_only"))
                for name, sched in SCHEDULES.items() for ep in (1, 2, 5))),
    "beyond": StudyTable(
        "Beyond the paper: learned and input-dependent mixing vs fixed g = 0.5 (the headline runs of the other "
        "tables carry the long-context probes; 'none' is the same for every run, as only untrained parts act, and 'sinks_only' says nothing about mixing: both left out)",
        tuple(StudyRun(f"ssd-mix-{gate}", "ssd", ("hybrid.combine=mix", f"hybrid.mix_gate={gate}",
                                                  *(("stage2.train_mixing=true",) if gate != "fixed" else ())),
                       ("hybrid", "swa_only", "la_only"), probes=True, headline=gate != "learned")
              for gate in ("fixed", "learned", "dynamic"))  # a second seed for the input-dependent gate and its baseline
        # at the LoRA rate (1e-4) a per-head gate logit cannot move more than ~0.012 in a gpu-small stage 2
        + (StudyRun("ssd-mix-learned-lr1e-2", "ssd", ("hybrid.combine=mix", "hybrid.mix_gate=learned",
                                                     "stage2.train_mixing=true", "stage2.mixing_lr=0.01"),
                    ("hybrid", "swa_only", "la_only"), probes=True),)),
}


#: Long-context probe sizes of the study (GPU-sized; beyond 4x the window of 64 from position 256 on), in bf16 like
#: the study's benchmarks; `device` None: CUDA when available. The rest as `linearize diagnose --what probes`.
PROBE_SETTINGS = dict(docs=8, doc_len=4096, contexts=(512, 1024, 2048, 4096, 8192), trials=10,
                      modes=("hybrid", "swa_only", "la_only"), dtype="bfloat16", device=None)
#: The seed of the probes (`linearize diagnose`'s default, which ran them before).
PROBE_SEED = 1234


@dataclass
class StudyPlan:
    table: str
    jobs: list[tuple[StudyRun, int]] = field(default_factory=list)  # (run, seed)


def plan(table: str, seeds: tuple[int, ...] = (0,), runs: tuple[str, ...] | None = None) -> StudyPlan:
    """The (run, seed) jobs of `table`; `runs`: shell patterns on ``<run>-seed<seed>`` selecting some of them
    (processes running disjoint parts of one table side by side)."""
    if table not in TABLES:
        raise KeyError(f"unknown study table {table!r}; known: {sorted(TABLES)}")
    result = StudyPlan(table)
    # every run once first, then the headline runs' extra seeds: a budget cut short still covers the table
    result.jobs = [(run, seeds[0]) for run in TABLES[table].runs]
    result.jobs += [(run, seed) for seed in seeds[1:] for run in TABLES[table].runs if run.headline]
    if runs:
        result.jobs = [(run, seed) for run, seed in result.jobs
                       if any(fnmatch(f"{run.name}-seed{seed}", pattern) for pattern in runs)]
        if not result.jobs:
            raise KeyError(f"no run of table {table!r} matches {list(runs)}")
    return result


#: Where a run is trained again when its probes are missing and its weights did not come back with its records.
RETRAINED = "retrained"


def is_trained(path: Path) -> bool:
    """A finished conversion: its summary and its weights (records copied without weights are not)."""
    return (path / "summary.json").is_file() and any(path.glob("*.safetensors"))


def run_dir(out: Path, run: StudyRun, seed: int) -> Path:
    return out / f"{run.name}-seed{seed}"


def _base_reports(out: Path) -> Path:
    return out / "base_reports.json"


def load_base_report(out: Path, key: str) -> dict | None:
    """The base model's benchmark report for ``key`` (model, tasks, limit), if a run computed it."""
    path = _base_reports(out)
    entry = json.loads(path.read_text())["reports"].get(key) if path.is_file() else None
    return entry["report"] if entry else None


def store_base_report(out: Path, key: str, report: dict, device: str) -> None:
    from linearize.records import git_commit, write_json_with_provenance

    path = _base_reports(out)
    reports = json.loads(path.read_text())["reports"] if path.is_file() else {}
    reports[key] = {**git_commit(), "device": device, "report": report}
    write_json_with_provenance(path, {"reports": reports}, device)  # top level: the latest writer


def _probe(weights: Path, base: str, out: Path, say) -> tuple[dict, str]:
    """The long-context probes of a trained run against its base model, written to ``out``."""
    import torch

    from linearize.data_dir import default_data_dir
    from linearize.evaluate.lm_eval_model import load_model
    from linearize.evaluate.probes import probes_record

    settings = dict(PROBE_SETTINGS)
    device, dtype = settings.pop("device"), getattr(torch, settings.pop("dtype"))
    probe_model, tokenizer, info = load_model(str(weights), device=device, dtype=dtype, seed=PROBE_SEED)
    try:
        return probes_record(probe_model, tokenizer, info, out=out, title=f"{weights}: per-position loss",
                             data_dir=default_data_dir(), seed=PROBE_SEED, base=str(base), progress=say, **settings)
    finally:
        del probe_model
        _release_gpu_memory()


def _release_gpu_memory() -> None:
    """Hand this process's cached CUDA blocks back between phases: study processes share one GPU, and a training
    peak (Gemma's 262k-word logits) held through evaluation is what ran side-by-side runs out of memory."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def execute(table: str, *, model: str = "gemma3-270m", out: str | Path = "results/study", preset: str | None = "gpu-small",
            seeds: tuple[int, ...] = (0,), runs: tuple[str, ...] | None = None, limit=None, tasks=None, data_dir=None,
            batch_size: int = 8, dtype=None, say=print) -> Path:
    """Train (or resume) every run of `table`, diagnose it, and write `<out>/<table>/table.md`.

    The base model is benchmarked once per (model, tasks, limit) and its report reused by every run and
    table under `out`. `runs` selects jobs by name (see :func:`plan`); `table.md` lists every diagnosed run of
    the table, whichever process ran it.
    """
    from linearize.evaluate.diagnose import diagnose, diagnose_markdown
    from linearize.evaluate.harness import TASKS
    from linearize.evaluate.report import side_by_side
    from linearize.records import run_metadata, write_record
    from linearize.train import run_recipe
    from linearize.train.recipes import load_recipe

    root = Path(out) / table
    spec = TABLES[table]
    tasks = list(tasks or TASKS)
    base_key = json.dumps({"model": str(model), "tasks": tasks, "limit": limit})
    trained: dict[str, Path] = {}  # resolved recipe -> its run directory
    jobs, selected = plan(table, seeds).jobs, plan(table, seeds, runs).jobs
    for run, seed in jobs:  # all of them: a duplicate is one of the whole table
        path = run_dir(root, run, seed)
        resolved = json.dumps(load_recipe(run.recipe, [*run.overrides, f"seed={seed}"], preset), sort_keys=True,
                              default=str)
        if resolved in trained:  # e.g. the SSD grid's default schedule at the preset's epochs is the headline run
            say(f"[study] {table}: {path.name} is the same run as {trained[resolved].name}; not repeated")
            continue
        trained[resolved] = path
        if (run, seed) not in selected:
            continue
        record = path / "diagnose" / "diagnose.json"
        def train(dest: Path, what: str) -> None:
            interrupted = (dest / "checkpoints").is_dir()
            say(f"[study] {table}: {'resuming' if interrupted else 'training'} {what}")
            # not interrupted but not empty: records of a run whose weights are gone; they would not match new ones
            run_recipe(model, run.recipe, dest, overrides=[*run.overrides, f"seed={seed}"], preset=preset,
                       resume=interrupted, overwrite=dest.is_dir() and not interrupted, data_dir=data_dir)
            _release_gpu_memory()

        if not record.is_file() and not is_trained(path):
            train(path, f"{path.name} ({run.recipe} {' '.join(run.overrides)})")
        if not record.is_file():
            say(f"[study] {table}: diagnosing {path.name} in {', '.join(run.modes)}")
            stored = load_base_report(Path(out), base_key)
            result = diagnose(str(path), tasks=tasks, limit=limit, modes=run.modes, base=stored or model,
                              data_dir=data_dir, batch_size=batch_size, dtype=dtype,
                              partial=path / "diagnose" / "partial.json", progress=say)
            if stored is None:  # a reused report keeps the commit and device that measured it
                store_base_report(Path(out), base_key, result["runs"]["base"], result["device"])
            meta = run_metadata(model_info=result["info"], data_dir=data_dir, device=result["device"], seed=seed,
                                study=table, run=run.name, recipe=run.recipe, overrides=list(run.overrides))
            full = {"meta": meta, **result}
            write_record(path / "diagnose", "diagnose", full, diagnose_markdown(full))
            _release_gpu_memory()
        if not run.probes or (path / "probes" / "probes.json").is_file():
            continue
        weights = path if is_trained(path) else path / RETRAINED
        if not is_trained(weights):
            # records brought back without weights (a fresh GPU machine): the same recipe and seed again, beside the
            # diagnosed run's records; its summary.json shows how close the retrained model is (validation losses)
            train(weights, f"{path.name} again into {RETRAINED}/ for its long-context probes (the diagnosed weights "
                           "are not here)")
        say(f"[study] {table}: long-context probes of {path.name}")
        _, md = _probe(weights, model, path / "probes", say)
        say(md)
    records = [run_dir(root, run, seed) / "diagnose" for run, seed in jobs]
    table_md = root / "table.md"
    table_md.write_text(f"# {spec.title}\n\n{spec.notes}\n\n" + side_by_side([r for r in records if (r / "diagnose.json").is_file()]) + "\n")
    return table_md
