"""A run directory carried to another machine: :func:`pack_run` writes what resuming it needs into parts of at most
a given size, :func:`unpack_run` checks them and restores the run in another directory.

GPU time comes in stretches on machines that are wiped between them, and what comes back from one is a few files
of limited size. A pack holds only what cannot be derived again: the run marker, the resolved recipe, the data
manifest, the training log, the layer selection, the summary and the stages' checkpoints (trainable parameters,
optimizer, scheduler, RNG, step). The base model's files and the model files a finished run writes (merged
weights, adapter, tokenizer copy, loss plot) are left out: ``linearize convert --resume`` on the restored run
loads the base, continues from the checkpoints (a finished stage is taken from its ``final.pt``) and writes them
again, the tokenizer from the base. So a restored run never carries the completion marker until that resume.

Files next to each other: ``OUT.part000``, ``OUT.part001``, ... (a gzipped tar, cut into parts) and
``OUT.manifest.json`` (written last): each part's size and sha256, each packed file's sha256, the base model's
fingerprint (:func:`linearize.models.loading.base_fingerprint`) and whether the run was complete. Unpacking checks
the target, every part and the base model before anything is written, then extracts into a temporary directory
beside the target and renames it into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

from linearize.errors import LinearizeError
from linearize.models import rundir

KIND = "linearize-packed-run"
MANIFEST_SUFFIX = ".manifest.json"
#: The files of a run directory that a pack carries (each when present) ...
PACKED_FILES = (rundir.RUN_MARKER, "recipe.yaml", "data_manifest.json", "train_log.jsonl", "layer_selection.json",
                "summary.json")
#: ... and its directories, whole (the stages' checkpoint files).
PACKED_DIRS = ("checkpoints",)
DEFAULT_PART_MB = 15.0


def manifest_path(out: str | Path) -> Path:
    return Path(f"{out}{MANIFEST_SUFFIX}")


def part_path(out: str | Path, index: int) -> Path:
    return Path(f"{out}.part{index:03d}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def packed_files(run_dir: Path) -> list[Path]:
    """The run's files a pack carries, as paths relative to `run_dir`, sorted. Of a finished stage's checkpoint
    directory only its ``final.pt``: a resume takes that stage from it and reads nothing else there (the last
    checkpoint, with its optimizer state, is the largest file of a run)."""
    files = [Path(name) for name in PACKED_FILES if (run_dir / name).is_file()]
    for name in PACKED_DIRS:
        top = run_dir / name
        if not top.is_dir():
            continue
        for f in sorted(top.rglob("*")):
            if not f.is_file() or f.is_symlink() or f.name.endswith(".tmp"):  # .tmp: a torn atomic write
                continue
            if f.name != rundir.FINAL_CHECKPOINT and (f.parent / rundir.FINAL_CHECKPOINT).is_file():
                continue
            files.append(f.relative_to(run_dir))
    return sorted(files)


def _base_of(marker: dict, model) -> str:
    """The base model to fingerprint: `model` when given, else the one the run marker records (a short name or a
    path that exists here)."""
    from linearize.models.loading import SHORT_NAMES

    if model is not None:
        return str(model)
    recorded = marker.get("model")
    if recorded and (recorded in SHORT_NAMES or Path(recorded).exists()):
        return recorded
    raise LinearizeError(f"the run's base model {recorded!r} is not a short name or a path on this machine; "
                         f"pass --model with the base model's files here")


def pack_run(run_dir: str | Path, out: str | Path, *, part_mb: float = DEFAULT_PART_MB, model=None) -> dict:
    """Pack the run in `run_dir` into ``OUT.partNNN`` files of at most `part_mb` MiB and ``OUT.manifest.json``;
    returns the manifest. `model`: the run's base model when the run marker does not name it usably here (a model
    object's class name, a path of another machine). Nothing is written unless every check passes."""
    run_dir, out = Path(run_dir), Path(out)
    if not rundir.is_run_dir(run_dir):
        raise LinearizeError(f"{run_dir} does not hold a linearize run (no {rundir.RUN_MARKER})")
    marker = rundir.read_run_marker(run_dir)
    if marker is None:
        raise LinearizeError(f"{run_dir} is a run from before run markers; it cannot be packed")
    if part_mb <= 0 or int(part_mb * 2**20) < 1024:
        raise LinearizeError(f"--part-mb must be at least 1 KiB (0.001), got {part_mb}")
    existing = [p for p in (manifest_path(out), part_path(out, 0)) if p.exists()]
    if existing:
        raise LinearizeError(f"{existing[0]} exists; choose another output name or remove the old pack")
    if not out.parent.is_dir():
        raise LinearizeError(f"the output directory {out.parent} does not exist")
    from linearize.models.loading import base_fingerprint

    base = _base_of(marker, model)
    fingerprint = base_fingerprint(base)
    files = packed_files(run_dir)

    # each file read once: the sha256 in the manifest is that of the bytes packed, even while a run writes on
    contents = {rel.as_posix(): (run_dir / rel).read_bytes() for rel in files}
    buffer = io.BytesIO()  # a pack is small (the trainable parameters): it is built in memory
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for name, data in contents.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
    archive = buffer.getvalue()
    size = int(part_mb * 2**20)
    chunks = [archive[i:i + size] for i in range(0, len(archive), size)] or [b""]
    manifest = {
        "kind": KIND, "version": 1, "packed": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run": {"model": marker.get("model"), "recipe": marker.get("recipe"),
                "complete": (run_dir / rundir.COMPLETE_MARKER).is_file(),
                "files": {name: _sha256(data) for name, data in contents.items()}},
        "base": {"model": base, "fingerprint": fingerprint},
        "archive": {"bytes": len(archive), "sha256": _sha256(archive)},
        "part_bytes": size,
        "parts": [{"name": part_path(out, i).name, "bytes": len(c), "sha256": _sha256(c)} for i, c in enumerate(chunks)],
    }
    for i, chunk in enumerate(chunks):
        rundir.write_bytes_atomic(part_path(out, i), chunk)
    rundir.write_text_atomic(manifest_path(out), json.dumps(manifest, indent=1) + "\n")  # last: the pack is whole
    return manifest


