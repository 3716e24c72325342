"""Long-context items: the prompts of `linearize diagnose --what long`, as token ids.

Every item is a prompt (``context`` ids, BOS first) and a gold continuation (``target`` ids, ``target_text``), with
the strings a greedy answer is compared with (``answers``). Item ids (``qid``) are the same for every model given the
tokenizer, the seed and the parameters: that is what makes comparisons between models paired.

Tasks
    ``squad``, ``coqa``, ``drop``: the rows of ``../shared/data/<task>/validation.jsonl`` as OLMES renders them
        (0.7-2k tokens; gold continuation with its leading space).
    ``passkey``: repetitive filler ("The grass is green. ...") with one pass-key sentence; answer: the 5-digit key.
    ``niah_single``, ``niah_multikey``, ``niah_multivalue`` (RULER-style needle in a haystack): sentences of the long
        documents with needles "One of the special magic numbers for <key> is: <7 digits>." Single: one needle.
        Multi-key: the asked needle plus 3 with other keys (distractors). Multi-value: 4 needles of the asked key; the
        answer lists them in the order they appear ("a, b, c, d").
    ``qa_squad``, ``qa_drop`` (RULER-style long QA): the question's own passage hidden among passages of other
        questions, 0-shot.

Placement
    A synthetic prompt is ``prefix + haystack-with-needles + question``, exactly ``length`` tokens. The haystack is
    built from whole sentences (passages for long QA), each tokenized on its own, so a needle goes in between two of
    them without changing any token around it: at the boundary nearest ``depth`` (0 = first, 1 = last) of the
    haystack. Other needles of an item go at depths drawn from the item's own random generator. Everything random
    comes from ``random.Random(f"{seed}-{task}-{length}-{depth}-{i}")``.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from linearize.documents import iter_long_documents
from linearize.errors import LinearizeError

__all__ = ["Item", "READING", "RETRIEVAL", "LONG_QA", "TASKS", "reading_items", "retrieval_item", "long_qa_item",
           "Haystack", "place_needles", "build_items"]

READING = ("squad", "coqa", "drop")
RETRIEVAL = ("passkey", "niah_single", "niah_multikey", "niah_multivalue")
LONG_QA = ("qa_squad", "qa_drop")
TASKS = READING + RETRIEVAL + LONG_QA

NIAH_PREFIX = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.\n")
NEEDLE = " One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
                 "The special magic number for {key} mentioned in the provided text is")
NIAH_QUESTION_ALL = ("\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                     "The special magic numbers for {key} mentioned in the provided text are")
PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the important information there.\n")
QA_PREFIX = ("Answer the question based on the given documents. Only give me the answer and do not output any "
             "other words.\n\nThe following are given documents.\n\n")
ADJECTIVES = ("amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "kind",
              "lively", "misty", "noble", "odd", "proud", "quiet", "rusty", "silent", "tidy")
NOUNS = ("anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel")
NUM_DISTRACTOR_KEYS = 3
NUM_VALUES = 4


@dataclass
class Item:
    task: str
    qid: str
    context: list[int]
    target: list[int]
    target_text: str
    answers: list[str]
    length: int | None = None  # requested prompt length (synthetic tasks)
    depth: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _rows(data_dir, task: str, limit: int | None) -> list[dict[str, Any]]:
    if data_dir is None:
        from linearize.evaluate.harness import default_data_dir

        data_dir = default_data_dir()
    path = Path(data_dir) / task / "validation.jsonl"
    if not path.is_file():
        raise LinearizeError(f"{task}: {path} not found (see ../shared/data/{task}/SOURCE.md)")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


# ----------------------------------------------------------------------------- reading comprehension


def reading_items(tokenizer, task: str, data_dir, limit: int | None) -> list[Item]:
    """The first ``limit`` rows of a reading-comprehension task, prompts exactly as in the file."""
    out = []
    for row in _rows(data_dir, task, limit):
        cont = row["continuation"]
        out.append(Item(task, str(row["id"]), _bos(tokenizer) + _enc(tokenizer, row["context"]), _enc(tokenizer, cont),
                        cont, list(row["answers"])))
    return out


# ----------------------------------------------------------------------------- haystacks and needles


class Haystack:
    """Sentences as token ids, drawn from the long documents (or a filler text), tokenized on demand.

    ``texts``: documents to use instead of ``longdocs`` (tests).
    """

    def __init__(self, tokenizer, *, data_dir=None, texts: list[str] | None = None):
        self.tokenizer = tokenizer
        self._texts = texts
        self._data_dir = data_dir
        self._sentences: dict[int, list[str]] = {}

    @property
    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = list(_long_documents(str(self._data_dir) if self._data_dir else None))
        return self._texts

    def _split(self, doc: int) -> list[str]:
        if doc not in self._sentences:
            text = " ".join(self.texts[doc].split())  # one space between words: no line breaks inside the haystack
            self._sentences[doc] = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
        return self._sentences[doc]

    def take(self, n_tokens: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """At least ``n_tokens`` ids of consecutive sentences from a random document and place (continuing in the
        next document when one runs out), cut to ``n_tokens``; and the sentence boundaries (0 and the end included)."""
        doc = rng.randrange(len(self.texts))
        start = rng.randrange(max(1, len(self._split(doc)) // 2))
        ids, bounds = [], [0]
        while len(ids) < n_tokens:
            sents = self._split(doc)[start:start + 256]
            if not sents:
                doc, start = (doc + 1) % len(self.texts), 0
                continue
            for piece in self.tokenizer([" " + s for s in sents], add_special_tokens=False)["input_ids"]:
                ids += piece
                bounds.append(len(ids))
                if len(ids) >= n_tokens:
                    break
            start += len(sents)
        return ids[:n_tokens], [b for b in bounds if b < n_tokens] + [n_tokens]


class Filler(Haystack):
    """The passkey haystack: the probes' filler sentences repeated."""

    def __init__(self, tokenizer):
        from linearize.evaluate.probes import FILLER

        super().__init__(tokenizer, texts=[FILLER.strip()])

    def take(self, n_tokens: int, rng: random.Random) -> tuple[list[int], list[int]]:
        pieces = self.tokenizer([" " + s for s in self._split(0)], add_special_tokens=False)["input_ids"]
        ids, bounds = [], [0]
        while len(ids) < n_tokens:
            for piece in pieces:
                ids += piece
                bounds.append(len(ids))
        return ids[:n_tokens], [b for b in bounds if b < n_tokens] + [n_tokens]


@functools.lru_cache(maxsize=2)
def _long_documents(data_dir: str | None) -> tuple[str, ...]:
    return tuple(text for _, text in iter_long_documents(data_dir))


def place_needles(hay: list[int], bounds: list[int], needles: list[list[int]], depths: list[float]) -> tuple[list[int], list[int]]:
    """Insert each needle at the sentence boundary nearest its depth of ``hay``; returns the ids and each needle's
    start in them (needles in the order given)."""
    at = []
    for needle, depth in zip(needles, depths):
        if not 0.0 <= depth <= 1.0:
            raise LinearizeError(f"needle depth {depth} is not in [0, 1]")
        at.append(min(bounds, key=lambda b: (abs(b - depth * len(hay)), b)))
    order = sorted(range(len(needles)), key=lambda i: (at[i], i))
    ids, starts, prev = [], [0] * len(needles), 0
    for i in order:
        ids += hay[prev:at[i]]
        prev = at[i]
        starts[i] = len(ids)
        ids += needles[i]
    return ids + hay[prev:], starts


def _random_key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _random_number(rng: random.Random, digits: int, taken: set[str]) -> str:
    while True:
        value = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        if value not in taken:
            taken.add(value)
            return value


def retrieval_item(tokenizer, task: str, length: int, depth: float, index: int, *, seed: int,
                   haystack: Haystack) -> Item:
    """One passkey / needle-in-a-haystack prompt of exactly ``length`` tokens (see the module doc)."""
    rng = random.Random(f"{seed}-{task}-{length}-{depth}-{index}")
    taken_keys: set[str] = set()
    taken_values: set[str] = set()
    if task == "passkey":
        from linearize.evaluate.probes import KEY_SENTENCE, QUESTION

        value = _random_number(rng, 5, taken_values)
        prefix = _enc(tokenizer, PASSKEY_PREFIX.strip())
        needles = [_enc(tokenizer, " " + KEY_SENTENCE.format(key=value).strip())]
        depths, values = [depth], [value]
        question = _enc(tokenizer, " " + QUESTION)
    else:
        key = _random_key(rng, taken_keys)
        prefix = _enc(tokenizer, NIAH_PREFIX)
        n_values = NUM_VALUES if task == "niah_multivalue" else 1
        values = [_random_number(rng, 7, taken_values) for _ in range(n_values)]
        needles = [_enc(tokenizer, NEEDLE.format(key=key, value=v)) for v in values]
        depths = [depth] + [rng.random() for _ in values[1:]]
        if task == "niah_multikey":
            for _ in range(NUM_DISTRACTOR_KEYS):
                needles.append(_enc(tokenizer, NEEDLE.format(key=_random_key(rng, taken_keys),
                                                             value=_random_number(rng, 7, taken_values))))
                depths.append(rng.random())
        elif task not in ("niah_single", "niah_multivalue"):
            raise LinearizeError(f"unknown retrieval task {task!r}; expected one of {RETRIEVAL}")
        question = _enc(tokenizer, (NIAH_QUESTION_ALL if n_values > 1 else NIAH_QUESTION).format(key=key))
    head = _bos(tokenizer) + prefix
    budget = length - len(head) - sum(map(len, needles)) - len(question)
    if budget < 1:
        raise LinearizeError(f"{task}: length {length} is too short for the prompt's fixed parts")
    hay, bounds = haystack.take(budget, rng)
    body, starts = place_needles(hay, bounds, needles, depths)
    # the answer lists the asked values in the order they appear in the prompt
    shown = [v for _, v in sorted(zip(starts[:len(values)], values))]
    answer = ", ".join(shown)
    return Item(task, f"{task}-{length}-{depth}-{index}", head + body + question, _enc(tokenizer, " " + answer),
                " " + answer, [answer], length=length, depth=depth,
                meta={"needle_starts": [len(head) + s for s in starts], "needle_lengths": list(map(len, needles)),
                      "haystack_tokens": budget, "prefix_tokens": len(head)})


# ----------------------------------------------------------------------------- long QA


_SQUAD_BLOCK = re.compile(r"Background: (?P<passage>.*)\nQuestion: (?P<question>.*)\nAnswer:\s*$", re.S)


def _qa_rows(data_dir, source: str) -> list[dict[str, str]]:
    """``{"id", "passage", "question", "continuation", "answers"}`` of every row of squad or drop."""
    out = []
    for row in _rows(data_dir, source, None):
        if source == "drop":
            passage, question = row["passage"], row["question"]
        else:  # squad keeps only the rendered prompt: its last block is the question's own passage
            m = _SQUAD_BLOCK.search(row["context"].rsplit("\n\n", 1)[-1])
            if m is None:
                continue
            passage, question = m["passage"], m["question"]
        out.append({"id": str(row["id"]), "passage": passage.strip(), "question": question.strip(),
                    "continuation": row["continuation"], "answers": list(row["answers"])})
    return out


def long_qa_item(tokenizer, source: str, rows: list[dict[str, str]], index: int, length: int, depth: float, *,
                 seed: int) -> Item:
    """Question ``index`` of ``rows`` with its passage among others' passages, exactly ``length`` tokens."""
    rng = random.Random(f"{seed}-qa_{source}-{length}-{depth}-{index}")
    row = rows[index]
    block = lambda p: _enc(tokenizer, f"Passage: {p}\n\n")  # noqa: E731
    head = _bos(tokenizer) + _enc(tokenizer, QA_PREFIX)
    question = _enc(tokenizer, f"Question: {row['question']}\nAnswer:")
    gold = block(row["passage"])
    budget = length - len(head) - len(gold) - len(question)
    if budget < 1:
        raise LinearizeError(f"qa_{source}: length {length} cannot hold question {row['id']}'s own passage")
    hay, bounds = [], [0]
    others = [i for i in range(len(rows)) if rows[i]["passage"] != row["passage"]]
    while len(hay) < budget:
        hay += block(rows[rng.choice(others)]["passage"])
        bounds.append(len(hay))
    hay = hay[:budget]  # the last distractor is cut to fill the length exactly
    body, starts = place_needles(hay, [b for b in bounds if b < budget] + [budget], [gold], [depth])
    return Item(f"qa_{source}", f"qa_{source}-{row['id']}-{length}-{depth}", head + body + question,
                _enc(tokenizer, row["continuation"]), row["continuation"], row["answers"], length=length, depth=depth,
                meta={"needle_starts": [len(head) + starts[0]], "needle_lengths": [len(gold)]})


# ----------------------------------------------------------------------------- all items


def build_items(tokenizer, tasks, *, limit: int, lengths, qa_lengths, depths, seed: int, data_dir,
                cell_limit: int | None = None, haystack: Haystack | None = None, progress=None) -> list[Item]:
    """The items of ``tasks``: ``limit`` questions per reading task, ``cell_limit`` (default ``limit``) per
    (length, depth) cell of the others."""
    cell = limit if cell_limit is None else cell_limit
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise LinearizeError(f"unknown long-context tasks {sorted(unknown)}; choose from {TASKS}")
    items: list[Item] = []
    hay = haystack or Haystack(tokenizer, data_dir=data_dir)
    filler = Filler(tokenizer)
    for task in tasks:
        if task in READING:
            items += reading_items(tokenizer, task, data_dir, limit)
        elif task in RETRIEVAL:
            items += [retrieval_item(tokenizer, task, n, d, i, seed=seed, haystack=filler if task == "passkey" else hay)
                      for n in lengths for d in depths for i in range(cell)]
        else:
            source = task.removeprefix("qa_")
            rows = _qa_rows(data_dir, source)
            if len(rows) < 2:
                raise LinearizeError(f"{task}: too few questions in {source}")
            # the same questions at every length and depth: cells differ only in where the passage sits
            items += [long_qa_item(tokenizer, source, rows, i, n, d, seed=seed)
                      for n in qa_lengths for d in depths for i in range(min(cell, len(rows)))]
        if progress:
            progress(f"[long] built {task}: {sum(it.task == task for it in items)} prompts")
    return items
