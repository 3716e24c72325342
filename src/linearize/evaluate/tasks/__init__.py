"""lm-eval task configs for the standard benchmarks, read offline from local JSONL files.

The YAML files in this folder are *templates*. Each one ``include:``s lm-eval's own
built-in config (so prompts, choices, targets, preprocessing functions and metrics are
lm-eval's, byte for byte) and only replaces the data source by
``dataset_path: json`` + ``dataset_kwargs.data_files`` pointing at the local files,
under a distinct task name (``lz_<task>``) so nothing clashes with the built-ins.

Because ``data_files`` must be absolute paths and the data directory is configurable,
:func:`build_task_dir` fills the templates in (data directory, location of lm-eval's task
folder) and writes them into a cache folder, which is then given to
``lm_eval.tasks.TaskManager(include_path=...)`` (see :func:`task_manager`).

MMLU: lm-eval reads one HF config per subject; the local files hold all subjects in one
JSONL per split, so :func:`build_task_dir` also splits them into per-subject files
(verbatim lines) next to the generated YAMLs.

Task names: ``lz_piqa``, ``lz_arc_easy``, ``lz_arc_challenge``, ``lz_hellaswag``,
``lz_winogrande``, ``lz_mmlu`` (group) -> ``lz_mmlu_{stem,other,social_sciences,humanities}``
(groups) -> ``lz_mmlu_<subject>`` (57 tasks, 5-shot from the dev split).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from linearize.data_dir import DataNotFoundError
from linearize.errors import LinearizeError

__all__ = [
    "PREFIX",
    "Benchmark",
    "BENCHMARKS",
    "SIMPLE_TASKS",
    "MMLU_CATEGORIES",
    "DATA_FILES",
    "DataNotFoundError",
    "lm_eval_tasks_dir",
    "mmlu_subjects",
    "task_name",
    "required_files",
    "check_data",
    "build_task_dir",
    "task_manager",
]

PREFIX = "lz_"
TEMPLATE_DIR = Path(__file__).resolve().parent
# Bump when the generated layout changes, so stale cache folders are not reused.
_GENERATOR_VERSION = "3"

MMLU_CATEGORIES = ("stem", "other", "social_sciences", "humanities")
_MMLU_SPLITS = ("test", "dev")


@dataclass(frozen=True)
class Benchmark:
    """One standard benchmark: everything linearize needs to know about it, in one entry of `BENCHMARKS`."""

    name: str  #: the benchmark name (``tasks=``); its lm-eval task is ``lz_<name>``
    data_files: tuple[str, ...]  #: the local files it reads, relative to the data directory
    template: str  #: its YAML template in this folder
    headline_metric: str  #: the metric conventionally reported (LoLCATs / Mamba / GLA tables)
    shots: int = 0  #: few-shot examples; 0 leaves lm-eval's default (none)
    #: a group of per-subject tasks (MMLU), which `build_task_dir` writes from its own templates
    grouped: bool = False


#: The standard benchmarks, in reporting order; the other tables here and in `harness` are read from it.
#: Headline metrics: length-normalised accuracy where the answers differ a lot in length.
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("piqa", ("piqa/validation.jsonl",), "lz_piqa.yaml", "acc"),
    Benchmark("arc_easy", ("arc_easy/test.jsonl",), "lz_arc_easy.yaml", "acc"),
    Benchmark("arc_challenge", ("arc_challenge/test.jsonl",), "lz_arc_challenge.yaml", "acc_norm"),
    Benchmark("hellaswag", ("hellaswag/validation.jsonl",), "lz_hellaswag.yaml", "acc_norm"),
    Benchmark("winogrande", ("winogrande/validation.jsonl",), "lz_winogrande.yaml", "acc"),
    Benchmark("mmlu", tuple(f"mmlu/{s}.jsonl" for s in _MMLU_SPLITS), "lz_mmlu.yaml", "acc", shots=5, grouped=True),
)}

#: The single-task benchmarks and their template file.
SIMPLE_TASKS: dict[str, str] = {n: b.template for n, b in BENCHMARKS.items() if not b.grouped}

#: Local files (relative to the data directory) each benchmark reads.
DATA_FILES: dict[str, tuple[str, ...]] = {n: b.data_files for n, b in BENCHMARKS.items()}


def lm_eval_tasks_dir() -> Path:
    """The folder of lm-eval's built-in task configs (``lm_eval/tasks``)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


