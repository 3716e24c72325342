"""Training data for attention transfer and LoRA fine-tuning: read, format, tokenise, pack, cache.

Everything is read from a local data directory (``/work/shared/data`` in this project; see
:func:`default_data_dir`), never from the network.

Sources
-------
A *source* is a name in :data:`SOURCES` or a path to a user file. Named sources (aliases in brackets):

=================  ===========  ==========================================================
``sharegpt``       instruction  ``sharegpt/sharegpt_en.jsonl.xz``, 16,196 multi-turn chats
``alpaca_demo``    instruction  ``alpaca_en_demo/alpaca_en_demo.json``, 999 rows
                                (``alpaca``, ``alpaca_en_demo``)
``dolly``          instruction  ``dolly_open_qa/dolly_open_qa.jsonl.xz``, 3,739 Q/A pairs
                                (``dolly_open_qa``)
``c4``             text         ``c4_demo/c4_demo.jsonl``, 300 web documents (``c4_demo``)
``wiki``           text         ``wiki_demo/wiki_demo.txt``, 30 articles, one per line
                                (``wiki_demo``)
``wikitext2``      text         ``wikitext2/valid.txt`` split into its 60 articles at the
                                top-level `` = Title = `` headings. The *test* file is left
                                out on purpose (it is the standard perplexity benchmark);
                                ``wikitext2_test`` reads it if you really want it.
``shakespeare``    text         ``tinyshakespeare/input.txt`` cut at blank lines into chunks of
                                at least 4,000 characters (``tinyshakespeare``)
=================  ===========  ==========================================================

A user file is any path ending in ``.jsonl``, ``.json`` or ``.txt`` (optionally followed by ``.xz``,
``.gz`` or ``.bz2``). JSON rows may hold ``text``; or Alpaca ``instruction``/``input``/``output``;
or ShareGPT ``conversations`` (``from``/``value``); or OpenAI-style ``messages``
(``role``/``content``). A ``.json`` file is a JSON array (streamed) or JSON lines. A ``.txt`` file
holds documents separated by blank lines; a file without any blank line has one document per line.

Any source may carry a mixing weight: ``"sharegpt:3"``.

Template
--------
Instruction data becomes plain text with an Alpaca-style template (:func:`format_alpaca`,
:func:`format_conversation`)::

    ### Instruction:
    {instruction}

    ### Input:            <- only when the row has a non-empty input
    {input}

    ### Response:
    {output}

A conversation with exactly one user->assistant exchange uses the same form. Longer
conversations become alternating blocks ``### User:\\n...`` / ``### Assistant:\\n...`` joined by a
blank line (a system turn, if any, comes first as ``### System:\\n...``). Loss is taken on the whole
text (prompt included); this is language-model data, not masked SFT.

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

import bz2
import gzip
import hashlib
import io
import itertools
import json
import lzma
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from linearize.data_dir import default_data_dir
from linearize.errors import LinearizeError

__all__ = [
    "FORMAT_VERSION",
    "SOURCES",
    "ALIASES",
    "Document",
    "PackedData",
    "Source",
    "build_packed_data",
    "check_sources",
    "default_cache_dir",
    "default_data_dir",
    "format_alpaca",
    "format_conversation",
    "iter_documents",
    "iter_long_documents",
    "known_sources",
    "register_source",
    "resolve_source",
]

#: Bump when formatting, splitting or packing changes, so old caches are not reused.
FORMAT_VERSION = 1

DEFAULT_VAL_TOKENS = 65_536
DEFAULT_VAL_FRACTION = 0.05

_BATCH_CHARS = 32_000  # characters tokenised per call (one batch comes from one source)
_BATCH_DOCS = 256
_SHAKESPEARE_CHUNK_CHARS = 4_000
_PROBE_TEXT = "The quick brown fox — 12,345 jumps!\n\tdéjà vu 日本語 ### Response:"


# --------------------------------------------------------------------------------------------
# Data directory
# --------------------------------------------------------------------------------------------


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        return default_data_dir()
    p = Path(data_dir).expanduser()
    if not p.is_dir():
        raise LinearizeError(f"Data directory {str(p)!r} does not exist or is not a directory.")
    return p.resolve()


def default_cache_dir() -> Path:
    """``$LINEARIZE_CACHE``, else ``$XDG_CACHE_HOME/linearize/data`` (``~/.cache/linearize/data``)."""
    env = os.environ.get("LINEARIZE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "linearize" / "data"


# --------------------------------------------------------------------------------------------
# Documents and templates
# --------------------------------------------------------------------------------------------


class Document(str):
    """A document: a plain ``str`` that also carries ``id``, ``group`` (the unit of the
    train/val split) and ``source``."""

    id: str
    group: str
    source: str

    def __new__(cls, text: str, id: str, group: str | None = None, source: str = "") -> "Document":
        self = super().__new__(cls, text)
        self.id = str(id)
        self.group = str(group) if group is not None else str(id)
        self.source = source
        return self

    def __reduce__(self):  # keep attributes through pickling
        return (Document, (str(self), self.id, self.group, self.source))


_CHUNK_ID = re.compile(r"^(.+)_(\d+)$")


def _sharegpt_group(doc_id: str) -> str:
    """``<prefix>_<k>`` chunks of one ShareGPT conversation share the group ``<prefix>``."""
    m = _CHUNK_ID.match(doc_id)
    return m.group(1) if m else doc_id


def format_alpaca(instruction: str, input: str = "", output: str = "") -> str:
    """``### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n{output}``"""
    parts = [f"### Instruction:\n{instruction.strip()}"]
    if input and input.strip():
        parts.append(f"### Input:\n{input.strip()}")
    parts.append(f"### Response:\n{output.strip()}")
    return "\n\n".join(parts)


