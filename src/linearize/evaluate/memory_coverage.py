"""What a query-chosen memory keeps of the passage a long-context prompt asks about.

The long-QA and retrieval items (`long_tasks`) carry where their gold passage or needle sits (`meta['needle_starts']`,
`meta['needle_lengths']`). Scored through a cached prefill (`long_score.score_items`), each converted layer chooses its
memory once (`attention.memory.select_by_query`); `memory_coverage` records every choice and reports, per item, its
score and how much of that span the layers' memories hold:

- ``kept``: the share of the span's tokens a KV head's memory keeps, averaged over the KV heads, per layer;
- ``exact``: the same counting also what the prompt's last tokens read exactly without the memory (the window of the
  re-read tokens and the softmax sinks: positions the selection does not choose among);
- ``answer_exact``: ``exact`` over the tokens of the gold answer where the passage holds them (its first occurrence,
  found as a token sequence; None where the tokenizer splits it otherwise there).

So a long-QA loss can be told apart: a passage the memory holds and the model still misreads, or one it never kept.
"""

from __future__ import annotations

import contextlib
from statistics import mean
from typing import Any

import torch

from linearize.attention.memory import observing_selection, preferring_keys
from linearize.errors import LinearizeError
from linearize.evaluate.long_score import score_items
from linearize.evaluate.long_tasks import Item


def span_coverage(chosen: torch.Tensor, candidate: torch.Tensor, start: int, length: int) -> tuple[float, float]:
    """(kept, exact) of one layer's selection over the span [start, start + length) of a one-row prefill: chosen
    (Hkv, T), candidate (T,)."""
    span = slice(start, start + length)
    kept = chosen[:, span].float().mean(-1)
    exact = (chosen[:, span] | ~candidate[None, span]).float().mean(-1)
    return kept.mean().item(), exact.mean().item()


def answer_span(tokenizer, item: Item, start: int, length: int) -> tuple[int, int] | None:
    """(start, length) of the first of the item's answers found as a token sequence inside [start, start + length)."""
    passage = item.context[start:start + length]
    for answer in item.answers:
        for text in (" " + answer, answer):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for i in range(len(passage) - len(ids) + 1):
                if ids and passage[i:i + len(ids)] == ids:
                    return start + i, len(ids)
    return None


def memory_coverage(model, tokenizer, items: list[Item], *, gold_first: bool = False,
                    progress=None) -> list[dict[str, Any]]:
    """Per item: its score (bits, bytes, greedy_exact, bpb) and the `kept` / `exact` share of its gold span per converted
    layer (lists in layer order) with their means. `model` chooses its memory at prefill (memory_select 'query'); each
    item is scored alone (a batch of one, so prompt positions are the context's). ``gold_first``: every layer's memory
    takes the gold span's keys before any other (`attention.memory.preferring_keys`; the rest by the rule), an oracle
    choice of the same size -- does the model read the passage when the memory surely holds it?"""
    rows = []
    for n, item in enumerate(items):
        if not item.meta.get("needle_starts"):
            raise LinearizeError(f"{item.qid}: no gold span to cover (long-QA and retrieval items have one)")
        start, length = item.meta["needle_starts"][0], item.meta["needle_lengths"][0]
        gold = torch.zeros(len(item.context), dtype=torch.bool)
        gold[start:start + length] = True
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(observing_selection(
                lambda chosen, candidate, spec: seen.append((chosen[0].cpu(), candidate[0].cpu()))))
            if gold_first:
                stack.enter_context(preferring_keys(gold))
            (score,) = score_items(model, tokenizer, [item], batch_tokens=len(item.context) + len(item.target))
        if not seen:
            raise LinearizeError("the model chose no memory at prefill: memory_coverage needs memory_select 'query'")
        per_layer = [span_coverage(chosen, candidate, start, length) for chosen, candidate in seen]
        kept, exact = [k for k, _ in per_layer], [e for _, e in per_layer]
        answer = answer_span(tokenizer, item, start, length)
        answer_exact = None if answer is None else [span_coverage(c, cand, *answer)[1] for c, cand in seen]
        rows.append({"id": item.qid, "task": item.task, "length": item.length, "depth": item.depth, **score,
                     "bpb": score["bits"] / score["bytes"], "span": [start, length], "kept": kept, "exact": exact,
                     "kept_mean": mean(kept), "exact_mean": mean(exact), "exact_min": min(exact),
                     "answer_span": None if answer is None else list(answer), "answer_exact": answer_exact,
                     "answer_exact_mean": None if answer is None else mean(answer_exact)})
        if progress:
            progress(f"[coverage] {n + 1}/{len(items)} {item.qid}: bpb {rows[-1]['bpb']:.3f}, "
                     f"kept {rows[-1]['kept_mean']:.2f}, exact {rows[-1]['exact_mean']:.2f}")
    return rows


def coverage_markdown(record: dict[str, Any]) -> str:
    """Tables of a coverage record ({"meta", "settings", "rules": {rule: rows}}): per item side by side, then the
    means per (length, depth)."""
    rules = list(record["rules"])
    meta = record.get("meta", {})
    lines = [f"# What the query memory keeps of the gold passage: {meta.get('model', '')}", "",
             f"`{meta.get('command', '')}` · commit {meta.get('commit', '?')} · {meta.get('gpu') or meta.get('device', '')}",
             *(["", "**Oracle choice**: every layer's memory took the gold passage's keys first (`--gold-first`)."]
               if record.get("settings", {}).get("gold_first") else []),
             "", "kept: share of the passage's tokens the memory keeps (mean over KV heads and layers); exact: kept or "
             "read by the window / sinks at the end of the prompt; min: the layer with the least exact; answer: exact over "
             "the gold answer's tokens in the passage (- where not found as a token sequence).", ""]
    head = "| item | length | depth | " + " | ".join(f"{r} bpb | {r} kept | {r} exact | {r} min | {r} answer"
                                                     for r in rules) + " |"
    lines += [head, "|" + "---|" * (3 + 5 * len(rules))]
    first = record["rules"][rules[0]]
    for i, row in enumerate(first):
        cells = [row["id"], str(row["length"]), str(row["depth"])]
        for r in rules:
            x = record["rules"][r][i]
            answer = "-" if x.get("answer_exact_mean") is None else f"{x['answer_exact_mean']:.2f}"
            cells += [f"{x['bpb']:.3f}", f"{x['kept_mean']:.2f}", f"{x['exact_mean']:.2f}", f"{x['exact_min']:.2f}", answer]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| length | depth | " + " | ".join(f"{r} bpb | {r} exact" for r in rules) + " |",
              "|" + "---|" * (2 + 2 * len(rules))]
    for cell in sorted({(row["length"], row["depth"]) for row in first}):
        cells = [str(cell[0]), str(cell[1])]
        for r in rules:
            xs = [x for x in record["rules"][r] if (x["length"], x["depth"]) == cell]
            cells += [f"{mean(x['bpb'] for x in xs):.3f}", f"{mean(x['exact_mean'] for x in xs):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
