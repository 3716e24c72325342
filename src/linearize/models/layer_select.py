"""Which layers to convert, chosen by measurement: ``hybrid.layers='measured:K'``.

Each candidate layer (a full-attention layer of the base: a layer with its own sliding window already has constant
memory) is cut alone to what a conversion starts from, the training-free window + sinks of
:mod:`linearize.models.window_sinks`, and the mean next-token loss of a few long rows is measured: one forward pass
of the rows per layer, plus one for the base. A layer whose cut raises the loss the most depends most on keys a
window cannot see; 'measured:K' keeps the K highest as full softmax and converts the others.

The record (:func:`select_layers`) is plain JSON: per-layer loss and increase (nats/token), the base loss, the
ranking, the rows used (document ids, sha256 of the token ids), the settings, the loss with every candidate cut at
once; with ``keep`` also the kept and converted layers and the loss of cutting every converted layer at once (the
cuts need not add up).
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from linearize.config import MEASURED
from linearize.documents import LONGDOCS_HELD_OUT, iter_long_documents
from linearize.errors import LinearizeError
from linearize.models.convert import text_config
from linearize.models.lm_head import chunk_loss_sum, final_softcap
from linearize.models.window_sinks import target_layers, window_sinks
from linearize.records import markdown_table, save_figure

__all__ = ["candidate_layers", "check_keep", "long_document_rows", "mean_next_token_loss", "measure_layers",
           "cut_loss", "choose_layers", "select_layers", "layers_setting", "selection_markdown", "plot_selection", "RECORD_KIND"]

#: The record's name: ``layer_selection.json`` in a run directory or the command's --out.
RECORD_KIND = "layer_selection"


def candidate_layers(model: nn.Module) -> list[int]:
    """The layers a measurement may keep or convert: the base's full-attention layers (those 'global' names)."""
    return target_layers(model, "global")


def check_keep(model: nn.Module, keep: int) -> list[int]:
    """The candidate layers, after checking that keeping `keep` of them leaves at least one to convert."""
    config = text_config(model)
    candidates = candidate_layers(model)
    if not candidates:
        raise LinearizeError(f"{MEASURED}:{keep}: this {config.model_type} model has no full-attention layer to "
                             f"measure (every layer has its own sliding window); name the layers to convert instead")
    if not 0 <= keep < len(candidates):
        raise LinearizeError(f"{MEASURED}:{keep}: K out of range; this model has {len(candidates)} full-attention "
                             f"layers {candidates}, so K (kept as full softmax) must be 0 to {len(candidates) - 1}")
    return candidates


def long_document_rows(tokenizer, *, num_rows: int, seq_len: int, seed: int | None = 0, data_dir=None,
                       texts: dict[str, str] | list[str] | None = None) -> tuple[torch.Tensor, list[str]]:
    """``(num_rows, seq_len)`` token ids, each the start of one long document (BOS first when the tokenizer has
    one), and the ids of those documents. `seed` draws the documents (None: the first ones in file order, for
    evaluation: only among the first LONGDOCS_HELD_OUT, which the training source 'longdocs' leaves out); documents
    shorter than `seq_len` tokens are passed over. `texts` ({id: text}, or a list: ids 'text-<i>')
    replaces the long documents."""
    if texts is not None and not isinstance(texts, dict):
        texts = {f"text-{i}": t for i, t in enumerate(texts)}
    if num_rows < 1 or seq_len < 2:
        raise LinearizeError(f"long-document rows: need at least 1 row of at least 2 tokens (got {num_rows} x {seq_len})")
    chars = seq_len * 8  # enough text for seq_len tokens at any ordinary tokenizer's rate; the rest is not tokenised
    docs = iter(texts.items()) if texts is not None else ((i, t[:chars]) for i, t in iter_long_documents(data_dir))
    if seed is not None:  # reads every document; in file order only as many as needed are read
        docs = list(docs)
        random.Random(seed).shuffle(docs)
    bos = tokenizer.bos_token_id
    rows, ids, seen = [], [], 0
    for doc_id, text in docs:
        if seed is None and texts is None and seen == LONGDOCS_HELD_OUT:  # evaluation rows: held-out documents only
            raise LinearizeError(f"only {len(rows)} of the first {LONGDOCS_HELD_OUT} long documents (held out of the "
                                 f"training source 'longdocs') have {seq_len} tokens; {num_rows} rows asked")
        seen += 1
        tokens = ([bos] if bos is not None else []) + tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(tokens) >= seq_len:
            rows.append(tokens[:seq_len])
            ids.append(str(doc_id))
            if len(rows) == num_rows:
                return torch.tensor(rows, dtype=torch.long), ids
    raise LinearizeError(f"only {len(rows)} of {seen} long documents have {seq_len} tokens; {num_rows} rows asked")