_ROLE_NAMES = {
    "human": "User",
    "user": "User",
    "prompter": "User",
    "gpt": "Assistant",
    "assistant": "Assistant",
    "chatgpt": "Assistant",
    "bing": "Assistant",
    "bard": "Assistant",
    "model": "Assistant",
    "system": "System",
}


def _normalise_turns(turns: Iterable[Any]) -> list[tuple[str, str]]:
    out = []
    for t in turns:
        if isinstance(t, (tuple, list)) and len(t) == 2:
            role, text = t
        elif isinstance(t, dict):
            role = t.get("from", t.get("role"))
            text = t.get("value", t.get("content"))
        else:
            raise LinearizeError(f"A conversation turn must be a dict with from/value or role/content, got {t!r:.80}")
        if role is None or text is None:
            raise LinearizeError(f"A conversation turn lacks a role or a text: {t!r:.120}")
        role_s = str(role).strip().lower()
        out.append((_ROLE_NAMES.get(role_s, str(role).strip().title()), str(text).strip()))
    return out


def format_conversation(turns: Iterable[Any]) -> str:
    """Format a conversation (ShareGPT ``{"from", "value"}``, OpenAI ``{"role", "content"}`` or
    ``(role, text)`` pairs).

    One user->assistant exchange (optionally after a system turn) is written like an Alpaca row
    (``### Instruction:`` / ``### Response:``); anything longer as alternating ``### User:`` /
    ``### Assistant:`` blocks separated by a blank line.
    """
    norm = _normalise_turns(turns)
    system = [t for r, t in norm if r == "System"]
    rest = [(r, t) for r, t in norm if r != "System"]
    head = "\n\n".join(f"### System:\n{t}" for t in system)
    if len(rest) == 2 and rest[0][0] == "User" and rest[1][0] == "Assistant":
        body = format_alpaca(rest[0][1], "", rest[1][1])
    else:
        body = "\n\n".join(f"### {r}:\n{t}" for r, t in rest)
    return f"{head}\n\n{body}" if head else body


def _row_to_document(row: Any, default_id: str, source: str, where: str) -> Document | None:
    """Turn one JSON row into a Document (None for an empty one)."""
    if not isinstance(row, dict):
        raise LinearizeError(f"{where}: expected a JSON object, got {type(row).__name__}")
    doc_id = str(row["id"]) if "id" in row else default_id
    if "conversations" in row or "messages" in row:
        text = format_conversation(row.get("conversations", row.get("messages")) or [])
        group = _sharegpt_group(doc_id) if "id" in row else doc_id
    elif "instruction" in row and ("output" in row or "response" in row):
        text = format_alpaca(
            str(row["instruction"]),
            str(row.get("input") or row.get("context") or ""),
            str(row.get("output", row.get("response")) or ""),
        )
        group = doc_id
    elif "text" in row:
        text = str(row["text"] or "")
        group = doc_id
    else:
        raise LinearizeError(
            f"{where}: a row needs 'text', or 'instruction'+'output', or 'conversations'/'messages'; "
            f"it has keys {sorted(row)}"
        )
    if not text.strip():
        return None
    return Document(text, doc_id, group, source)