@lru_cache(maxsize=1)
def mmlu_subjects() -> dict[str, str]:
    """``{subject: category}`` for the 57 MMLU subjects, read from lm-eval's own configs."""
    import yaml

    out = {}
    for path in sorted((lm_eval_tasks_dir() / "mmlu" / "default").glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        subject = cfg["dataset_name"]
        tag = cfg["tag"]  # e.g. "mmlu_stem_tasks"
        out[subject] = tag[len("mmlu_") : -len("_tasks")]
    if len(out) != 57 or set(out.values()) != set(MMLU_CATEGORIES):
        raise LinearizeError(
            f"lm-eval's mmlu/default configs look unexpected: {len(out)} subjects, "
            f"categories {sorted(set(out.values()))}"
        )
    return out


def task_name(name: str) -> str:
    """Our lm-eval task (or group) name for a benchmark name.

    ``"piqa"`` -> ``"lz_piqa"``, ``"mmlu"`` -> ``"lz_mmlu"``,
    ``"mmlu_anatomy"`` -> ``"lz_mmlu_anatomy"``, ``"mmlu_stem"`` -> ``"lz_mmlu_stem"``;
    names that already carry the prefix are returned unchanged.
    """
    short = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if short in SIMPLE_TASKS or short == "mmlu":
        return PREFIX + short
    if short.startswith("mmlu_"):
        rest = short[len("mmlu_") :]
        if rest in mmlu_subjects() or rest in MMLU_CATEGORIES:
            return PREFIX + short
    known = sorted(SIMPLE_TASKS) + ["mmlu", "mmlu_<subject>", "mmlu_<category>"]
    raise LinearizeError(f"unknown benchmark {name!r}; expected one of {known}")


def _family(name: str) -> str:
    short = task_name(name)[len(PREFIX) :]
    return "mmlu" if short.startswith("mmlu") else short


def required_files(name: str, data_dir: str | Path) -> list[Path]:
    """The local data files benchmark ``name`` reads from ``data_dir``."""
    return [Path(data_dir) / rel for rel in DATA_FILES[_family(name)]]


def check_data(names, data_dir: str | Path) -> None:
    """Raise :class:`DataNotFoundError` naming every missing file for ``names``."""
    missing = [str(p) for n in names for p in required_files(n, data_dir) if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            "benchmark data not found: " + ", ".join(missing) + " (set the data directory "
            "with data_dir=... or the LINEARIZE_DATA environment variable)"
        )


def _default_cache_root() -> Path:
    root = os.environ.get("LINEARIZE_CACHE")
    if root:
        return Path(root) / "lm_eval_tasks"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "linearize" / "lm_eval_tasks"


def _yaml_str(path: Path | str) -> str:
    """A path made safe for the inside of a double-quoted YAML scalar."""
    return json.dumps(str(path))[1:-1]


def _cache_key(data_dir: Path) -> str:
    import lm_eval

    h = hashlib.sha256()
    h.update(f"{_GENERATOR_VERSION}\0{data_dir}\0{lm_eval.__version__}\0{lm_eval_tasks_dir()}".encode())
    for tpl in sorted(TEMPLATE_DIR.glob("*.yaml")):
        h.update(tpl.name.encode() + b"\0" + tpl.read_bytes())
    for rel in DATA_FILES["mmlu"]:  # the per-subject split copies depend on these
        p = data_dir / rel
        if p.is_file():
            st = p.stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _fill(template: str, **values: str) -> str:
    text = (TEMPLATE_DIR / template).read_text()
    unfilled = set(re.findall(r"@([A-Z_]+)@", text)) - set(values)
    if unfilled:
        raise LinearizeError(f"template {template}: no value for {sorted(unfilled)}")
    header = f"# GENERATED from {TEMPLATE_DIR / template} by build_task_dir; do not edit.\n"
    return header + re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], text)