@torch.no_grad()
def mean_next_token_loss(model: nn.Module, rows: torch.Tensor, *, batch_size: int = 4, loss_chunk: int = 1024) -> float:
    """Mean next-token cross-entropy (nats/token) of `rows` (no padding), `batch_size` rows per forward pass; the
    vocabulary logits exist `loss_chunk` positions at a time."""
    head, softcap = model.get_output_embeddings(), final_softcap(model)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, rows.shape[0], batch_size):
        ids = rows[b:b + batch_size].to(device)
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        hidden, targets = hidden.reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)
        for s in range(0, targets.numel(), loss_chunk):
            total += chunk_loss_sum(head, softcap, hidden[s:s + loss_chunk], targets[s:s + loss_chunk]).item()
        count += targets.numel()
    return total / count


def cut_loss(model: nn.Module, rows: torch.Tensor, layers: list[int], *, window: int, sinks: int,
             batch_size: int = 4, loss_chunk: int = 1024, chunk: int = 2048) -> float:
    """:func:`mean_next_token_loss` in eval mode with `layers` cut to window + sinks (none: the base)."""
    was_training = model.training
    model.eval()
    try:
        with window_sinks(model, window, sinks, layers=list(layers), chunk=chunk):
            return mean_next_token_loss(model, rows, batch_size=batch_size, loss_chunk=loss_chunk)
    finally:
        model.train(was_training)


def measure_layers(model: nn.Module, rows: torch.Tensor, *, window: int, sinks: int, layers: list[int] | None = None,
                   batch_size: int = 4, loss_chunk: int = 1024, chunk: int = 2048) -> dict[str, Any]:
    """The base's mean loss on `rows` and, for each of `layers` (default: :func:`candidate_layers`), the loss with
    only that layer cut to the last `window` keys plus the first `sinks`; ``ranking``: the layers by loss increase,
    largest first (ties: lower index first). `chunk`: query rows per block of the cut attention."""
    candidates = candidate_layers(model)
    layers = candidates if layers is None else sorted(int(i) for i in layers)
    outside = sorted(set(layers) - set(candidates))
    if outside:
        raise LinearizeError(f"layers {outside} are not full-attention layers of this model (those are {candidates})")
    if rows.dim() != 2 or rows.shape[1] <= window + sinks:
        raise LinearizeError(f"rows of {rows.shape[-1]} tokens fit in window {window} + sinks {sinks}: no cut "
                             f"would change them; use longer rows or a smaller window")
    t0 = time.perf_counter()
    base = cut_loss(model, rows, [], window=window, sinks=sinks, batch_size=batch_size, loss_chunk=loss_chunk)
    per_layer = []
    for i in layers:
        loss = cut_loss(model, rows, [i], window=window, sinks=sinks, batch_size=batch_size, loss_chunk=loss_chunk,
                        chunk=chunk)
        per_layer.append({"layer": i, "loss": loss, "delta": loss - base})
    ranking = [e["layer"] for e in sorted(per_layer, key=lambda e: (-e["delta"], e["layer"]))]
    return {"window": window, "sinks": sinks, "candidates": candidates, "base_loss": base, "layers": per_layer,
            "ranking": ranking, "seconds": time.perf_counter() - t0}


def choose_layers(measured: dict[str, Any], keep: int) -> tuple[list[int], list[int]]:
    """(kept, converted) of a :func:`measure_layers` result: the `keep` most sensitive layers kept as full softmax,
    every other measured layer converted; both sorted."""
    ranking = measured["ranking"]
    if not 0 <= keep < len(ranking):
        raise LinearizeError(f"keep={keep} out of range for {len(ranking)} measured layers (0 to {len(ranking) - 1})")
    return sorted(ranking[:keep]), sorted(ranking[keep:])