# --------------------------------------------------------------------------------------------
# Low-level streaming readers
# --------------------------------------------------------------------------------------------


def _open_text(path: Path):
    name = path.name.lower()
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, "rt", encoding="utf-8")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise LinearizeError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def _iter_json_array(f: io.TextIOBase, where: str, chunk_chars: int = 1 << 16) -> Iterator[Any]:
    """Stream the items of a top-level JSON array without reading the whole file."""
    dec = json.JSONDecoder()
    buf = ""
    pos = 0
    eof = False

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        more = f.read(chunk_chars)
        if not more:
            eof = True
            return False
        buf = buf[pos:] + more
        pos = 0
        return True

    def skip(chars: str) -> str | None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in chars:
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not fill():
                return None

    if skip(" \t\r\n") != "[":
        raise LinearizeError(f"{where}: expected a JSON array")
    pos += 1
    while True:
        c = skip(" \t\r\n,")
        if c is None:
            raise LinearizeError(f"{where}: the JSON array is truncated")
        if c == "]":
            return
        while True:
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not fill():
                    raise LinearizeError(f"{where}: not valid JSON ({e.msg})") from None
                continue
            if end == len(buf) and not eof and not isinstance(obj, (dict, list, str)):
                # a number or literal may continue in the next chunk
                if fill():
                    continue
            break
        pos = end
        yield obj


