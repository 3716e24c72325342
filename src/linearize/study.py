"""The study of issue 7 as data: each table is a list of conversion runs (recipe + overrides) and the component
modes to evaluate them in. `linearize study TABLE` runs what is missing (a finished run is skipped, an interrupted one
resumed), diagnoses each run, and writes `results/study/<table>/` (one directory per run, plus `table.md`). A run
whose long-context probes are missing and whose weights did not come back with its records is trained again (same
recipe and seed) into `<run>/retrained/` for them.

A table with long-context settings (`long-context`) is evaluated with the long-context tasks instead (as `linearize
diagnose --what long`): the base and its window+sinks baselines once (`<table>/base/`), each run in its modes
(`<run>/long/`), the training-free variants of a run at load, then everything merged (`<table>/merged/long.md`).

Run sizes come from the recipe preset (`gpu-small` by default); `--seeds` repeats the headline runs.
"""

from __future__ import annotations

import dataclasses

import json
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from linearize.config import COMPONENT_MODES, MEMORY_REREAD
from linearize.errors import LinearizeError

# Gemma's global layers only (its sliding layers stay softmax): 'none' here drops only those layers' attention
GLOBAL_ONLY = (("hybrid.layers=global",), ("hybrid", "swa_only", "la_only", "none"))


class UnknownStudyError(LinearizeError, KeyError):
    """An unknown study table, run or variant (a KeyError for callers that look names up; one line on the CLI)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class StudyRun:
    name: str
    recipe: str
    overrides: tuple[str, ...] = ()
    modes: tuple[str, ...] = COMPONENT_MODES
    headline: bool = False  # repeated for every seed
    probes: bool = False  # long-context probes (per-position loss, passkey; base model included) after diagnosis


@dataclass(frozen=True)
class StudyVariant:
    """A training-free variant of a trained run: HybridConfig changes applied at load (`linearize diagnose --hybrid`)."""
    name: str
    run: str  # the StudyRun it loads
    hybrid: tuple[tuple[str, object], ...]  # (field, value) pairs
    modes: tuple[str, ...] = ("hybrid",)
    paired_with: tuple[str, ...] = ()  # other variants of the table compared with it item by item in the merge


@dataclass(frozen=True)
class LongSettings:
    """The long-context evaluation of a table (`linearize diagnose --what long`'s options; GPU-sized defaults, those of
    scripts/gpu_long_states.sh). The base model is scored once with its window+sinks baselines, for a conversion of
    `layers` at `window`; every record uses the same items (tasks, limits, lengths, depths, seed) so they merge."""
    tasks: tuple[str, ...] = ("squad", "drop", "passkey", "niah_single", "qa_squad")
    limit: int = 50  # questions per task
    cell_limit: int | None = 3  # prompts per length x depth cell of the retrieval and long-QA tasks
    lengths: tuple[int, ...] = (2048, 4096, 8192, 16384)
    qa_lengths: tuple[int, ...] = (8192, 16384)
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    layers: str = "global"  # the layers the baselines cut
    window: int = 64  # the window of the conversion the 'auto' baseline matches
    baseline_windows: tuple = ("auto", 512, 64)
    # more cuts, each matched to the state of the conversion with these HybridConfig changes (a variant's memory
    # counted), in their own records (`<table>/base-<changes>/`), so adding one does not score the base again
    more_baselines: tuple[tuple[tuple[str, object], ...], ...] = ()
    # the query-memory baselines (the base with `window` + sinks + a memory chosen by the prompt's last queries,
    # softmax alone, no training: linearize.models.window_sinks.query_memory_baseline), each in its own record
    # (`<table>/base-memory-<spec>/`): a number of memory keys, or HybridConfig changes whose matched cut's keys
    # beyond the window it fills
    memory_baselines: tuple = ()
    memory_reread: int = MEMORY_REREAD  # the memory baselines: the prompt's last tokens read again against the memory
    memory_fill: bool = True  # the memory baselines: later keys take the memory's free slots (HybridConfig.memory_fill)
    sinks: int = 8
    batch_tokens: int = 65536
    position_docs: int = 0
    bootstrap: int = 1000
    dtype: str = "bfloat16"
    seed: int = 1234  # `linearize diagnose`'s default: the items of earlier records (results/long/) are the same
    device: str | None = None  # None: CUDA when available


@dataclass(frozen=True)
class StudyTable:
    title: str
    runs: tuple[StudyRun, ...]
    notes: str = ""
    variants: tuple[StudyVariant, ...] = ()
    long: LongSettings | None = None  # set: evaluated with the long-context tasks instead of the short benchmarks


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

# Issue 20's linear-state comparison (scripts/gpu_long_states.sh's runs): Gemma 3's global layers, the `mix` rule with
# an input-dependent gate trained in stage 2, 8 softmax sinks, window 512 (the base's own local window), trained on
# 4k-token rows of text and instructions, 1.5M tokens per stage: on the H200 (commit 6a9e3fe, RESULTS.md "Linear
# states at the base's own window") this beat 2k-token rows x 500k tokens for every state kind (+3.3-5.2% reading bpb
# over the base against +6.7-8.4%)
LONG_COMMON = ("hybrid.layers=global", "hybrid.combine=mix", "hybrid.mix_gate=dynamic", "hybrid.softmax_sinks=8",
               "hybrid.feature_size=half", "stage2.train_mixing=true", "stage2.mixing_lr=0.001", "data.seq_len=4096",
               "data.sources=[sharegpt,dolly,wikitext2,c4,wiki]", "data.train_tokens=1500000", "hybrid.window=512")
LONG_MODES = ("hybrid", "swa_only", "la_only")  # 'none' and 'sinks_only' say nothing about long context
LONG_STATES = {"sum": (), "gated": ("hybrid.linear_state=gated",),
               "delta": ("hybrid.linear_state=delta", "stage1.objective=hybrid_output")}
TABLES["long-context"] = StudyTable(
    "Long context: the linear state (sum / gated / delta) at window 512, against the base and its window+sinks baselines",
    tuple(StudyRun(f"{state}-w512", "ssd", (*LONG_COMMON, *extra), LONG_MODES) for state, extra in LONG_STATES.items())
    + tuple(StudyRun(f"{state}-w512-qkconv4", "ssd", (*LONG_COMMON, *LONG_STATES[state], "hybrid.qk_conv=4"), LONG_MODES)
            for state in ("gated", "delta"))
    # the gate starting at 0.9 (softmax's weight): the LA half at 0.5 cost reading on short prompts
    + (StudyRun("delta-w512-mix0.9", "ssd", (*LONG_COMMON, *LONG_STATES["delta"], "hybrid.mix_value=0.9"), LONG_MODES),
       # twice the tokens per stage (the 500k -> 1.5M step helped every state kind)
       StudyRun("sum-w512-3m", "ssd", tuple("data.train_tokens=3000000" if o.startswith("data.train_tokens=") else o
                                             for o in LONG_COMMON), LONG_MODES)),
    "Each run in its component modes on the long-context tasks (bits per byte of the answer, retrieval accuracy); "
    "sum-w512-mem / -mem256: the sum run with a sparse memory of 64 / 256 exact keys added at load (no training); "
    "delta-w512-mem256: the same memory on the delta state; -shift1 / -shift2: the trained gate moved towards the "
    "window at load (mix_shift: g = sigmoid(logit + 1 or 2), no training): reading inside the window against reading "
    "past it; -la-off: mix_shift 30, the linear readout off with the memory kept (is the linear part used?); "
    "-mem1024 / -mem2048: larger memories (-query: chosen by the prompt's last queries), each beside the cut whose "
    "window weighs as much as its state (base-sparse_memory=.../); -reread32: the prompt's last 32 tokens read again "
    "against the query-chosen memory (memory_reread), beside the memory alone on the untrained base "
    "(base-memory-.../: window + sinks + that memory, softmax only). "
    "merged/long.md: all of them paired over the same items.",
    variants=(StudyVariant("sum-w512-mem", "sum-w512", (("sparse_memory", 64),)),
              StudyVariant("sum-w512-mem256", "sum-w512", (("sparse_memory", 256),)),
              StudyVariant("delta-w512-mem256", "delta-w512", (("sparse_memory", 256),)),
              StudyVariant("sum-w512-shift1", "sum-w512", (("mix_shift", 1.0),)),
              StudyVariant("sum-w512-shift2", "sum-w512", (("mix_shift", 2.0),)),
              StudyVariant("delta-w512-shift1", "delta-w512", (("mix_shift", 1.0),)),
              StudyVariant("sum-w512-mem256-shift1", "sum-w512", (("sparse_memory", 256), ("mix_shift", 1.0))),
              StudyVariant("sum-w512-3m-mem256", "sum-w512-3m", (("sparse_memory", 256),)),
              StudyVariant("sum-w512-3m-shift1", "sum-w512-3m", (("mix_shift", 1.0),)),
              # (the query-memory rows measured before memory_reread existed read the last prompt token only: 1; every
              # query-memory row here was measured before memory_fill, so each sets it off)
              StudyVariant("sum-w512-mem256-query", "sum-w512",
                           (("sparse_memory", 256), ("memory_select", "query"), ("memory_fill", False), ("memory_reread", 1))),
              # the component-mode question for the memory rows (sparse memory runs in 'hybrid' only): the gate at
              # g = 1 - 1e-13, so the linear branch's readout weighs nothing while its state still chooses the keys
              StudyVariant("sum-w512-mem256-la-off", "sum-w512", (("sparse_memory", 256), ("mix_shift", 30.0)),
                           paired_with=("sum-w512-mem256-shift1",)),
              # a larger memory chosen by the prompt's queries (the best long QA at 256 keys), within a quarter of the
              # base's decode memory; each against the cut of equal bytes (more_baselines) and with its readout off
              *(StudyVariant(f"sum-w512-mem{m}-query-shift1", "sum-w512",
                             (("sparse_memory", m), ("memory_select", "query"), ("memory_fill", False), ("mix_shift", 1.0), ("memory_reread", 1)))
                for m in (1024, 2048)),
              StudyVariant("sum-w512-mem2048-query-la-off", "sum-w512",
                           (("sparse_memory", 2048), ("memory_select", "query"), ("memory_fill", False), ("mix_shift", 30.0), ("memory_reread", 1)),
                           paired_with=("sum-w512-mem2048-query-shift1",)),
              StudyVariant("sum-w512-mem2048-shift1", "sum-w512", (("sparse_memory", 2048), ("mix_shift", 1.0))),
              # the question read again against the query-chosen memory (memory_reread 32): on the CPU at 8k it took
              # long QA from 0.910 to 0.723-0.740 bpb (cpu-query-memory-qa/)
              *(StudyVariant(f"sum-w512-mem{m}-query-shift1-reread32", "sum-w512",
                             (("sparse_memory", m), ("memory_select", "query"), ("memory_fill", False), ("mix_shift", 1.0),
                              ("memory_reread", 32))) for m in (256, 2048)),
              StudyVariant("sum-w512-mem256-query-la-off-reread32", "sum-w512",
                           (("sparse_memory", 256), ("memory_select", "query"), ("memory_fill", False), ("mix_shift", 30.0),
                            ("memory_reread", 32)), paired_with=("sum-w512-mem256-query-shift1-reread32",)),
              StudyVariant("delta-w512-mem256-query-shift1-reread32", "delta-w512",
                           (("sparse_memory", 256), ("memory_select", "query"), ("memory_fill", False), ("mix_shift", 1.0),
                            ("memory_reread", 32)))),
    long=LongSettings(window=512, more_baselines=tuple((("sparse_memory", m), ("memory_select", "query"))
                                                       for m in (1024, 2048)),
                      # the memory without the linear state or training: 256 / 2048 keys as the variants hold, and
                      # as many as the bytes of the 2048-key query variant's state
                      memory_baselines=(256, 2048, (("sparse_memory", 2048), ("memory_select", "query"))),
                      memory_reread=32, memory_fill=False))


# A model whose every layer is full attention (Qwen2.5-Coder-1.5B-Instruct, `--model` its GGUF): the long-context-kl
# recipe (no exact memory in training, 2048 query-chosen keys saved for inference) and the same trained with 2048
# recall keys in every training forward (scripts/gpu_long_qwen.sh's delta-all-kl-g09-r8k, the recipe until session
# 27 measured it no better and slower to train), read at 4k-32k against the base, its cuts and the training-free
# query memory at 2048 / 4096 keys
KL_R8K_OFF = (("mix_shift", 30.0),)  # the linear readout off, the memory kept: is the linear part used?
# the memory's keys spread over the layers, the first 7x the last, the same total (the same decode bytes)
KL_PYRAMID = (("memory_pyramid", 7.0),)
# the recipe's sources with the long documents weighted 3 against 1 each (rows of one book each, not packed short
# texts: what a state that reads 32k-token prompts has to learn from)
KL_LONGDOCS_SOURCES = "[sharegpt,dolly,wikitext2,c4,wiki,longdocs:3]"
TABLES["long-context-all-layers"] = StudyTable(
    "Long context of a model with only full-attention layers: every layer to the delta-rule state, 8k-token rows, "
    "self-distillation, a query-chosen exact memory at inference",
    (StudyRun("kl-r8k", "long-context-kl", ("hybrid.sparse_memory=2048",), ("hybrid",)),
     StudyRun("kl-r8k-nomem", "long-context-kl", (), ("hybrid",)),
     StudyRun("kl-r8k-longdocs", "long-context-kl", (f"data.sources={KL_LONGDOCS_SOURCES}",), ("hybrid",))),
    "Run with --model <Qwen2.5-Coder-1.5B-Instruct>. kl-r8k-nomem: the long-context-kl recipe (no memory in "
    "training, 2048 query keys at inference); kl-r8k: the same with 2048 recall keys in training (the inference "
    "memory as saved); kl-r8k-longdocs: the recipe with long documents (books) mixed into its data; -la-off: "
    "mix_shift 30, the linear readout off with the memory kept (the component-mode question for a memory row; with no LoRA it is the training-free memory on the base's weights); -mem4096: 4096 "
    "query keys at load (193 MiB a sequence at 32k, a fifth of the base's); -pyramid7: the memory spread over the layers at load (memory_pyramid 7, the same bytes); -recall: the memory chosen as trained. "
    "Baselines: the base, its 512 + 8 cut and the cut of the conversion's bytes, and the training-free query memory "
    "of 2048 / 4096 keys (window + sinks + memory, softmax alone). merged/long.md: all of them paired over the same "
    "items.",
    variants=(StudyVariant("kl-r8k-la-off", "kl-r8k", KL_R8K_OFF, paired_with=("kl-r8k",)),
              StudyVariant("kl-r8k-mem4096", "kl-r8k", (("sparse_memory", 4096),)),
              StudyVariant("kl-r8k-mem4096-la-off", "kl-r8k", (("sparse_memory", 4096), *KL_R8K_OFF),
                           paired_with=("kl-r8k-mem4096",)),
              StudyVariant("kl-r8k-recall", "kl-r8k", (("memory_select", "recall"),)),
              StudyVariant("kl-r8k-nomem-la-off", "kl-r8k-nomem", KL_R8K_OFF, paired_with=("kl-r8k-nomem",)),
              StudyVariant("kl-r8k-nomem-mem4096", "kl-r8k-nomem", (("sparse_memory", 4096),)),
              StudyVariant("kl-r8k-nomem-mem4096-la-off", "kl-r8k-nomem", (("sparse_memory", 4096), *KL_R8K_OFF),
                           paired_with=("kl-r8k-nomem-mem4096",)),
              StudyVariant("kl-r8k-nomem-pyramid7", "kl-r8k-nomem", KL_PYRAMID),
              StudyVariant("kl-r8k-nomem-mem4096-pyramid7", "kl-r8k-nomem", (("sparse_memory", 4096), *KL_PYRAMID)),
              StudyVariant("kl-r8k-longdocs-la-off", "kl-r8k-longdocs", KL_R8K_OFF, paired_with=("kl-r8k-longdocs",))),
    long=LongSettings(lengths=(4096, 8192, 16384, 32768), qa_lengths=(8192, 16384, 32768), layers="all", window=512,
                      baseline_windows=("auto", 512), memory_baselines=(2048, 4096), memory_reread=32,
                      memory_fill=True))


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


def plan(table: str, seeds: tuple[int, ...] = (0,), runs: tuple[str, ...] | None = None,
         extra: tuple[str, ...] = ()) -> StudyPlan:
    """The (run, seed) jobs of `table`; `runs`: shell patterns on ``<run>-seed<seed>`` selecting some of them
    (processes running disjoint parts of one table side by side); `extra`: recipe overrides ("key=value") applied to
    every run after its own (e.g. a smaller micro-batch for a larger model)."""
    if table not in TABLES:
        raise UnknownStudyError(f"unknown study table {table!r}; known: {sorted(TABLES)}")
    result = StudyPlan(table)
    table_runs = [dataclasses.replace(run, overrides=(*run.overrides, *extra)) if extra else run
                  for run in TABLES[table].runs]
    # every run once first, then the headline runs' extra seeds: a budget cut short still covers the table
    result.jobs = [(run, seeds[0]) for run in table_runs]
    result.jobs += [(run, seed) for seed in seeds[1:] for run in table_runs if run.headline]
    if runs:
        result.jobs = [(run, seed) for run, seed in result.jobs
                       if any(fnmatch(f"{run.name}-seed{seed}", pattern) for pattern in runs)]
        if not result.jobs:
            raise UnknownStudyError(f"no run of table {table!r} matches {list(runs)}")
    return result


def _check_same_recipe(path: Path, run: StudyRun, seed: int, preset) -> None:
    """Refuse a run directory whose stored recipe is not what `run` resolves to now (another `--set`, another table
    version): its records would be labelled with settings they were not made with."""
    from linearize.train.driver import _comparable
    from linearize.train.recipes import load_recipe

    stored = path / "recipe.yaml"
    if not stored.is_file():
        return
    old = _comparable(load_recipe(str(stored)))
    new = _comparable(load_recipe(run.recipe, [*run.overrides, f"seed={seed}"], preset))
    changed = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        raise LinearizeError(f"{path} holds a run of another recipe: {', '.join(changed[:4])}"
                             f"{' ...' if len(changed) > 4 else ''}; use another --out (or remove the run)")


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
            batch_size: int = 8, dtype=None, long: LongSettings | None = None, extra: tuple[str, ...] = (),
            say=print) -> Path:
    """Train (or resume) every run of `table`, diagnose it, and write `<out>/<table>/table.md`.

    The base model is benchmarked once per (model, tasks, limit) and its report reused by every run and
    table under `out`. `extra`: recipe overrides for every run (see :func:`plan`); a run directory that holds a run
    of another resolved recipe is refused before anything runs. `runs` selects jobs by name (see :func:`plan`); `table.md` lists every diagnosed run of
    the table, whichever process ran it.

    A table with long-context settings (`StudyTable.long`, or `long` here, e.g. smaller ones) is evaluated with the
    long-context tasks instead (`limit`, `tasks` and `dtype` unused): see :func:`_long_base`, :func:`_long_run`,
    :func:`_long_merge`; returns `<out>/<table>/merged/long.md`.
    """
    from linearize.evaluate.diagnose import diagnose, diagnose_markdown
    from linearize.evaluate.harness import TASKS
    from linearize.evaluate.report import side_by_side
    from linearize.records import run_metadata, write_record
    from linearize.train import run_recipe
    from linearize.train.recipes import load_recipe

    plan(table, seeds, runs)  # an unknown table or run: one-line error before anything runs
    root = Path(out) / table
    spec = TABLES[table]
    jobs, selected = plan(table, seeds, extra=extra).jobs, plan(table, seeds, runs, extra).jobs
    for run, seed in selected:
        _check_same_recipe(run_dir(root, run, seed), run, seed, preset)
    long = long or spec.long
    if long is not None:  # now, unless another process of the table is at it (then before the merge)
        _long_base(model, root, long, data_dir, say, wait=False)
    tasks = list(tasks or TASKS)
    base_key = json.dumps({"model": str(model), "tasks": tasks, "limit": limit})
    trained: dict[str, Path] = {}  # resolved recipe -> its run directory
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

        if long is not None:
            meta = dict(study=table, run=run.name, recipe=run.recipe, overrides=list(run.overrides))
            if not (path / "long" / "long.json").is_file():
                if not is_trained(path):
                    train(path, f"{path.name} ({run.recipe} {' '.join(run.overrides)})")
                _long_run(path, path / "long", long, run.modes, {}, data_dir, meta, say)
            variants = [v for v in spec.variants if v.run == run.name and seed == seeds[0]
                        and not (_variant_dir(root, v, seed) / "long.json").is_file()]
            if variants:
                weights = path if is_trained(path) else path / RETRAINED
                if not is_trained(weights):  # its records came back without its weights (a fresh GPU machine)
                    train(weights, f"{path.name} again into {RETRAINED}/ for its training-free variants (the evaluated "
                                   "weights are not here)")
                for variant in variants:
                    _long_run(weights, _variant_dir(root, variant, seed), long, variant.modes, dict(variant.hybrid),
                              data_dir, {**meta, "run": variant.name, "trained_run": run.name}, say)
            continue
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
    if long is not None:
        _long_base(model, root, long, data_dir, say)
        return _long_merge(table, root, jobs, long, say)
    records = [run_dir(root, run, seed) / "diagnose" for run, seed in jobs]
    table_md = root / "table.md"
    table_md.write_text(f"# {spec.title}\n\n{spec.notes}\n\n" + side_by_side([r for r in records if (r / "diagnose.json").is_file()]) + "\n")
    return table_md


# ------------------------------------------------------------------------------------------- long-context tables


def _long_evaluate(spec, out: Path, settings: LongSettings, *, modes=(), hybrid: dict | None = None, base_only=False,
                   windows=None, memories=(), data_dir=None, meta: dict | None = None, say=print) -> None:
    """`linearize diagnose SPEC --what long [--no-base]` through the library: ``out/long.json``, ``long.md``, figures."""
    import torch

    from linearize.data_dir import default_data_dir
    from linearize.evaluate.lm_eval_model import load_model
    from linearize.evaluate.long_context import long_markdown, plot_bpb, plot_retrieval, run_long, training_seq_len
    from linearize.records import run_metadata, write_record

    data_dir = data_dir or default_data_dir()
    model, tokenizer, info = load_model(str(spec), device=settings.device, dtype=getattr(torch, settings.dtype),
                                        seed=settings.seed, hybrid=hybrid or None)
    try:
        body = run_long(model, tokenizer, base=None, modes=list(modes), tasks=list(settings.tasks), limit=settings.limit,
                        cell_limit=settings.cell_limit, lengths=list(settings.lengths), qa_lengths=list(settings.qa_lengths),
                        depths=list(settings.depths), sinks=settings.sinks,
                        baseline_windows=list(settings.baseline_windows if windows is None else windows),
                        base_row=windows is None, memory_baselines=list(memories),
                        memory_reread=settings.memory_reread, memory_fill=settings.memory_fill,
                        layers=settings.layers, window=settings.window, batch_tokens=settings.batch_tokens,
                        position_docs=settings.position_docs, train_len=None if base_only else training_seq_len(spec),
                        reps=settings.bootstrap, seed=settings.seed, data_dir=data_dir, progress=say)
        record = {"meta": run_metadata(model_info=info, data_dir=data_dir, device=str(model.device), seed=settings.seed,
                                       hybrid_at_load=hybrid or None, **(meta or {})), **body}
    finally:
        del model
        _release_gpu_memory()
    write_record(out, "long", record, long_markdown(record))
    plot_bpb(record, out / "long_bpb.png")
    plot_retrieval(record, out / "long_retrieval.png")


def _slug(changes) -> str:
    """(("sparse_memory", 2048), ("memory_select", "query")) -> "sparse_memory=2048+memory_select=query" (the form
    `--baseline-windows auto+…` and `--memory-baselines auto+…` take)."""
    return "+".join(f"{k}={v}" for k, v in changes)


def _more_baseline_dir(root: Path, changes) -> Path:
    """``<table>/base-sparse_memory=2048+memory_select=query/``: the record of a cut matched to those changes."""
    return root / f"base-{_slug(changes)}"


def _memory_baseline_dir(root: Path, spec, reread: int = MEMORY_REREAD) -> Path:
    """``<table>/base-memory-2048/`` (or ``base-memory-sparse_memory=2048+…/``, ``…-reread32`` when the prompt's last
    32 tokens read the memory again): a query-memory baseline's record."""
    name = str(spec) if isinstance(spec, int) else _slug(spec)
    return root / (f"base-memory-{name}" + (f"-reread{reread}" if reread > 1 else ""))