def _split_mmlu(data_dir: Path, split_dir: Path, subjects: dict[str, str]) -> None:
    """Write ``split_dir/<subject>/<split>.jsonl`` (verbatim lines) from the merged files."""
    for split in _MMLU_SPLITS:
        by_subject: dict[str, list[str]] = {s: [] for s in subjects}
        with open(data_dir / "mmlu" / f"{split}.jsonl", encoding="utf-8", newline="") as fh:
            for line in fh:
                if not line.strip():
                    continue
                subject = json.loads(line)["subject"]
                if subject not in by_subject:
                    raise LinearizeError(
                        f"{data_dir / 'mmlu' / f'{split}.jsonl'}: unknown MMLU subject {subject!r}"
                    )
                by_subject[subject].append(line if line.endswith("\n") else line + "\n")
        for subject, lines in by_subject.items():
            if not lines:
                raise LinearizeError(f"MMLU {split} split has no rows for subject {subject!r}")
            (split_dir / subject).mkdir(parents=True, exist_ok=True)
            with open(split_dir / subject / f"{split}.jsonl", "w", encoding="utf-8", newline="") as out:
                out.write("".join(lines))


def build_task_dir(data_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Fill the templates in for ``data_dir`` and return the folder holding the YAMLs.

    The folder is ``<cache_dir>/<key>``, where the key hashes the data directory, the
    templates, lm-eval's version and the MMLU files' size/mtime; an existing complete
    folder is reused as is (stable file mtimes keep ``datasets``' Arrow cache valid).
    ``cache_dir`` defaults to ``$LINEARIZE_CACHE/lm_eval_tasks`` or
    ``~/.cache/linearize/lm_eval_tasks``. MMLU's per-subject files are only written when
    the MMLU data exists; YAMLs for benchmarks whose data is missing are still written
    (use :func:`check_data` before running them).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    final = root / _cache_key(data_dir)
    if (final / ".complete").is_file():
        return final

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        common = {"LM_EVAL_TASKS": _yaml_str(lm_eval_tasks_dir()), "DATA_DIR": _yaml_str(data_dir)}
        for bench in BENCHMARKS.values():
            if not bench.grouped:
                # a few-shot count other than lm-eval's default is set here, so the table is the one place for it
                shots = f"num_fewshot: {bench.shots}\n" if bench.shots else ""
                (tmp / bench.template).write_text(_fill(bench.template, **common) + shots)

        subjects = mmlu_subjects()
        # Paths inside the YAMLs point at the final folder (the rename below keeps them valid).
        split_dir = final / "mmlu_data"
        mmlu_dir = tmp / "mmlu"
        mmlu_dir.mkdir()
        mmlu = BENCHMARKS["mmlu"]
        (mmlu_dir / mmlu.template).write_text(_fill(mmlu.template, **common))
        for category in MMLU_CATEGORIES:
            (mmlu_dir / f"lz_mmlu_{category}.yaml").write_text(
                _fill("lz_mmlu_category.yaml", CATEGORY=category, **common)
            )
        for subject, category in subjects.items():
            (mmlu_dir / f"lz_mmlu_{subject}.yaml").write_text(
                _fill(
                    "lz_mmlu_subject.yaml",
                    SUBJECT=subject,
                    CATEGORY=category,
                    SPLIT_DIR=_yaml_str(split_dir),
                    SHOTS=str(mmlu.shots),
                    **common,
                )
            )
        if all((data_dir / rel).is_file() for rel in DATA_FILES["mmlu"]):
            _split_mmlu(data_dir, tmp / "mmlu_data", subjects)
        (tmp / "DATA_DIR").write_text(str(data_dir) + "\n")
        (tmp / ".complete").write_text("")
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race (or a stale incomplete folder)
            if not (final / ".complete").is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def task_manager(data_dir: str | Path, cache_dir: str | Path | None = None):
    """An ``lm_eval.tasks.TaskManager`` that knows only our ``lz_*`` tasks (no built-ins).

    One per generated task folder and process, and it builds each named task or group once: building reads the
    data files (MMLU: 57 subjects, about 12 s on a 2-core CPU), and ``diagnose`` evaluates the same tasks six times.
    """
    return _reusing_task_manager(str(build_task_dir(data_dir, cache_dir)))


@lru_cache(maxsize=8)
def _reusing_task_manager(task_dir: str):
    from lm_eval.tasks import TaskManager

    class ReusingTaskManager(TaskManager):
        # lm-eval rebuilds a task's requests and re-seeds its few-shot sampler on every run, so a built task
        # can be reused as it is
        def _load_spec(self, spec):
            if not isinstance(spec, str):
                return super()._load_spec(spec)
            if spec not in built:
                built[spec] = super()._load_spec(spec)
            return built[spec]

    built: dict[str, object] = {}
    return ReusingTaskManager(include_path=task_dir, include_defaults=False)