def select_layers(model: nn.Module, tokenizer, keep: int | None = None, *, window: int, sinks: int,
                  num_rows: int = 4, seq_len: int = 2048, seed: int | None = 0, data_dir=None,
                  texts: dict[str, str] | list[str] | None = None, batch_size: int = 4, loss_chunk: int = 1024,
                  chunk: int = 2048) -> dict[str, Any]:
    """Measure every candidate layer of a base model on `num_rows` long-document rows of `seq_len` tokens (see
    :func:`long_document_rows`) and, with `keep`, choose the layers to keep and to convert. The JSON record of
    the module doc; ``record["convert"]`` is what ``hybrid.layers='measured:K'`` resolves to."""
    if keep is not None:
        check_keep(model, keep)
    elif not candidate_layers(model):
        raise LinearizeError(f"this {text_config(model).model_type} model has no full-attention layer to measure")
    if window < 1 or sinks < 0:
        raise LinearizeError(f"layer selection: need window >= 1 and sinks >= 0 (got {window}, {sinks})")
    if seq_len <= window + sinks:
        raise LinearizeError(f"layer selection: seq_len {seq_len} must exceed window {window} + sinks {sinks}, or no "
                             f"cut changes anything")
    rows, documents = long_document_rows(tokenizer, num_rows=num_rows, seq_len=seq_len, seed=seed, data_dir=data_dir,
                                         texts=texts)
    measured = measure_layers(model, rows, window=window, sinks=sinks, batch_size=batch_size, loss_chunk=loss_chunk,
                              chunk=chunk)
    record = {
        **measured,
        "rows": {"count": num_rows, "seq_len": seq_len, "seed": seed, "documents": documents,
                 "sha256": hashlib.sha256(rows.numpy().tobytes()).hexdigest()},
        "settings": {"batch_size": batch_size, "loss_chunk": loss_chunk, "chunk": chunk, "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
        "keep": keep,
    }
    every = cut_loss(model, rows, measured["candidates"], window=window, sinks=sinks, batch_size=batch_size,
                     loss_chunk=loss_chunk, chunk=chunk)  # what converting all of them starts from
    record.update(all_cut_loss=every, all_cut_delta=every - measured["base_loss"])
    if keep is not None:
        kept, converted = choose_layers(measured, keep)
        together = every if converted == measured["candidates"] else cut_loss(
            model, rows, converted, window=window, sinks=sinks, batch_size=batch_size, loss_chunk=loss_chunk,
            chunk=chunk)
        record.update(kept=kept, convert=converted, spec=f"{MEASURED}:{keep}", converted_cut_loss=together,
                      converted_cut_delta=together - measured["base_loss"])
    return record


def layers_setting(layers: list[int]) -> str:
    """A layer list as one shell word for ``--set hybrid.layers=...``: ``[1,2,5]``."""
    return "[" + ",".join(str(i) for i in layers) + "]"


def selection_markdown(record: dict[str, Any], title: str = "Layer selection") -> str:
    """The record as Markdown: its settings, then one row per layer, most sensitive first."""
    base = record["base_loss"]
    by_layer = {e["layer"]: e for e in record["layers"]}
    kept = set(record.get("kept") or [])
    rows = [[rank + 1, i, f"{by_layer[i]['loss']:.4f}", f"{by_layer[i]['delta']:+.4f}",
             f"{100 * by_layer[i]['delta'] / base:+.2f}", "keep" if i in kept else ("convert" if record.get("keep")
                                                                                     is not None else "")]
            for rank, i in enumerate(record["ranking"])]
    r = record["rows"]
    lines = [f"# {title}", "",
             f"Each full-attention layer cut alone to the last {record['window']} keys + the first {record['sinks']} "
             f"(training-free window + sinks); mean next-token loss over {r['count']} long-document rows of "
             f"{r['seq_len']} tokens (seed {r['seed']}). Base loss {base:.4f} nats/token; every one of these layers "
             f"cut at once: {record['all_cut_loss']:.4f} ({record['all_cut_delta']:+.4f}).", ""]
    if record.get("keep") is not None:
        lines += [f"`{record['spec']}`: keep {record['kept']} as full softmax, convert {record['convert']}. Cutting "
                  f"every converted layer at once: {record['converted_cut_loss']:.4f} nats/token "
                  f"({record['converted_cut_delta']:+.4f}).", "",
                  f"Use: `--set hybrid.layers={layers_setting(record['convert'])}`", ""]
    lines.append(markdown_table(["rank", "layer", "loss", "Δ nats/token", "Δ %", "choice"], rows))
    return "\n".join(lines)


def plot_selection(record: dict[str, Any], path) -> Path:
    """Bar plot of each layer's loss increase; kept layers in another colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = set(record.get("kept") or [])
    layers = [e["layer"] for e in record["layers"]]
    deltas = [e["delta"] for e in record["layers"]]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * len(layers) + 2), 3.6))
    ax.bar([str(i) for i in layers], deltas, color=["tab:red" if i in kept else "tab:blue" for i in layers])
    ax.set_xlabel("layer" + (" (red: kept as full softmax)" if kept else ""))
    ax.set_ylabel("loss increase (nats/token)")
    ax.set_title(f"layer cut alone to window {record['window']} + sinks {record['sinks']}; base loss "
                 f"{record['base_loss']:.3f}", fontsize=9)
    return save_figure(fig, path)