def _extra_baselines(root: Path, settings: LongSettings) -> list:
    """(record directory, cut windows, memory baselines) of each baseline beyond the base's own record."""
    return ([(_more_baseline_dir(root, ch), [dict(ch)], []) for ch in settings.more_baselines]
            + [(_memory_baseline_dir(root, m, settings.memory_reread), [], [m if isinstance(m, int) else dict(m)])
               for m in settings.memory_baselines])


def _long_base(model: str, root: Path, settings: LongSettings, data_dir, say, wait: bool = True) -> None:
    """The base model and its window+sinks baselines, once per table (``<table>/base/``), and each of
    ``settings.more_baselines`` and ``settings.memory_baselines`` in its own record, by one process at a time (processes sharing a table through
    `runs`): with `wait` False, return at once while another process evaluates them."""
    import fcntl

    todo = [(root / "base", None, [])] + _extra_baselines(root, settings)
    if all((out / "long.json").is_file() for out, _, _ in todo):
        return
    (root / "base").mkdir(parents=True, exist_ok=True)
    with open(root / "base" / ".lock", "w") as lock:  # released when the file closes, or when its process dies
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            say(f"[study] {root.name}: another process is evaluating the base; its runs first")
            return
        for out, windows, memories in todo:
            if (out / "long.json").is_file():  # written before, or while this process waited
                continue
            if windows is None:
                say(f"[study] {root.name}: long-context evaluation of the base {model} and its window+sinks baselines")
            else:
                say(f"[study] {root.name}: the baseline {out.name}")
            _long_evaluate(model, out, settings, base_only=True, windows=windows, memories=memories,
                           data_dir=data_dir, meta=dict(study=root.name, run=out.name), say=say)


