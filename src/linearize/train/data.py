"""Training data for attention transfer and LoRA fine-tuning: tokenise, split, mix, pack, cache.

Everything is read from a local data directory (``/work/shared/data`` in this project; see
:func:`linearize.data_dir.default_data_dir`), never from the network.

Documents come from :mod:`linearize.documents` (sources, formats, the Alpaca-style template).

Packing
-------
Each document is tokenised once without special tokens and followed by EOS. The documents of a
split are concatenated in reading order and cut into rows of ``seq_len`` tokens; when the
tokenizer has a BOS token, every row *starts with BOS* and holds ``seq_len - 1`` stream tokens
(Gemma and Llama-family models behave badly without a leading BOS; documents that continue
across a row boundary therefore resume after a BOS, which those models tolerate). The incomplete
last row is dropped; nothing is ever padded. Train rows are shuffled with ``seed``; val rows stay
in reading order.

Split
-----
A document goes to validation when ``blake2b(seed, source, group) < val_fraction``, where the
group is the document id, except for ShareGPT-style ids ``<prefix>_<k>`` (chunks of one original
conversation), whose group is the prefix. So the split is by document (by id prefix for
ShareGPT), independent of budgets and reading order, and deterministic given ``seed``. Reading
stops once the train budget (``max_train_tokens``) and the val budget (``val_tokens``) are both
met; documents of a split that is already full are skipped without being tokenised (never moved
to the other split). If the sources run out before validation holds one full row, the last-read
train groups are moved to validation until it does.

Mixing
------
Several sources are mixed *token-balanced*: the next batch of documents always comes from the
unexhausted source with the fewest tokens read so far divided by its weight (default weight 1,
ties go to the source listed first). Equal weights thus give equal token shares until a source
runs out, after which the others fill the budget. The budgets are totals over all sources.

Caching
-------
The packed tensors are saved under ``<cache root>/<key>/`` (``packed.pt``, ``manifest.json``,
``documents.json``), where the cache root is ``cache_dir``, else ``$LINEARIZE_CACHE``, else
``$XDG_CACHE_HOME/linearize/data`` (``~/.cache/linearize/data``). The key is a hash of the
tokenizer identity (class, ``name_or_path``, ``len(tokenizer)``, BOS/EOS ids and a hash of the ids
of a probe text and of a few id->token conversions), the sources with their weights and the sizes
of their files (plus mtimes for user files), ``seq_len``, the budgets, ``val_fraction``, ``seed`` and
:data:`FORMAT_VERSION` (bumped whenever the template or packing changes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from linearize.data_dir import resolve_data_dir
from linearize.documents import SOURCES, Document, Source, resolve_source
from linearize.errors import LinearizeError

__all__ = ["FORMAT_VERSION", "PackedData", "build_packed_data", "check_sources", "default_cache_dir"]

#: Bump when formatting, splitting or packing changes, so old caches are not reused.
FORMAT_VERSION = 1

DEFAULT_VAL_TOKENS = 65_536
DEFAULT_VAL_FRACTION = 0.05

_BATCH_CHARS = 32_000  # characters tokenised per call (one batch comes from one source)
_BATCH_DOCS = 256
_PROBE_TEXT = "The quick brown fox — 12,345 jumps!\n\tdéjà vu 日本語 ### Response:"


def default_cache_dir() -> Path:
    """``$LINEARIZE_CACHE``, else ``$XDG_CACHE_HOME/linearize/data`` (``~/.cache/linearize/data``)."""
    env = os.environ.get("LINEARIZE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "linearize" / "data"


# --------------------------------------------------------------------------------------------
# Tokenisation, packing, caching
# --------------------------------------------------------------------------------------------


@dataclass
class PackedData:
    """Packed token rows. ``train``/``val`` are ``torch.long`` tensors ``[rows, seq_len]``;
    ``manifest`` is JSON-serialisable; ``documents`` maps ``"train"``/``"val"`` to the
    ``[source, id]`` pairs of the documents that contribute tokens, in reading order."""

    train: torch.Tensor
    val: torch.Tensor
    manifest: dict
    documents: dict[str, list[list[str]]] = field(default_factory=dict, repr=False)


def _tokenizer_fingerprint(tokenizer) -> dict:
    name = getattr(tokenizer, "name_or_path", "") or ""
    try:
        vocab = len(tokenizer)
    except TypeError:
        vocab = int(getattr(tokenizer, "vocab_size", 0))
    probe_ids = _encode(tokenizer, [_PROBE_TEXT])[0]
    sample_ids = sorted({i for i in (0, 1, 2, 3, 10, 100, 1000, 10_000, 100_000, vocab - 1) if 0 <= i < vocab})
    try:
        sample_toks = tokenizer.convert_ids_to_tokens(sample_ids)
    except Exception:  # pragma: no cover - exotic tokenizers
        sample_toks = []
    h = hashlib.sha256(json.dumps([probe_ids, sample_ids, sample_toks], ensure_ascii=False).encode()).hexdigest()
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(name),
        "vocab_size": int(vocab),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "ids_hash": h[:16],
    }


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    enc = tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False)
    return enc["input_ids"]


def _tokenise_batch(tokenizer, texts: list[str], eos: int) -> list[np.ndarray]:
    """Token ids of each text followed by EOS, as compact int32 arrays."""
    return [np.asarray(ids + [eos], dtype=np.int32) for ids in _encode(tokenizer, texts)]


def _val_hash(seed: int, source: str, group: str) -> float:
    h = hashlib.blake2b(f"{seed}\0{source}\0{group}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def _file_info(src: Source, data_dir: Path | None) -> list[dict]:
    info = []
    for rel, p in zip(src.files, src.paths(data_dir)):
        st = p.stat()
        d = {"path": rel, "size": st.st_size}
        if src.user_file:
            d["mtime_ns"] = st.st_mtime_ns
        info.append(d)
    return info


@dataclass
class _Rec:
    source: str
    id: str
    group: str
    split: str
    ids: np.ndarray


@dataclass
class _State:
    src: Source
    weight: float
    it: Iterator[Document] | None = None
    exhausted: bool = False
    tokens_read: int = 0
    chars_read: int = 0
    docs_read: int = 0
    docs_skipped: int = 0


def _pack(recs: list[_Rec], n_rows: int | None, seq_len: int, bos: int | None):
    """Concatenate records and cut rows. Returns (rows ndarray, per-source tokens, per-source docs,
    used doc list)."""
    content = seq_len - (1 if bos is not None else 0)
    total = sum(len(r.ids) for r in recs)
    avail = total // content
    n = avail if n_rows is None else min(n_rows, avail)
    used = n * content
    if recs:
        stream = np.concatenate([r.ids for r in recs])[:used].astype(np.int64)
    else:
        stream = np.zeros(0, dtype=np.int64)
    rows = stream.reshape(n, content)
    if bos is not None:
        rows = np.concatenate([np.full((n, 1), bos, dtype=np.int64), rows], axis=1)
    tok_per_src: dict[str, int] = {}
    docs_per_src: dict[str, int] = {}
    used_docs: list[list[str]] = []
    start = 0
    for r in recs:
        if start >= used:
            break
        take = min(len(r.ids), used - start)
        tok_per_src[r.source] = tok_per_src.get(r.source, 0) + take
        docs_per_src[r.source] = docs_per_src.get(r.source, 0) + 1
        used_docs.append([r.source, r.id])
        start += len(r.ids)
    return rows, tok_per_src, docs_per_src, used_docs


def _load_cache(path: Path) -> PackedData | None:
    try:
        blob = torch.load(path / "packed.pt", map_location="cpu", weights_only=True)
        manifest = json.loads((path / "manifest.json").read_text())
        documents = json.loads((path / "documents.json").read_text())
        return PackedData(blob["train"].long(), blob["val"].long(), manifest, documents)
    except Exception as e:  # corrupt or partial cache: rebuild
        warnings.warn(f"Ignoring unreadable data cache {path}: {e}")
        return None


def _save_cache(path: Path, data: PackedData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        small = data.train.numel() == 0 or int(max(data.train.max(), data.val.max() if data.val.numel() else 0)) < 2**31
        dt = torch.int32 if small else torch.int64
        torch.save({"train": data.train.to(dt), "val": data.val.to(dt)}, tmp / "packed.pt")
        (tmp / "manifest.json").write_text(json.dumps(data.manifest, indent=1, ensure_ascii=False))
        (tmp / "documents.json").write_text(json.dumps(data.documents, ensure_ascii=False))
        try:
            os.replace(tmp, path)
        except OSError:
            if (path / "packed.pt").is_file():  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(path, ignore_errors=True)
                os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_sources(sources: list[str], data_dir: str | os.PathLike | None = None
                  ) -> tuple[list[tuple[Source, float]], Path | None]:
    """Resolve `sources` and check that their files exist, without reading them: (source, weight) pairs and the
    data directory (None when every source is a user file). Raises LinearizeError naming the bad source."""
    resolved = [resolve_source(s) for s in sources]
    names = [s.name for s, _ in resolved]
    if len(set(names)) != len(names):
        raise LinearizeError(f"A source is listed twice: {names}")
    need_dir = any(not s.user_file for s, _ in resolved)
    ddir = resolve_data_dir(data_dir) if need_dir else None
    for s, _ in resolved:
        s.check(ddir)
    return resolved, ddir


def build_packed_data(
    tokenizer,
    sources: list[str] | str,
    *,
    seq_len: int = 1024,
    max_train_tokens: int | None = None,
    val_tokens: int = DEFAULT_VAL_TOKENS,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    seed: int = 0,
    show_progress: bool = True,
) -> PackedData:
    """Tokenise, split and pack ``sources`` into ``[rows, seq_len]`` train/val tensors.

    - ``sources``: names from :data:`SOURCES` (or aliases) or user files, each optionally
      ``":<weight>"``; mixed token-balanced by weight (see the module docstring).
    - ``max_train_tokens``: train budget (total over sources, BOS included); the result has
      ``max_train_tokens // seq_len`` rows, or fewer if the sources run out. ``None`` = use all.
    - ``val_tokens``: validation budget; ``ceil(val_tokens / seq_len)`` rows at most (0 = none).
    - ``val_fraction``: share of documents (ShareGPT: id prefixes) that belong to validation.
    - Reading stops once both budgets are met, so small budgets take seconds.
    - The result is cached (see the module docstring); ``use_cache=False`` neither reads nor writes.
    """
    t0 = time.perf_counter()
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise LinearizeError("build_packed_data needs at least one source; known: " + ", ".join(SOURCES))
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LinearizeError(
            f"Tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no EOS token; "
            "documents are separated by EOS when packing."
        )
    min_len = 2 if bos is not None else 1
    if not isinstance(seq_len, int) or seq_len < min_len:
        raise LinearizeError(f"seq_len must be an integer >= {min_len}, got {seq_len!r}")
    if max_train_tokens is not None and max_train_tokens < seq_len:
        raise LinearizeError(
            f"max_train_tokens={max_train_tokens} is smaller than one sequence (seq_len={seq_len})."
        )
    if val_tokens is None or val_tokens < 0:
        raise LinearizeError(f"val_tokens must be >= 0, got {val_tokens!r}")
    if val_tokens > 0 and not (0.0 < val_fraction < 1.0):
        raise LinearizeError(f"val_fraction must be in (0, 1), got {val_fraction!r}")

    resolved, ddir = check_sources(sources, data_dir)
    names = [s.name for s, _ in resolved]

    content_len = seq_len - (1 if bos is not None else 0)
    train_rows_target = None if max_train_tokens is None else max_train_tokens // seq_len
    val_rows_target = math.ceil(val_tokens / seq_len)
    train_target = math.inf if train_rows_target is None else train_rows_target * content_len
    val_target = val_rows_target * content_len

    fp = _tokenizer_fingerprint(tokenizer)
    key_payload = {
        "format_version": FORMAT_VERSION,
        "tokenizer": fp,
        "sources": [
            {"name": s.name, "weight": w, "files": _file_info(s, ddir)} for s, w in resolved
        ],
        "seq_len": seq_len,
        "max_train_tokens": max_train_tokens,
        "val_tokens": val_tokens,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    key = hashlib.sha256(json.dumps(key_payload, sort_keys=True).encode()).hexdigest()[:24]
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_path = cache_root / key
    if use_cache and (cache_path / "packed.pt").is_file():
        cached = _load_cache(cache_path)
        if cached is not None:
            cached.manifest["cache_hit"] = True
            cached.manifest["cache_path"] = str(cache_path)
            cached.manifest["load_seconds"] = round(time.perf_counter() - t0, 3)
            return cached

    # ---- read + tokenise -------------------------------------------------------------------
    from tqdm.auto import tqdm

    states = [_State(s, w) for s, w in resolved]
    recs: list[_Rec] = []
    have = {"train": 0, "val": 0}
    target = {"train": train_target, "val": val_target}
    bar_total = None if math.isinf(train_target) else int(train_target + val_target)
    bar = tqdm(total=bar_total, unit="tok", unit_scale=True, disable=not show_progress,
               desc="tokenising " + "+".join(Path(n).name for n in names))
    try:
        while True:
            need = {sp: have[sp] < target[sp] for sp in have}
            if not (need["train"] or need["val"]):
                break
            active = [(i, s) for i, s in enumerate(states) if not s.exhausted]
            if not active:
                break
            _, st = min(active, key=lambda t: (t[1].tokens_read / t[1].weight, t[0]))
            if st.it is None:
                st.it = st.src.read(ddir)
            # Batch documents of this source for one tokenizer call, but stop once it would pass
            # the next source's share (keeps the mix fine-grained) or cover what is still needed.
            others = [s.tokens_read / s.weight for _, s in active if s is not st]
            next_ratio = min(others) if others else math.inf
            still = max(target[sp] - have[sp] for sp in have if need[sp])
            cpt = st.chars_read / st.tokens_read if st.tokens_read else 4.0  # chars per token so far
            batch: list[tuple[Document, str]] = []
            chars = 0
            while chars < _BATCH_CHARS and len(batch) < _BATCH_DOCS:
                doc = next(st.it, None)
                if doc is None:
                    st.exhausted = True
                    break
                split = "val" if val_target > 0 and _val_hash(seed, st.src.name, doc.group) < val_fraction else "train"
                if not need[split]:
                    st.docs_skipped += 1
                    continue
                batch.append((doc, split))
                chars += len(doc)
                est = chars / cpt
                if (st.tokens_read + est) / st.weight > next_ratio or est >= still:
                    break
            if not batch:
                continue
            arrays = _tokenise_batch(tokenizer, [str(d) for d, _ in batch], eos)
            n_new = 0
            for (doc, split), a in zip(batch, arrays):
                recs.append(_Rec(st.src.name, doc.id, doc.group, split, a))
                have[split] += len(a)
                st.tokens_read += len(a)
                st.docs_read += 1
                st.chars_read += len(doc)
                n_new += len(a)
            bar.update(n_new if bar_total is None else min(n_new, max(0, bar_total - bar.n)))
    finally:
        bar.close()
        for st in states:
            if st.it is not None:
                st.it.close()  # type: ignore[attr-defined]

    # ---- guarantee one validation row when the sources ran out ---------------------------
    moved_groups = 0
    if val_target > 0 and have["val"] < content_len:
        while have["val"] < content_len:
            train_recs = [r for r in recs if r.split == "train"]
            if not train_recs:
                break
            last = train_recs[-1]
            grp = [r for r in train_recs if r.source == last.source and r.group == last.group]
            n_grp = sum(len(r.ids) for r in grp)
            if have["train"] - n_grp < content_len:
                break
            for r in grp:
                r.split = "val"
            have["train"] -= n_grp
            have["val"] += n_grp
            moved_groups += 1

    train_recs = [r for r in recs if r.split == "train"]
    val_recs = [r for r in recs if r.split == "val"]
    train_rows, train_tok, train_docs, train_used = _pack(train_recs, train_rows_target, seq_len, bos)
    val_rows, val_tok, val_docs, val_used = _pack(val_recs, val_rows_target, seq_len, bos)
    if train_rows.shape[0] == 0:
        raise LinearizeError(
            f"Sources {names} gave {have['train']} training tokens, fewer than one sequence of "
            f"seq_len={seq_len}. Use more or longer sources or a shorter seq_len."
        )
    train = torch.from_numpy(train_rows)
    perm = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    train = train[perm].contiguous()
    val = torch.from_numpy(val_rows)

    manifest = {
        "format_version": FORMAT_VERSION,
        "sources": [
            {
                "name": st.src.name,
                "kind": st.src.kind,
                "weight": st.weight,
                "files": _file_info(st.src, ddir),
                "documents_read": st.docs_read,
                "documents_skipped": st.docs_skipped,
                "tokens_read": st.tokens_read,
                "exhausted": st.exhausted,
            }
            for st in states
        ],
        "mixing": (
            "token-balanced: each batch of documents comes from the unexhausted source with the "
            "fewest tokens read per unit weight (ties: first listed)"
        ),
        "weights": {st.src.name: st.weight for st in states},
        "split_rule": (
            f"document (ShareGPT: id prefix) goes to val iff blake2b(seed, source, group) < "
            f"{val_fraction}; documents of a full split are skipped"
        ),
        "val_groups_moved_from_train": moved_groups,
        "template": "alpaca-v1 (### Instruction/### Input/### Response; multi-turn ### User/### Assistant)",
        "packing": (
            ("BOS at the start of every row, " if bos is not None else "no BOS (tokenizer has none), ")
            + "EOS after every document, documents continue across rows, last partial row dropped, "
            "train rows shuffled with seed"
        ),
        "seq_len": seq_len,
        "max_train_tokens": max_train_tokens,
        "val_tokens": val_tokens,
        "val_fraction": val_fraction,
        "seed": seed,
        "tokenizer": fp,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "data_dir": str(ddir) if ddir is not None else None,
        "train": {
            "rows": int(train.shape[0]),
            "tokens": int(train.numel()),
            "documents": len(train_used),
            "tokens_per_source": train_tok,
            "documents_per_source": train_docs,
        },
        "val": {
            "rows": int(val.shape[0]),
            "tokens": int(val.numel()),
            "documents": len(val_used),
            "tokens_per_source": val_tok,
            "documents_per_source": val_docs,
        },
        "cache_key": key,
        "cache_key_inputs": key_payload,
        "cache_path": str(cache_path) if use_cache else None,
        "cache_hit": False,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    data = PackedData(train, val, manifest, {"train": train_used, "val": val_used})
    if use_cache:
        try:
            _save_cache(cache_path, data)
        except OSError as e:
            warnings.warn(f"Could not write data cache {cache_path}: {e}")
    return data
