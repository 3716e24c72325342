"""Run directories of ``linearize convert``: what marks one, when its model is complete, how the model appears.

- :data:`RUN_MARKER` is written into ``--out`` when a run starts, after every input was validated.
  ``--overwrite`` only ever empties a directory that carries it (or a run written before markers existed).
- The model files (weights, config, tokenizer, adapter, plot, summary) are written into :data:`STAGING`
  inside the run directory, moved into place, and only then is :data:`COMPLETE_MARKER` written. A run
  killed at any point leaves either no completion marker or a whole model.
- :func:`check_complete` (called by ``linearize.load``) refuses a directory that carries the run marker but
  not the completion marker, the staging directory itself, a run from before markers that never wrote its
  ``summary.json`` (then written last), and missing or truncated weight files. A directory written by
  ``save_pretrained`` outside a run carries no marker and loads as before.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from linearize.errors import ModelFileError

RUN_MARKER = ".linearize-run"
COMPLETE_MARKER = ".linearize-complete"
STAGING = ".linearize-staging"
#: A finished stage's parameters in its checkpoint directory (linearize.train.checkpoint writes it; a pack of the run
#: carries only this file of a finished stage).
FINAL_CHECKPOINT = "final.pt"
_LEGACY_RECIPE_HEADER = "# resolved linearize recipe"


def read_run_marker(path: str | Path) -> dict | None:
    """What the run marker records (model, recipe, start time), or None when `path` carries none."""
    try:
        return json.loads((Path(path) / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds either its old content or `text`, never a part of it (a killed run leaves no torn file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """As :func:`write_text_atomic`, for bytes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_run_marker(path: Path, model: str, recipe: str) -> None:
    write_text_atomic(path / RUN_MARKER, json.dumps({"tool": "linearize", "model": model, "recipe": recipe,
                                                     "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))


def model_id(model) -> str:
    """How a run records its model (in the run marker): the short name, the resolved path, or the class of a model
    object."""
    if not isinstance(model, (str, Path)):
        return type(model).__name__
    from linearize.models.loading import SHORT_NAMES

    return str(model) if str(model) in SHORT_NAMES else str(Path(model).expanduser().resolve())


def is_run_dir(path: str | Path) -> bool:
    """True for a directory holding a run of this tool: the marker, or the recipe header runs wrote before it."""
    path = Path(path)
    if (path / RUN_MARKER).is_file():
        return True
    try:
        with open(path / "recipe.yaml") as f:
            return f.readline().startswith(_LEGACY_RECIPE_HEADER)
    except OSError:
        return False


def begin_publish(out: Path) -> Path:
    """A fresh staging directory inside `out` for the model files; `out` loses its completion marker first, so a
    re-save killed half way is never taken for complete. The staging directory carries a run marker of its own:
    on its own it is a half-written run."""
    (out / COMPLETE_MARKER).unlink(missing_ok=True)
    staging = out / STAGING
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    shutil.copyfile(out / RUN_MARKER, staging / RUN_MARKER)
    return staging


def publish(out: Path, staging: Path) -> None:
    """Move everything staged into `out` (replacing older copies), then write the completion marker."""
    for item in sorted(staging.iterdir()):
        if item.name == RUN_MARKER:
            continue
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    shutil.rmtree(staging)
    write_text_atomic(out / COMPLETE_MARKER, json.dumps({"completed": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def check_complete(path: str | Path) -> None:
    """Raise ModelFileError (one line, with the reason) unless `path` holds a whole model (see the module doc)."""
    path = Path(path)
    if path.name == STAGING:
        raise ModelFileError(f"{path} is the temporary directory of an unfinished linearize run; "
                             f"load its parent once the run completes")
    if (path / RUN_MARKER).is_file() and not (path / COMPLETE_MARKER).is_file():
        raise ModelFileError(f"{path} holds an unfinished linearize run (no {COMPLETE_MARKER}); finish it with "
                             f"`linearize convert --resume --out {path}`")
    if is_run_dir(path) and not (path / RUN_MARKER).is_file() and not (path / "summary.json").is_file():
        raise ModelFileError(f"{path} holds a linearize run that stopped before writing summary.json; "
                             f"its model may be incomplete")
    shards = sorted(path.glob("*.safetensors"))
    if (path / "config.json").is_file() and not shards and not any(path.glob("pytorch_model*.bin")):
        raise ModelFileError(f"{path} has config.json but no weights (model.safetensors)")
    for shard in shards:
        _check_safetensors(shard)


def _check_safetensors(file: Path) -> None:
    """safetensors' own header check: a truncated copy fails here, before any weight is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt"):
            pass
    except (OSError, SafetensorError) as exc:
        raise ModelFileError(f"{file} is truncated or not a safetensors file ({exc}); the model was not written "
                             f"completely") from exc