def _iter_text_blocks(path: Path, probe_lines: int = 1000) -> Iterator[str]:
    """Blank-line separated blocks. A file with no blank line among its first ``probe_lines``
    lines is read one document per line instead (streams either way)."""
    with _open_text(path) as f:
        head: list[str] = []
        blank_seen = False
        for line in f:
            head.append(line)
            if not line.strip():
                blank_seen = True
                break
            if len(head) >= probe_lines:
                break
        if not blank_seen:
            for line in head:
                if line.strip():
                    yield line.strip("\n")
            for line in f:
                if line.strip():
                    yield line.strip("\n")
            return
        lines: list[str] = []
        for line in itertools.chain(head, f):
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).strip("\n")
                lines = []
        if lines:
            yield "".join(lines).strip("\n")


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A named source: call it (``SOURCES["c4"]()`` or ``SOURCES["c4"](data_dir)``) to stream its
    documents."""

    name: str
    files: tuple[str, ...]  # relative to the data dir (absolute for user files)
    read: Callable[[Path], Iterator[Document]]
    kind: str  # "instruction" | "text"
    description: str = ""
    user_file: bool = False

    def paths(self, data_dir: Path | None) -> list[Path]:
        if self.user_file:
            return [Path(f) for f in self.files]
        assert data_dir is not None
        return [data_dir / f for f in self.files]

    def check(self, data_dir: Path | None) -> list[Path]:
        paths = self.paths(data_dir)
        missing = [p for p in paths if not p.is_file()]
        if missing:
            where = "" if self.user_file else f" in data directory {str(data_dir)!r}"
            raise LinearizeError(
                f"Source {self.name!r}: missing file(s){where}: " + ", ".join(str(p) for p in missing)
            )
        return paths

    def __call__(self, data_dir: str | os.PathLike | None = None) -> Iterator[Document]:
        d = None if self.user_file else _resolve_data_dir(data_dir)
        self.check(d)
        return self.read(d)  # type: ignore[arg-type]


def _read_sharegpt(d: Path) -> Iterator[Document]:
    path = d / "sharegpt" / "sharegpt_en.jsonl.xz"
    for lineno, row in _iter_jsonl(path):
        doc_id = str(row["id"])
        yield Document(format_conversation(row["conversations"]), doc_id, _sharegpt_group(doc_id), "sharegpt")


def _read_dolly(d: Path) -> Iterator[Document]:
    path = d / "dolly_open_qa" / "dolly_open_qa.jsonl.xz"
    for lineno, row in _iter_jsonl(path):
        yield Document(format_conversation(row["conversations"]), str(row["id"]), None, "dolly")


def _read_alpaca_demo(d: Path) -> Iterator[Document]:
    path = d / "alpaca_en_demo" / "alpaca_en_demo.json"
    with _open_text(path) as f:
        for i, row in enumerate(_iter_json_array(f, str(path))):
            doc = _row_to_document(row, f"alpaca-{i:04d}", "alpaca_demo", f"{path}[{i}]")
            if doc is not None:
                yield doc


def _read_c4(d: Path) -> Iterator[Document]:
    path = d / "c4_demo" / "c4_demo.jsonl"
    for lineno, row in _iter_jsonl(path):
        text = str(row.get("text") or "")
        if text.strip():
            yield Document(text, f"c4-{lineno:04d}", None, "c4")


def _read_wiki(d: Path) -> Iterator[Document]:
    path = d / "wiki_demo" / "wiki_demo.txt"
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield Document(line.strip(), f"wiki-{lineno:02d}", None, "wiki")


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def _read_wikitext(d: Path, split: str, name: str) -> Iterator[Document]:
    """Articles start at a top-level heading line `` = Title = `` between two blank lines (the
    blank-line condition keeps formula lines such as `` = 1 <unk> / s ... = `` inside articles)."""
    path = d / "wikitext2" / f"{split}.txt"
    with _open_text(path) as f:
        lines: list[str] = []
        k = 0
        prev_blank = True
        window = itertools.chain(f, [""])
        cur = next(window, "")
        for nxt in window:
            is_title = (
                prev_blank
                and _WIKITEXT_TITLE.match(cur.rstrip("\n")) is not None
                and (not nxt.strip())
            )
            if is_title and "".join(lines).strip():
                yield Document("".join(lines).strip(), f"wikitext2-{split}-{k:03d}", None, name)
                k += 1
                lines = []
            lines.append(cur)
            prev_blank = not cur.strip()
            cur = nxt
        lines.append(cur)
        if "".join(lines).strip():
            yield Document("".join(lines).strip(), f"wikitext2-{split}-{k:03d}", None, name)


def _read_shakespeare(d: Path) -> Iterator[Document]:
    path = d / "tinyshakespeare" / "input.txt"
    with _open_text(path) as f:
        buf: list[str] = []
        n = 0
        k = 0
        for line in f:
            buf.append(line)
            n += len(line)
            if not line.strip() and n >= _SHAKESPEARE_CHUNK_CHARS:
                yield Document("".join(buf).strip(), f"shakespeare-{k:03d}", None, "shakespeare")
                k += 1
                buf, n = [], 0
        if "".join(buf).strip():
            yield Document("".join(buf).strip(), f"shakespeare-{k:03d}", None, "shakespeare")


#: Named sources: name -> :class:`Source` (callable: ``SOURCES[name](data_dir)`` streams documents).
SOURCES: dict[str, Source] = {}

#: Alternative names accepted by :func:`resolve_source`.
ALIASES: dict[str, str] = {}


def register_source(source: Source, aliases: Iterable[str] = ()) -> Source:
    """Add a named source (and aliases) to the registry."""
    SOURCES[source.name] = source
    for a in aliases:
        ALIASES[a] = source.name
    return source


register_source(
    Source("sharegpt", ("sharegpt/sharegpt_en.jsonl.xz",), _read_sharegpt, "instruction",
           "English ShareGPT multi-turn conversations (16,196; split by id prefix)"),
)
register_source(
    Source("alpaca_demo", ("alpaca_en_demo/alpaca_en_demo.json",), _read_alpaca_demo, "instruction",
           "Alpaca-format demo set (999 rows)"),
    aliases=("alpaca", "alpaca_en_demo"),
)
register_source(
    Source("dolly", ("dolly_open_qa/dolly_open_qa.jsonl.xz",), _read_dolly, "instruction",
           "Dolly-15k open_qa category (3,739 single-turn Q/A)"),
    aliases=("dolly_open_qa",),
)
register_source(
    Source("c4", ("c4_demo/c4_demo.jsonl",), _read_c4, "text", "C4-style web documents (300)"),
    aliases=("c4_demo",),
)
register_source(
    Source("wiki", ("wiki_demo/wiki_demo.txt",), _read_wiki, "text", "Wikipedia articles (30, one per line)"),
    aliases=("wiki_demo",),
)
register_source(
    Source("wikitext2", ("wikitext2/valid.txt",), lambda d: _read_wikitext(d, "valid", "wikitext2"), "text",
           "WikiText-2 validation file split into articles (test file excluded: it is the ppl benchmark)"),
)
register_source(
    Source("wikitext2_test", ("wikitext2/test.txt",), lambda d: _read_wikitext(d, "test", "wikitext2_test"),
           "text", "WikiText-2 test file split into articles (the perplexity benchmark; do not train on it)"),
)
register_source(
    Source("shakespeare", ("tinyshakespeare/input.txt",), _read_shakespeare, "text",
           "Tiny Shakespeare cut into >=4,000-character chunks at blank lines"),
    aliases=("tinyshakespeare",),
)


_USER_SUFFIX = re.compile(r"\.(jsonl|json|txt)(\.(xz|gz|bz2))?$", re.IGNORECASE)


def _user_file_source(spec: str) -> Source:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LinearizeError(f"Data file {spec!r} not found (resolved to {str(path.resolve())!r}).")
    path = path.resolve()
    m = _USER_SUFFIX.search(path.name)
    assert m is not None
    fmt = m.group(1).lower()
    name = str(path)
    stem = path.name

    def read(_d: Path | None) -> Iterator[Document]:
        if fmt == "txt":
            for i, block in enumerate(_iter_text_blocks(path)):
                if block.strip():
                    yield Document(block, f"{stem}:{i}", None, name)
            return
        if fmt == "json":
            with _open_text(path) as f:
                head = f.read(4096).lstrip()
            if head.startswith("["):
                with _open_text(path) as f:
                    for i, row in enumerate(_iter_json_array(f, str(path))):
                        doc = _row_to_document(row, f"{stem}:{i}", name, f"{path}[{i}]")
                        if doc is not None:
                            yield doc
                return
        for lineno, row in _iter_jsonl(path):
            doc = _row_to_document(row, f"{stem}:{lineno}", name, f"{path}:{lineno}")
            if doc is not None:
                yield doc

    kind = "text" if fmt == "txt" else "mixed"
    return Source(name, (name,), read, kind, f"user file {path}", user_file=True)


def known_sources() -> list[str]:
    """Names accepted by :func:`resolve_source` (registry names first, then aliases)."""
    return list(SOURCES) + sorted(ALIASES)


def resolve_source(spec: str) -> tuple[Source, float]:
    """Parse ``"name"``, ``"name:weight"``, ``"path/to/file.jsonl[:weight]"`` into (source, weight)."""
    if not isinstance(spec, str) or not spec.strip():
        raise LinearizeError(f"A source must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    weight = 1.0
    base, sep, tail = spec.rpartition(":")
    if sep and base:
        try:
            weight = float(tail)
        except ValueError:
            pass
        else:
            spec = base
            if not (weight > 0 and math.isfinite(weight)):
                raise LinearizeError(f"Source weight must be a positive number, got {tail!r} in {spec!r}")
    name = ALIASES.get(spec.lower(), spec.lower())
    if name in SOURCES:
        return SOURCES[name], weight
    if _USER_SUFFIX.search(spec):
        return _user_file_source(spec), weight
    raise LinearizeError(
        f"Unknown data source {spec!r}. Known sources: {', '.join(SOURCES)} "
        f"(aliases: {', '.join(sorted(ALIASES))}); or a path to a .jsonl/.json/.txt file "
        "(optionally .xz/.gz/.bz2); append ':<weight>' to weight a source."
    )


def iter_documents(
    source: str, data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> Iterator[Document]:
    """Stream the documents (formatted strings) of one source name or user file."""
    src, _ = resolve_source(source)
    it = src(data_dir)
    try:
        for i, doc in enumerate(it):
            if limit is not None and i >= limit:
                break
            yield doc
    finally:
        it.close()  # type: ignore[attr-defined]


def iter_long_documents(data_dir: str | os.PathLike | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(id, text)`` for the 163 long documents of ``longdocs/longdocs.jsonl.xz``
    (Project Gutenberg books ``pg-*`` and Anarchist FAQ sections ``afaq-*``, each > ~14k tokens)."""
    d = _resolve_data_dir(data_dir)
    path = d / "longdocs" / "longdocs.jsonl.xz"
    if not path.is_file():
        raise LinearizeError(f"Long documents file not found: {path}")
    for _, row in _iter_jsonl(path):
        yield str(row["id"]), str(row["text"])


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
    ddir = _resolve_data_dir(data_dir) if need_dir else None
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
