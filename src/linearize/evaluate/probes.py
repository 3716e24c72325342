"""Long-context probes: where the window cannot see, only linear attention can help.

Per-position loss
    Next-token loss at every position of long documents (``longdocs``: books and long FAQ sections,
    each > 14k tokens), averaged over documents, for several variants of a model (the base model,
    the converted ``hybrid``, ``swa_only`` ...). Past the window, ``swa_only`` has lost all older
    context; a hybrid whose LA works should stay below it there. The curves are written binned
    (``bin`` positions per point) with the window marked. Logits are computed in slices of
    ``logit_chunk`` positions, so a 256k vocabulary at 4k+ positions stays in memory.

Passkey retrieval
    A prompt of filler text ("The grass is green. The sky is blue. ...") with one sentence
    ``"The pass key is 48213. Remember it. 48213 is the pass key."`` placed at a random depth such
    that the whole sentence lies *more than a window* before the end of the prompt, which ends with
    ``"What is the pass key? The pass key is"``. Scoring: log-likelihood ranking. The true key and
    ``num_distractors`` random keys of the same number of digits are each scored by the summed
    log-probability of ``" <key>"`` after the prompt; a trial is a success when the true key scores
    higher than every distractor by more than ``tie_tol`` nats (ties count as failures, so a model
    that cannot see the key -- all candidates equal -- scores 0 and not 1/(k+1)). Chance is
    ``1/(num_distractors+1)`` for a model that guesses. Greedy decoding is not used: a small model
    rarely emits exactly five digits, while the ranking still measures whether the key is retrieved.
    The prompt is run once with a cache and each candidate continues from a copy of it.
"""

from __future__ import annotations

import copy
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from linearize.compat import cache_kwargs, output_cache
from linearize.config import HybridConfig
from linearize.errors import LinearizeError
from linearize.evaluate.lm_eval_model import load_model
from linearize.models.convert import components, convert, hybrid_config_of, is_converted
from linearize.models.layer_select import long_document_rows
from linearize.models.lm_head import final_logits_fn
from linearize.records import fmt_pct, markdown_table, run_metadata, save_figure, write_record

