"""The text sources every part of linearize reads: named data sets and user files, their formats and the
Alpaca-style template. Training packs them (:mod:`linearize.train.data`); evaluation reads held-out text and long
documents from them, so they live below both.

Everything is read from a local data directory (``/work/shared/data`` in this project; see
:func:`linearize.data_dir.default_data_dir`), never from the network.

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
``longdocs``       text         ``longdocs/longdocs.jsonl.xz`` (books and long FAQ sections,
                                15k-230k tokens each) but its first 40 in file order, which
                                the long-context evaluations read (:data:`LONGDOCS_HELD_OUT`):
                                123 documents, ~9.9M tokens -- long rows of one text each
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
"""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import json
import lzma
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from linearize.data_dir import resolve_data_dir
from linearize.errors import LinearizeError

__all__ = ["SOURCES", "ALIASES", "Document", "Source", "format_alpaca", "format_conversation", "iter_documents",
           "iter_long_documents", "long_documents_path", "known_sources", "register_source", "resolve_source"]

_SHAKESPEARE_CHUNK_CHARS = 4_000


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
        d = None if self.user_file else resolve_data_dir(data_dir)
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


#: The long documents the evaluations read, the first ones in file order (per-position loss and reading: the starts of
#: the first 8-16 documents at least as long as the row; 16 rows of 32k tokens reach the 16th, of 64k the 33rd): the
#: training source ``longdocs`` leaves them out, and evaluation rows in file order stop at them
#: (:func:`linearize.models.layer_select.long_document_rows`).
LONGDOCS_HELD_OUT = 40


def _read_longdocs(d: Path) -> Iterator[Document]:
    for i, (doc_id, text) in enumerate(iter_long_documents(d)):
        if i >= LONGDOCS_HELD_OUT:
            yield Document(text, doc_id, None, "longdocs")


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
register_source(
    Source("longdocs", ("longdocs/longdocs.jsonl.xz",), _read_longdocs, "text",
           f"Long documents (books, FAQ sections; 15k-230k tokens) but the first {LONGDOCS_HELD_OUT}, held out for "
           "evaluation"),
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


def long_documents_path(data_dir: str | os.PathLike | None = None) -> Path:
    """The long documents' file, ``longdocs/longdocs.jsonl.xz`` of the data directory (an error when missing)."""
    path = resolve_data_dir(data_dir) / "longdocs" / "longdocs.jsonl.xz"
    if not path.is_file():
        raise LinearizeError(f"Long documents file not found: {path}")
    return path


def iter_long_documents(data_dir: str | os.PathLike | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(id, text)`` for the 163 long documents of ``longdocs/longdocs.jsonl.xz``
    (Project Gutenberg books ``pg-*`` and Anarchist FAQ sections ``afaq-*``, each > ~14k tokens)."""
    for _, row in _iter_jsonl(long_documents_path(data_dir)):
        yield str(row["id"]), str(row["text"])