def _long_run(weights: Path, out: Path, settings: LongSettings, modes, hybrid: dict, data_dir, meta: dict, say) -> None:
    """A trained run (or a training-free variant of one: `hybrid` at load) in its component modes."""
    say(f"[study] {meta['study']}: long-context evaluation of {out.parent.name} in {', '.join(modes)}"
        + (f" with {hybrid} at load" if hybrid else ""))
    _long_evaluate(weights, out, settings, modes=modes, hybrid=hybrid, data_dir=data_dir, meta=meta, say=say)


def _variant_dir(root: Path, variant: StudyVariant, seed: int) -> Path:
    return root / f"{variant.name}-seed{seed}" / "long"


def _long_merge(table: str, root: Path, jobs, settings: LongSettings, say) -> Path:
    """Every long-context record of the table merged into ``<table>/merged/``; again only when a record was added
    or written since."""
    from linearize.evaluate.long_context import write_merged_long

    spec = TABLES[table]
    # labels in the merged record: the run's name (with its seed when it is not the first)
    first = jobs[0][1]
    label_of = lambda name, seed: name if seed == first else f"{name}-seed{seed}"  # noqa: E731
    paths = {label_of(run.name, seed): run_dir(root, run, seed) / "long" / "long.json" for run, seed in jobs}
    paths |= {v.name: _variant_dir(root, v, first) / "long.json" for v in spec.variants}
    bases = {"base": root / "base" / "long.json"} | {d.name: d / "long.json" for d, _, _ in _extra_baselines(root, settings)}
    paths = {label: path for label, path in (bases | paths).items() if path.is_file()}
    merged = root / "merged"
    done = merged / "long.json"
    if (not done.is_file() or list(json.loads(done.read_text())["meta"].get("merged_from", {})) != list(paths)
            or any(path.stat().st_mtime_ns > done.stat().st_mtime_ns for path in paths.values())):
        records = {label: json.loads(path.read_text()) for label, path in paths.items()}
        say(f"[study] {table}: merging {', '.join(records)}")
        extra = [(f"{v.name} hybrid", f"{other} hybrid") for v in spec.variants for other in v.paired_with
                 if v.name in records and other in records]
        write_merged_long(records, merged, parents={v.name: v.run for v in spec.variants}, extra_pairs=extra)
    return merged / "long.md"