__all__ = ["position_losses", "position_loss_probe", "passkey_prompt", "passkey_trial", "passkey_probe",
           "plot_position_loss", "probes_markdown", "probe_variants", "merge_probe_results", "run_probes", "FILLER"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


# ----------------------------------------------------------------------------- per-position loss


@torch.no_grad()
def position_losses(model, ids: torch.Tensor, *, logit_chunk: int = 512) -> torch.Tensor:
    """Next-token loss (nats) per position: ``(B, T-1)``; entry t is the loss of predicting token t+1."""
    ids = ids.to(model.device)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    logits_of = final_logits_fn(model)
    out = []
    for s in range(0, ids.shape[1] - 1, logit_chunk):
        e = min(s + logit_chunk, ids.shape[1] - 1)
        lg = logits_of(hidden[:, s:e])
        out.append(F.cross_entropy(lg.transpose(1, 2), ids[:, s + 1:e + 1], reduction="none"))
    return torch.cat(out, dim=1).cpu()


def long_document_batch(tokenizer, *, num_docs: int = 2, seq_len: int = 2048, data_dir=None,
                        texts: list[str] | None = None) -> torch.Tensor:
    """``(num_docs, seq_len)`` ids: the start of each of the first long documents (BOS first when the tokenizer
    has one); linearize.models.layer_select.long_document_rows in file order."""
    return long_document_rows(tokenizer, num_rows=num_docs, seq_len=seq_len, seed=None, data_dir=data_dir,
                              texts=texts)[0]


def position_loss_probe(variants: dict[str, Callable[[torch.Tensor], torch.Tensor]], ids: torch.Tensor, *,
                        window: int | None = None, bin: int = 64) -> dict[str, Any]:
    """Run each variant (``ids -> (B, T-1) losses``) and summarise: binned curves, means in/after the window."""
    curves: dict[str, Any] = {}
    for label, fn in variants.items():
        t0 = time.perf_counter()
        per_pos = fn(ids).mean(0)  # over documents
        n = per_pos.shape[0]
        binned = [float(per_pos[s:s + bin].mean()) for s in range(0, n, bin)]
        entry = {"binned": binned, "bin": bin, "mean": float(per_pos.mean()), "seconds": time.perf_counter() - t0}
        if window:
            # position t predicts token t+1 from tokens 0..t: the window covers all of them while t < window
            entry["mean_in_window"] = float(per_pos[:window].mean())
            entry["mean_beyond_window"] = float(per_pos[window:].mean()) if n > window else float("nan")
        curves[label] = entry
    return {"curves": curves, "window": window, "num_docs": int(ids.shape[0]), "seq_len": int(ids.shape[1])}


def plot_position_loss(result: dict[str, Any], path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, c in result["curves"].items():
        xs = [i * c["bin"] + c["bin"] / 2 for i in range(len(c["binned"]))]
        ax.plot(xs, c["binned"], label=label, lw=1.3)
    if result.get("window"):
        ax.axvline(result["window"], color="k", ls="--", lw=0.8, label=f"window {result['window']}")
    ax.set_xscale("symlog", linthresh=max(64, result.get("window") or 64))
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("next-token loss (nats), binned")
    ax.set_title(title or f"per-position loss, {result['num_docs']} documents", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- passkey


def passkey_prompt(tokenizer, context: int, key: str, *, window: int, rng: random.Random,
                   filler: str = FILLER, key_sentence: str = KEY_SENTENCE, question: str = QUESTION) -> dict[str, Any]:
    """Token ids of a passkey prompt of about ``context`` tokens with the key more than ``window`` tokens back.

    Returns ``{"ids": list, "key_pos": start token of the key sentence, "key_end", "distance": tokens from the
    key sentence's end to the prompt's end}``.
    """
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    filler_ids = enc(filler)
    key_ids = enc(key_sentence.format(key=key))
    q_ids = enc(question)
    budget = context - len(bos) - len(key_ids) - len(q_ids)
    if budget <= 0:
        raise LinearizeError(f"context {context} is too short for the passkey prompt")
    reps = -(-budget // len(filler_ids))
    hay = (filler_ids * reps)[:budget]
    # the key sentence must end more than `window` tokens before the last prompt token
    latest = budget - max(0, window - len(q_ids)) - 1
    if latest < 0:
        raise LinearizeError(f"context {context} cannot hold the key beyond a window of {window}")
    boundaries = [i for i in range(0, latest + 1) if i % len(filler_ids) == 0] or [0]
    cut = rng.choice(boundaries)
    ids = bos + hay[:cut] + key_ids + hay[cut:] + q_ids
    key_pos = len(bos) + cut
    key_end = key_pos + len(key_ids)
    return {"ids": ids, "key_pos": key_pos, "key_end": key_end, "distance": len(ids) - key_end}


def _random_key(rng: random.Random, digits: int) -> str:
    lo = 10 ** (digits - 1) if digits > 1 else 0
    return str(rng.randint(lo, 10 ** digits - 1))


@torch.no_grad()
def passkey_trial(model, tokenizer, ids: list[int], key: str, distractors: list[str], *,
                  tie_tol: float = 1e-4) -> dict[str, Any]:
    """Score ``" "+key`` and each distractor after ``ids``; success when the key wins by more than ``tie_tol``."""
    prompt = torch.tensor([ids], device=model.device)
    out = model(prompt, use_cache=True)
    last = out.logits[:, -1].float().log_softmax(-1)
    scores = {}
    for cand in [key, *distractors]:
        cids = tokenizer(" " + cand, add_special_tokens=False)["input_ids"]
        score = float(last[0, cids[0]])
        if len(cids) > 1:
            cache = copy.deepcopy(output_cache(out))
            step = model(torch.tensor([cids[:-1]], device=model.device), **cache_kwargs(cache), use_cache=True)
            lp = step.logits[0].float().log_softmax(-1)
            score += float(lp[torch.arange(len(cids) - 1), torch.tensor(cids[1:])].sum())
        scores[cand] = score
    best_other = max(scores[d] for d in distractors)
    rank = 1 + sum(scores[d] >= scores[key] - tie_tol for d in distractors)
    return {"success": scores[key] > best_other + tie_tol, "rank": rank, "margin": scores[key] - best_other}


def passkey_probe(model, tokenizer, *, contexts=(512, 1024, 2048, 4096), trials: int = 4, window: int = 64,
                  digits: int = 5, num_distractors: int = 9, seed: int = 0, tie_tol: float = 1e-4,
                  filler: str = FILLER, key_sentence: str = KEY_SENTENCE, question: str = QUESTION) -> dict[str, Any]:
    """Passkey accuracy per context length (see the module doc). The same prompts for every model given the seed."""
    per: dict[str, Any] = {}
    for context in contexts:
        rng = random.Random(f"{seed}-{context}")
        results = []
        for _ in range(trials):
            key = _random_key(rng, digits)
            pool = {key}
            distractors = []
            while len(distractors) < num_distractors:
                d = _random_key(rng, digits)
                if d not in pool:
                    pool.add(d)
                    distractors.append(d)
            p = passkey_prompt(tokenizer, context, key, window=window, rng=rng, filler=filler,
                               key_sentence=key_sentence, question=question)
            r = passkey_trial(model, tokenizer, p["ids"], key, distractors, tie_tol=tie_tol)
            results.append({**r, "key": key, "distance": p["distance"], "length": len(p["ids"])})
        per[str(context)] = {
            "accuracy": sum(r["success"] for r in results) / len(results),
            "mean_rank": sum(r["rank"] for r in results) / len(results),
            "trials": results,
        }
    return {"contexts": list(contexts), "window": window, "digits": digits, "num_distractors": num_distractors,
            "chance": 1 / (num_distractors + 1), "per_context": per,
            "accuracy": {str(c): per[str(c)]["accuracy"] for c in contexts}}


# ----------------------------------------------------------------------------- markdown


def probes_markdown(record: dict[str, Any]) -> str:
    meta = record.get("meta", {})
    lines = [f"# probes: {meta.get('model')}", "",
             f"commit {str(meta.get('commit'))[:10]} · device {meta.get('gpu') or meta.get('device')} · seed {meta.get('seed')}",
             f"`{meta.get('command')}`", ""]
    pl = record.get("position_loss")
    if pl:
        lines += [f"## Per-position loss ({pl['num_docs']} long documents × {pl['seq_len']} tokens, window {pl['window']})", ""]
        rows = [[k, f"{c['mean']:.3f}", f"{c.get('mean_in_window', math.nan):.3f}", f"{c.get('mean_beyond_window', math.nan):.3f}"]
                for k, c in pl["curves"].items()]
        lines += [markdown_table(["variant", "mean", "positions < window", "positions ≥ window"], rows), "",
                  "Plot: position_loss.png", ""]
    pk = record.get("passkey")
    if pk:
        ctx = [str(c) for c in pk["contexts"]]
        lines += [f"## Passkey retrieval (key > window {pk['window']} tokens back; {pk['digits']}-digit key vs "
                  f"{pk['num_distractors']} distractors by log-likelihood; chance {fmt_pct(pk['chance'], 0)}%)", ""]
        rows = [[k] + [fmt_pct(acc.get(c), 0) for c in ctx] for k, acc in pk["accuracy"].items()]
        lines += [markdown_table(["variant"] + [f"{c} tokens (%)" for c in ctx], rows), "",
                  f"{pk['trials']} trials per length."]
    return "\n".join(lines) + "\n"


def probe_variants(model, tokenizer, variants: dict[str, str | None], *, ids: torch.Tensor | None = None,
                   passkey: dict[str, Any] | None = None, window: int = 64, bin: int = 64,
                   logit_chunk: int = 512, progress=print) -> dict[str, Any]:
    """Run the probes on one model object under several component modes.

    ``variants``: ``{label: mode}`` (``None``: the model as it is, e.g. a base model). ``ids``: long-document
    batch for the per-position loss (skipped when None). ``passkey``: keyword arguments of
    :func:`passkey_probe` (skipped when None). Returns ``{"position_loss": {...}, "passkey": {label: ...}}``.
    """
    from contextlib import nullcontext

    say = progress or (lambda _m: None)
    out: dict[str, Any] = {}
    fns = {}
    for label, mode in variants.items():
        def fn(x, mode=mode):
            with components(model, mode) if mode else nullcontext():
                return position_losses(model, x, logit_chunk=logit_chunk)
        fns[label] = fn
    if ids is not None:
        t0 = time.perf_counter()
        out["position_loss"] = position_loss_probe(fns, ids, window=window, bin=bin)
        say(f"[probes] per-position loss {list(variants)}: {time.perf_counter() - t0:.0f} s")
    if passkey is not None:
        out["passkey"] = {}
        for label, mode in variants.items():
            t0 = time.perf_counter()
            with components(model, mode) if mode else nullcontext():
                out["passkey"][label] = passkey_probe(model, tokenizer, window=window, **passkey)
            say(f"[probes] passkey {label}: {out['passkey'][label]['accuracy']} ({time.perf_counter() - t0:.0f} s)")
    return out


def merge_probe_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge :func:`probe_variants` outputs (different variants, same data) into one record body."""
    record: dict[str, Any] = {}
    curves = {}
    for p in parts:
        if "position_loss" in p:
            base = p["position_loss"]
            curves.update(base["curves"])
            record["position_loss"] = {**base, "curves": curves}
    pk = {}
    for p in parts:
        pk.update(p.get("passkey", {}))
    if pk:
        first = next(iter(pk.values()))
        record["passkey"] = {k: first[k] for k in ("contexts", "window", "digits", "num_distractors", "chance")}
        record["passkey"]["trials"] = len(next(iter(first["per_context"].values()))["trials"])
        record["passkey"]["accuracy"] = {label: r["accuracy"] for label, r in pk.items()}
        record["passkey"]["per_variant"] = pk
    return record


def run_probes(model, tokenizer, *, base=None, modes=("hybrid", "swa_only"), window: int | None = None,
               docs: int = 2, doc_len: int = 2048, contexts=(512, 1024, 2048, 4096), trials: int = 4, seed: int = 0,
               check: bool = True, progress=print) -> dict[str, Any]:
    """Both probes for one model and its base: the record body of `linearize diagnose --what probes`.

    A converted `model` is probed in `modes`, next to `base` (a model spec loaded in the model's dtype, or None to
    skip it). An unconverted `model` is the base itself: it is probed as 'base', then converted untrained (window
    `window`, default 64; seeded with `seed`) and probed in `modes` -- so on return it is converted either way.
    The passkey sits more than the conversion's window back (`window`, else the model's own).
    """
    import gc

    hw = window or (hybrid_config_of(model).window if is_converted(model) else 64)
    ids = long_document_batch(tokenizer, num_docs=docs, seq_len=doc_len, data_dir=None)
    pk = dict(contexts=[int(c) for c in contexts], trials=trials, seed=seed)
    parts = []
    if not is_converted(model):
        parts.append(probe_variants(model, tokenizer, {"base": None}, ids=ids, passkey=pk, window=hw, progress=progress))
        torch.manual_seed(seed)
        convert(model, HybridConfig(window=hw))
    elif base is not None:
        bmodel, btok, _ = load_model(base, device=str(model.device), dtype=model.dtype, check=check)
        parts.append(probe_variants(bmodel, btok, {"base": None}, ids=ids, passkey=pk, window=hw, progress=progress))
        del bmodel
        gc.collect()
    parts.append(probe_variants(model, tokenizer, {m: m for m in modes}, ids=ids, passkey=pk, window=hw,
                                progress=progress))
    return merge_probe_results(parts)


def probes_record(model, tokenizer, info: dict[str, Any], *, out=None, title: str = "", data_dir=None, seed: int = 0,
                  docs: int = 2, doc_len: int = 2048, progress=print, **probe_args) -> tuple[dict[str, Any], str]:
    """:func:`run_probes` as a record: ``(record, markdown)``, written to ``out`` (``probes.json``, ``.md`` and the
    per-position loss plot) when given. ``info``: the model's, from ``load_model``; an unconverted model is recorded
    as converted untrained, as run_probes leaves it. `linearize diagnose --what probes` and the study both run this."""
    was_converted = is_converted(model)
    body = run_probes(model, tokenizer, docs=docs, doc_len=doc_len, seed=seed, progress=progress, **probe_args)
    if not was_converted:  # run_probes probed the base, then converted it untrained
        info = {**info, "kind": "converted_untrained", "hybrid": hybrid_config_of(model).to_dict()}
    meta = run_metadata(model_info=info, data_dir=data_dir, device=str(model.device), seed=seed, docs=docs, doc_len=doc_len)
    record = {"meta": meta, **body}
    md = probes_markdown(record)
    if out:
        write_record(out, "probes", record, md)
        plot_position_loss(body["position_loss"], f"{out}/position_loss.png", title=title)
    return record, md