def find_manifest(paths: list[str | Path]) -> Path:
    """The manifest a list of pack files names: the manifest itself, a part (``OUT.partNNN``), the pack's name, or the
    folder that holds one pack (the study's ``packs/NAME/``)."""
    if not paths:
        raise LinearizeError("name the pack (its manifest, a part or OUT)")
    for p in map(str, paths):
        if p.endswith(MANIFEST_SUFFIX):
            return Path(p)
    if len(paths) == 1 and Path(paths[0]).is_dir():
        found = sorted(Path(paths[0]).glob(f"*{MANIFEST_SUFFIX}"))
        if len(found) != 1:
            raise LinearizeError(f"{paths[0]}: a folder of {len(found)} pack manifests; name the pack (its manifest, "
                                 f"a part or OUT)")
        return found[0]
    first = str(paths[0])
    stem = first.rsplit(".part", 1)[0] if ".part" in Path(first).name else first
    return manifest_path(stem)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise LinearizeError(f"the pack's manifest {path} is missing (it is written last: a pack "
                             f"without it was not finished)") from None
    except (OSError, ValueError) as exc:
        raise LinearizeError(f"cannot read the manifest {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise LinearizeError(f"{path} is not the manifest of a packed linearize run")
    return manifest


def read_pack(paths: list[str | Path]) -> tuple[dict, bytes]:
    """The manifest and the archive of a pack, every part present with its recorded size and sha256."""
    mpath = find_manifest(paths)
    manifest = _read_manifest(mpath)
    parts = [mpath.parent / p["name"] for p in manifest["parts"]]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise LinearizeError(f"{len(missing)} of the pack's {len(parts)} parts are missing beside "
                             f"{mpath.name}: {', '.join(missing)}")
    chunks = []
    for part, record in zip(parts, manifest["parts"]):
        data = part.read_bytes()
        if len(data) != record["bytes"] or _sha256(data) != record["sha256"]:
            raise LinearizeError(f"{part.name} does not match its sha256 in {mpath.name} "
                                 f"({len(data)} bytes, {record['bytes']} expected): the copy is damaged; copy it again")
        chunks.append(data)
    archive = b"".join(chunks)
    if _sha256(archive) != manifest["archive"]["sha256"]:
        raise LinearizeError(f"the parts of {mpath.name} join into an archive that does not match its "
                             f"sha256; they belong to different packs")
    return manifest, archive


def check_base(manifest: dict, model) -> str:
    """The base model on this machine (`model`, else the one the pack records) whose fingerprint is the run's."""
    from linearize.models.loading import base_fingerprint

    base = _base_of({"model": manifest["base"]["model"]}, model)
    found, expected = base_fingerprint(base), manifest["base"]["fingerprint"]
    if found != expected:
        raise LinearizeError(f"base model {base} (fingerprint {found[:12]}) is not the run's base "
                             f"{manifest['base']['model']} (fingerprint {expected[:12]}); pass --model with the "
                             f"run's base model")
    return base


def unpack_run(paths: list[str | Path], out: str | Path, *, model=None) -> dict:
    """Restore the packed run into `out` (new, or an empty directory); returns the manifest. `model` is the base
    model on this machine (default: the one the run recorded). The run marker then names this base, so
    ``linearize convert --resume --model <it> --out OUT`` continues the run. Every check -- the target, each
    part's sha256, the base model's fingerprint -- passes before anything is written."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise LinearizeError(f"--out {out} exists; choose a new directory")
    manifest, archive = read_pack(paths)
    base = check_base(manifest, model)
    if not out.parent.is_dir():
        raise LinearizeError(f"the parent directory of --out {out} does not exist")

    staging = out.parent / f".{out.name}.unpacking-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        expected = manifest["run"]["files"]
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            members = tar.getmembers()
            names = {m.name for m in members}
            if names != set(expected) or any(not m.isfile() for m in members):
                raise LinearizeError("the archive's files are not those its manifest lists")
            for member in members:
                rel = Path(member.name)
                if rel.is_absolute() or ".." in rel.parts:
                    raise LinearizeError(f"the archive holds a path outside the run: {member.name}")
                data = tar.extractfile(member).read()
                if _sha256(data) != expected[member.name]:
                    raise LinearizeError(f"{member.name} does not match its sha256 in the manifest")
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        marker = json.loads((staging / rundir.RUN_MARKER).read_text())
        marker["model"] = rundir.model_id(base)  # the base's path here: --resume checks the run's model by it
        (staging / rundir.RUN_MARKER).write_text(json.dumps(marker, indent=1))
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest
