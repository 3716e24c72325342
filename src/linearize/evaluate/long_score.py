"""Scoring long-context items (:mod:`linearize.evaluate.long_tasks`) on one model variant, and the statistics.

Per item, always (one teacher-forced forward over prompt + gold continuation; vocabulary logits only at the
continuation's positions, so a 262k vocabulary after a 32k-token prompt costs nothing):

* ``bits``: ``-sum log2 p(gold token)`` over the continuation; ``bytes``: UTF-8 bytes of the continuation text
  (leading space included); bits per byte = bits / bytes.
* ``greedy_exact``: every continuation token is the argmax given the gold ones before it, i.e. greedy decoding
  would write the gold continuation. The retrieval tasks' accuracy (exact digits, in order).

A converted model whose sparse memory is chosen at the end of a prefill (``memory_select='query'``) has no such
memory in a full forward, so its items are scored as generation reads them: a cached prefill of the prompt (left
padding), then the gold continuation through that cache, one decode step per token.

With ``generate`` (reading comprehension and long QA): a greedy answer (stops at a blank line, an end-of-sequence
token or ``max_new_tokens``) scored by SQuAD's exact match and token F1 against every gold answer.

Statistics: :func:`bootstrap` (percentile interval of a mean over items) and :func:`paired` (mean difference of two
variants on the same items, resampling items).
"""

from __future__ import annotations

import collections
import math
import re
import string
import time
from typing import Any, Callable

import numpy as np
import torch

from linearize.evaluate.long_tasks import Item
from linearize.models.lm_head import final_logits_fn

__all__ = ["normalize_answer", "exact_match", "token_f1", "score_items", "greedy_answer", "bootstrap", "paired"]

LN2 = math.log(2)


# ----------------------------------------------------------------------------- answer matching (SQuAD v1.1)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: list[str]) -> float:
    def f1(pred: str, gold: str) -> float:
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if not p or not g:
            return float(p == g)
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(f1(prediction, a) for a in answers)


# ----------------------------------------------------------------------------- model passes


def _batches(items: list[Item], batch_tokens: int) -> list[list[int]]:
    """Indices of items grouped longest first, each group's padded size at most ``batch_tokens`` (at least one)."""
    order = sorted(range(len(items)), key=lambda i: -(len(items[i].context) + len(items[i].target)))
    groups, cur = [], []
    for i in order:
        size = len(items[i].context) + len(items[i].target)
        width = size if not cur else len(items[cur[0]].context) + len(items[cur[0]].target)
        if cur and width * (len(cur) + 1) > batch_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    return groups + ([cur] if cur else [])


@torch.no_grad()
def _teacher_forced(model, items: list[Item], idx: list[int], pad_id: int) -> list[dict[str, Any]]:
    rows = [items[i].context + items[i].target[:-1] for i in idx]  # the last gold token is predicted, not read
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):  # right padding: real tokens never see a pad, positions stay key indices
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    device = model.device
    hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    out = []
    for r, i in enumerate(idx):
        start = len(items[i].context) - 1
        out.append(_score(model, hidden[r, start:start + len(items[i].target)], items[i]))
    return out


def _selects_at_prefill(model) -> bool:
    """Whether a converted layer of `model` chooses its sparse memory at prefill (memory_select 'query')."""
    from linearize.models.convert import hybrid_modules

    return any(m.spec.selects_at_prefill for m in hybrid_modules(model))


@torch.no_grad()
def _prefilled(model, items: list[Item], idx: list[int], pad_id: int) -> list[dict[str, Any]]:
    """`_teacher_forced`'s scores read through a cached prefill of each prompt (left-padded to one length) and the
    gold continuation after it (right-padded), as `generate` reads them."""
    from transformers import DynamicCache

    from linearize.compat import cache_kwargs

    contexts, follow = [items[i].context for i in idx], [items[i].target[:-1] for i in idx]
    width, extra = max(map(len, contexts)), max(map(len, follow))
    ids = torch.full((len(idx), width + extra), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (ctx, cont) in enumerate(zip(contexts, follow)):
        ids[r, width - len(ctx):width] = torch.tensor(ctx)
        ids[r, width:width + len(cont)] = torch.tensor(cont, dtype=torch.long)
        mask[r, width - len(ctx):width + len(cont)] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    decoder, cache = model.get_decoder(), DynamicCache(config=model.config)
    hidden = [decoder(input_ids=ids[:, :width], attention_mask=mask[:, :width], use_cache=True,
                      **cache_kwargs(cache)).last_hidden_state[:, -1:]]
    if extra:
        hidden.append(decoder(input_ids=ids[:, width:], attention_mask=mask, use_cache=True,
                              **cache_kwargs(cache)).last_hidden_state)
    hidden = torch.cat(hidden, 1)
    return [_score(model, hidden[r, :len(items[i].target)], items[i]) for r, i in enumerate(idx)]


def _score(model, hidden: torch.Tensor, item: Item) -> dict[str, Any]:
    """bits, bytes and greedy_exact of `item` from the hidden states (L, hidden) that predict its L target tokens."""
    lp = final_logits_fn(model)(hidden).log_softmax(-1)
    gold = torch.tensor(item.target, device=lp.device)
    bits = -float(lp.gather(1, gold[:, None]).sum()) / LN2
    return {"bits": bits, "bytes": len(item.target_text.encode("utf-8")),
            "greedy_exact": float(bool((lp.argmax(-1) == gold).all()))}


@torch.no_grad()
def greedy_answer(model, tokenizer, context: list[int], *, max_new_tokens: int = 32) -> str:
    """Greedy continuation of one prompt with a cache, up to a blank line (exclusive) or an end-of-sequence token."""
    from linearize.models.loading import _eos_ids

    stop = set(_eos_ids(model, tokenizer))
    out = model(torch.tensor([context], device=model.device), use_cache=True, logits_to_keep=1)
    cache, new = out.past_key_values, []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        if token in stop:
            break
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if "\n\n" in text.lstrip("\n"):
            break
        out = model(torch.tensor([[token]], device=model.device), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    text = tokenizer.decode(new, skip_special_tokens=True).lstrip("\n")
    return text.split("\n\n")[0].strip()


def score_items(model, tokenizer, items: list[Item], *, generate: bool = False, max_new_tokens: int = 32,
                batch_tokens: int = 16384, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Scores of each item (see the module doc), in the order of ``items``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[dict[str, Any] | None] = [None] * len(items)
    t0, done = time.perf_counter(), 0
    forward = _prefilled if _selects_at_prefill(model) else _teacher_forced
    for group in _batches(items, batch_tokens):
        for i, s in zip(group, forward(model, items, group, pad)):
            scores[i] = s
        done += len(group)
        if progress and (done == len(items) or time.perf_counter() - t0 > 30):
            progress(f"[long]   {done}/{len(items)} scored ({time.perf_counter() - t0:.0f} s)")
            t0 = time.perf_counter() if done < len(items) else t0
    if generate:
        from linearize.evaluate.long_tasks import RETRIEVAL

        for i, it in enumerate(items):
            if it.task in RETRIEVAL:  # greedy_exact is already their greedy answer
                continue
            pred = greedy_answer(model, tokenizer, it.context, max_new_tokens=max_new_tokens)
            scores[i].update(prediction=pred, exact_match=exact_match(pred, it.answers), f1=token_f1(pred, it.answers))
    return scores  # type: ignore[return-value]


# ----------------------------------------------------------------------------- statistics


def _resample(n: int, reps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(reps, n))


def bootstrap(values, *, reps: int = 1000, seed: int = 0, weights=None) -> dict[str, Any]:
    """Mean of ``values`` with a 95% percentile bootstrap interval over items. With ``weights`` the statistic is
    ``sum(values) / sum(weights)`` (bits per byte: values = bits, weights = bytes)."""
    v = np.asarray(values, dtype=float)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=float)
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(v.sum() / w.sum())
    if v.size == 1 or reps <= 0:
        return {"mean": mean, "ci95": None, "n": int(v.size)}
    idx = _resample(v.size, reps, seed)
    stats = v[idx].sum(1) / w[idx].sum(1)
    return {"mean": mean, "ci95": [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))], "n": int(v.size)}


def paired(a, b, *, reps: int = 1000, seed: int = 0, weights=None) -> dict[str, Any]:
    """``a - b`` on the same items (ratio statistic when ``weights``): the difference of the two means and its 95%
    interval from resampling items (the same resample for both)."""
    va, vb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    w = np.ones_like(va) if weights is None else np.asarray(weights, dtype=float)
    if va.shape != vb.shape or va.size == 0:
        return {"diff": None, "ci95": None, "n": 0}
    diff = float((va.sum() - vb.sum()) / w.sum())
    if va.size == 1 or reps <= 0:
        return {"diff": diff, "ci95": None, "n": int(va.size)}
    idx = _resample(va.size, reps, seed)
    stats = (va[idx].sum(1) - vb[idx].sum(1)) / w[idx].sum(1)
    return {"diff": diff, "ci95": [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))], "n": int(va.size)}
