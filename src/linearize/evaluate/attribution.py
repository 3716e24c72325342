"""Which branch does the work? Per-layer, per-head attribution of a converted model on held-out text.

For every converted layer and query head, over all (sequence, position) pairs of the text:

* **attention mass** -- ``shared_norm``: the hybrid output is
  ``y_t = (γ Σ_W a_ts v_s + Σ_P b_ts v_s) / (γ Σ_W a_ts + Σ_P b_ts)``; the LA share of query t is
  ``Σ_P b_ts / (γ Σ_W a_ts + Σ_P b_ts)`` and the SWA share ``γ Σ_W a_ts / (...)``: exactly the
  weights the layer gives each branch. (``a_ts = exp(τ q·k − c_t)`` is shifted by the window's
  largest logit ``c_t``, as in the layer itself, so this is the *effective* balance, not one
  computed from unshifted exponentials.) ``mix``: ``y_t = g·SWA_t + (1−g)·LA_t``, so the shares are
  ``1−g`` (LA) and ``g`` (SWA), with ``g = 1`` where LA has no keys (early positions, complementary).
* **output norm** -- the hybrid output split into its two summands (shared_norm: ``γ Σ_W a v / D`` and
  ``Σ_P b v / D``; mix: ``g·SWA_t`` and ``(1−g)·LA_t``); the LA share of query t is
  ``‖LA part‖ / (‖LA part‖ + ‖SWA part‖)``. A branch with a large mass but values that cancel
  gets a small output share.
* Shares are means over the queries where the layer has any key at all (both shares of a query sum
  to 1). Positions before the window is full count too (there a complementary LA has no keys: share 0).
* **loss increase** per layer -- next-token loss with that layer alone switched to ``swa_only``
  ("LA off") or ``la_only`` ("SWA off": linear attention over all keys, what a model left with LA
  only computes), minus the loss of the model as it is (all layers ``hybrid``). Optionally per head.

Held-out text: ``wikitext2_test`` by default (``wikitext2`` *valid* is a training source in
:mod:`linearize.documents`), cut into ``num_seqs`` sequences of ``seq_len`` tokens (BOS first).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from linearize.attention.chunked import window_sums
from linearize.attention.linear import linear_state
from linearize.documents import iter_documents
from linearize.errors import LinearizeError
from linearize.records import fmt_pct, markdown_table, save_figure

__all__ = ["attribution", "branch_shares", "heldout_batch", "sequence_loss", "plot_attribution", "attribution_markdown"]


def heldout_batch(tokenizer, *, source: str = "wikitext2_test", num_seqs: int = 4, seq_len: int = 512,
                  data_dir=None, texts: list[str] | None = None) -> torch.Tensor:
    """``(num_seqs, seq_len)`` token ids from consecutive documents of ``source`` (or ``texts``), each row BOS-first."""
    if texts is None:
        texts = []
        need = num_seqs * seq_len * 6  # characters: generous for any tokenizer
        for doc in iter_documents(source, data_dir):
            texts.append(doc if isinstance(doc, str) else getattr(doc, "text", str(doc)))
            if sum(map(len, texts)) > need:
                break
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    bos = tokenizer.bos_token_id
    body = seq_len - (1 if bos is not None else 0)
    if len(ids) < num_seqs * body:
        raise LinearizeError(f"held-out text has {len(ids)} tokens; {num_seqs} x {seq_len} needed")
    rows = []
    for i in range(num_seqs):
        row = ids[i * body:(i + 1) * body]
        rows.append(([bos] if bos is not None else []) + row)
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def sequence_loss(model, ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats) over all positions of ``ids``."""
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i:i + batch_size].to(model.device)
        logits = model(x, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += x[:, 1:].numel()
    return total / count


def branch_shares(module, q, k, v, valid, weight, gates: dict | None = None) -> dict[str, torch.Tensor]:
    """Per query head: summed LA/SWA mass shares and output-norm shares, and the query count.

    Returns ``{"la_mass", "swa_mass", "la_out", "swa_out", "count"}``, each (Hq,) summed over the
    batch and positions with any key (divide by ``count`` for the means). ``gates``: the layer's log_decay / beta
    (``HybridAttention.state_inputs``) for linear states that use them.
    """
    h = module.hybrid
    b, hq, t, _ = q.shape
    if valid is None:
        valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    q32, k32, v32 = q.float(), k.float(), v.float()
    qf, kf = (x.float() for x in module.features(q, k, valid)[:2])
    num_s, den_s = window_sums(q32, k32, v32, valid, scale=module.scale, window=h.window, chunk=h.chunk_size)
    shift = h.window if h.placement == "complementary" else 0
    num_l, den_l = linear_state(h.linear_state).chunked(qf, kf, v32, enter=valid, lag=shift, chunk=h.chunk_size, **(gates or {}))
    w = torch.as_tensor(weight, dtype=torch.float32, device=q.device)
    w = (w.view(1, -1, 1) if w.dim() == 1 else w).expand(b, hq, t)
    if h.combine == "shared_norm":
        mass_s, mass_l = w * den_s, den_l
        total = mass_s + mass_l
        safe = torch.where(total > 0, total, torch.ones_like(total))
        la_mass = mass_l / safe
        part_s = w.unsqueeze(-1) * num_s / safe.unsqueeze(-1)
        part_l = num_l / safe.unsqueeze(-1)
        has = total > 0
    else:
        g = torch.where(den_l == 0, torch.ones_like(den_l), w)
        la_mass = 1 - g
        sd = torch.where(den_s > 0, den_s, torch.ones_like(den_s)).unsqueeze(-1)
        ld = torch.where(den_l > 0, den_l, torch.ones_like(den_l)).unsqueeze(-1)
        part_s = g.unsqueeze(-1) * num_s / sd
        part_l = (1 - g).unsqueeze(-1) * num_l / ld
        has = (den_s > 0) | (den_l > 0)
    ns, nl = part_s.norm(dim=-1), part_l.norm(dim=-1)
    nt = ns + nl
    la_out = torch.where(nt > 0, nl / torch.where(nt > 0, nt, torch.ones_like(nt)), torch.zeros_like(nt))
    has_out = has & (nt > 0)
    m = has.float() * valid[:, None, :].float()
    mo = has_out.float() * valid[:, None, :].float()
    return {
        "la_mass": (la_mass * m).sum((0, 2)),
        "swa_mass": ((1 - la_mass) * m).sum((0, 2)),
        "count": m.sum((0, 2)),
        "la_out": (la_out * mo).sum((0, 2)),
        "swa_out": ((1 - la_out) * mo).sum((0, 2)),
        "count_out": mo.sum((0, 2)),
    }


@torch.no_grad()
def attribution(model, tokenizer, ids: torch.Tensor | None = None, *, source: str = "wikitext2_test",
                num_seqs: int = 4, seq_len: int = 512, batch_size: int = 2, data_dir=None,
                per_head_loss: bool = False, loss: bool = True, progress=print) -> dict[str, Any]:
    """Attribution of a converted ``model`` (see the module doc); a JSON-ready dict.

    ``{"layers": [layer indices], "heads": Hq, "la_mass_share": [[per head] per layer], "swa_mass_share",
    "la_output_share", "swa_output_share", "loss": {"hybrid", "no_la": [per layer], "no_swa": [...],
    "no_la_increase", "no_swa_increase", ("per_head": ...)}, "summary": {...}, "data": {...}}``.
    """
    from linearize.models.convert import components, hybrid_modules

    say = progress or (lambda _m: None)
    modules = {m.layer_idx: m for m in hybrid_modules(model)}
    if not modules:
        raise LinearizeError("attribution needs a converted model")
    if ids is None:
        ids = heldout_batch(tokenizer, source=source, num_seqs=num_seqs, seq_len=seq_len, data_dir=data_dir)
    t0 = time.perf_counter()
    sums: dict[int, dict[str, torch.Tensor]] = {}

    def hook(module, q, k, v, valid, weight, hidden_states):
        modes = set(module.head_mode_list())
        if modes != {"hybrid"}:
            return None
        s = branch_shares(module, q, k, v, valid, weight, module.state_inputs(hidden_states, valid))
        acc = sums.setdefault(module.layer_idx, {k2: torch.zeros_like(x) for k2, x in s.items()})
        for k2, x in s.items():
            acc[k2] += x
        return None

    saved = {i: m.transfer_hook for i, m in modules.items()}
    try:
        for m in modules.values():
            m.transfer_hook = hook
        with components(model, "hybrid"):
            for i in range(0, ids.shape[0], batch_size):
                model(ids[i:i + batch_size].to(model.device), use_cache=False)
    finally:
        for i, m in modules.items():
            m.transfer_hook = saved[i]
    layers = sorted(modules)

    def mean(key, count):
        return [(sums[i][key] / sums[i][count].clamp_min(1)).tolist() for i in layers]

    out: dict[str, Any] = {
        "layers": layers,
        "heads": modules[layers[0]].num_heads,
        "combine": modules[layers[0]].hybrid.combine,
        "placement": modules[layers[0]].hybrid.placement,
        "window": modules[layers[0]].hybrid.window,
        "la_mass_share": mean("la_mass", "count"),
        "swa_mass_share": mean("swa_mass", "count"),
        "la_output_share": mean("la_out", "count_out"),
        "swa_output_share": mean("swa_out", "count_out"),
        "data": {"source": source, "num_seqs": int(ids.shape[0]), "seq_len": int(ids.shape[1])},
    }
    say(f"[attribution] shares: {time.perf_counter() - t0:.1f} s")
    if loss:
        with components(model, "hybrid"):
            base = sequence_loss(model, ids, batch_size)
        no_la, no_swa = [], []
        for i in layers:
            with components(model, {i: "swa_only"}):
                no_la.append(sequence_loss(model, ids, batch_size))
            with components(model, {i: "la_only"}):
                no_swa.append(sequence_loss(model, ids, batch_size))
        say(f"[attribution] per-layer losses: {time.perf_counter() - t0:.1f} s")
        out["loss"] = {"hybrid": base, "no_la": no_la, "no_swa": no_swa,
                       "no_la_increase": [x - base for x in no_la], "no_swa_increase": [x - base for x in no_swa]}
        if per_head_loss:
            heads = out["heads"]
            per = {"no_la_increase": [], "no_swa_increase": []}
            for i in layers:
                row_la, row_swa = [], []
                for hd in range(heads):
                    with components(model, {i: {hd: "swa_only"}}):
                        row_la.append(sequence_loss(model, ids, batch_size) - base)
                    with components(model, {i: {hd: "la_only"}}):
                        row_swa.append(sequence_loss(model, ids, batch_size) - base)
                per["no_la_increase"].append(row_la)
                per["no_swa_increase"].append(row_swa)
            out["loss"]["per_head"] = per
    flat = lambda rows: [x for r in rows for x in r]  # noqa: E731
    summary = {
        "la_mass_share": sum(flat(out["la_mass_share"])) / max(1, len(flat(out["la_mass_share"]))),
        "la_output_share": sum(flat(out["la_output_share"])) / max(1, len(flat(out["la_output_share"]))),
    }
    if loss:
        summary.update(loss_hybrid=out["loss"]["hybrid"], max_loss_increase_no_la=max(out["loss"]["no_la_increase"]),
                       max_loss_increase_no_swa=max(out["loss"]["no_swa_increase"]))
    out["summary"] = summary
    out["seconds"] = time.perf_counter() - t0
    return out


def plot_attribution(result: dict[str, Any], path, title: str = "") -> Path:
    """Heatmaps (layer x head) of the LA mass and output-norm shares, and the per-layer loss increases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = result["layers"]
    panels = 3 if "loss" in result else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 0.25 * len(layers) + 2.5))
    for ax, key, name in zip(axes, ("la_mass_share", "la_output_share"), ("LA share of attention mass", "LA share of output norm")):
        data = np.asarray(result[key])
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_xticks(range(data.shape[1]))
        fig.colorbar(im, ax=ax, fraction=0.046)
    if "loss" in result:
        ax = axes[2]
        y = np.arange(len(layers))
        ax.barh(y - 0.2, result["loss"]["no_la_increase"], height=0.4, label="LA off (swa_only)")
        ax.barh(y + 0.2, result["loss"]["no_swa_increase"], height=0.4, label="SWA off (la_only)")
        ax.set_yticks(y, [str(x) for x in layers], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.5)
        ax.set_xlabel("loss increase (nats/token)")
        ax.set_title(f"one layer switched (hybrid loss {result['loss']['hybrid']:.3f})", fontsize=9)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def attribution_markdown(record: dict[str, Any]) -> str:
    meta = record.get("meta", {})
    r = record
    header = ["layer", "LA mass % (per head)", "LA output % (per head)"]
    if "loss" in r:
        header += ["Δloss LA off", "Δloss SWA off"]
    rows = []
    for j, layer in enumerate(r["layers"]):
        row = [layer, " ".join(fmt_pct(x, 1) for x in r["la_mass_share"][j]),
               " ".join(fmt_pct(x, 1) for x in r["la_output_share"][j])]
        if "loss" in r:
            row += [f"{r['loss']['no_la_increase'][j]:+.4f}", f"{r['loss']['no_swa_increase'][j]:+.4f}"]
        rows.append(row)
    s = r["summary"]
    lines = [f"# attribution: {meta.get('model')}", "",
             f"{r['combine']} · {r['placement']} · window {r['window']} · text {r['data']} · "
             f"commit {str(meta.get('commit'))[:10]} · device {meta.get('gpu') or meta.get('device')}",
             f"`{meta.get('command')}`", "",
             f"Mean LA share: attention mass {fmt_pct(s['la_mass_share'])}%, output norm {fmt_pct(s['la_output_share'])}%."
             + (f" Loss (all hybrid) {s['loss_hybrid']:.4f} nats/token." if "loss_hybrid" in s else ""), "",
             markdown_table(header, rows)]
    if not math.isnan(s.get("la_mass_share", 0.0)):
        lines += ["", "SWA shares are 100 minus the LA shares (per query, then averaged)."]
    return "\n".join(lines) + "\n"
