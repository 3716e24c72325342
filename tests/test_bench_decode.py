"""The fair decode benchmark's parts that run without a GPU: the static cache it fills, the ring layer's step, the
bytes a step reads, the ratios and the table; the captured static-cache step itself on CUDA."""

import os

import pytest
import torch
from transformers import DynamicCache

from linearize.attention.cache import cache_nbytes
from linearize.bench import decode
from linearize.compat import cache_kwargs
from tiny_models import tiny_model

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_static_cache_is_filled_to_its_end_and_a_step_writes_at_the_context(family):
    model = tiny_model(family, sliding_window=4) if family == "gemma3" else tiny_model(family)
    ctx, room, batch = 10, 3, 2
    cache = decode.fill_static_cache(model, batch, ctx, room, dtype=torch.float32)
    assert cache_nbytes(cache) == batch * decode.static_cache_bytes_per_seq(model.config, ctx + room, torch.float32)
    decode.use_unmasked_sdpa(model)
    step = decode.CapturedStaticStep.__new__(decode.CapturedStaticStep)  # its forward, without a CUDA stream
    step.model, step.cache = model, cache
    step.ids = torch.randint(1, 128, (batch, 1))
    step.positions = torch.full((batch, 1), ctx)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    with torch.no_grad():
        logits = step._forward()
    assert logits.shape == (batch, 1, 128) and torch.isfinite(logits).all()
    assert step.positions.eq(ctx + 1).all()
    for layer, (keys, _) in zip(cache.layers, before):
        slot = ctx % layer.window if layer.is_sliding else ctx
        changed = (layer.keys != keys).any(-1).any(1).any(0).nonzero().flatten().tolist()
        assert changed == [slot]  # the new key went where the next token belongs, nothing else moved
        assert (layer.seen if layer.is_sliding else int(layer.cumulative_length)) == ctx + 1
    assert any(layer.is_sliding for layer in cache.layers) == (family == "gemma3")


def test_unmasked_static_step_equals_attention_over_every_filled_slot():
    """The captured base attends to all ctx + room slots: the same logits as a DynamicCache holding those keys with
    the new token's key in slot `ctx` (every layer global, so no window)."""
    model = tiny_model("llama")
    decode.use_unmasked_sdpa(model)
    ctx, room = 6, 2
    cache = decode.fill_static_cache(model, 1, ctx, room, dtype=torch.float32)
    ids = torch.randint(1, 128, (1, 1))
    with torch.no_grad():
        got = model(ids, position_ids=torch.tensor([[ctx]]), **cache_kwargs(cache), use_cache=True).logits
        # the reference: the same keys in a growing cache, the step's own key appended at its end
        ref = DynamicCache(config=model.config)
        for i, layer in enumerate(cache.layers):
            keep = torch.ones(ctx + room, dtype=torch.bool)
            keep[ctx] = False  # the step's own key: DynamicCache appends it at the end
            ref.update(layer.keys[:, :, keep], layer.values[:, :, keep], i)
        want = model(ids, position_ids=torch.tensor([[ctx]]), **cache_kwargs(ref), use_cache=True).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_weight_bytes_count_a_tied_embedding_once_and_skip_an_untied_input_table():
    tied = tiny_model("gemma3")
    untied = tiny_model("llama", tie_word_embeddings=False)
    every = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert decode.weight_bytes_per_step(tied) == every(tied)
    emb = untied.get_input_embeddings().weight
    assert decode.weight_bytes_per_step(untied) == every(untied) - emb.numel() * emb.element_size()


def _fair_row(kind, *, shape="gemma3-270m", batch, context, tps, floor, cache=100):
    """One measured row of the fair decode benchmark: `tps` tokens/s at `batch`, a memory floor of `floor` ms."""
    ms = batch * 1e3 / tps
    return dict(shape=shape, kind=kind, batch=batch, context=context, tokens_per_s=tps, ms_per_step=ms,
                cache_bytes=cache, cache_bytes_per_seq=cache / batch, weight_bytes=1, floor_ms=floor,
                floor_fraction=floor / ms)


def _fair_table(rows, ratios) -> str:
    return "\n".join(decode.render_fair_markdown(dict(copy_bandwidth_bytes_per_s=4e12, llama_layers=8,
                                                     kinds=decode.FAIR_KINDS, rows=rows, ratios=ratios)))


def test_fair_ratios_and_table_come_from_the_rows():
    def row(kind, tps, cache, floor):
        return _fair_row(kind, batch=8, context=1024, tps=tps, floor=floor, cache=cache)

    rows = [row("base_static_graph", 1000.0, 900, 2.0), row("converted_graph", 4000.0, 100, 0.5),
            row("base_eager_dynamic", 100.0, 900, 2.0),
            dict(shape="gemma3-270m", kind="converted_graph", batch=64, context=1024, error="out of memory")]
    (ratio,) = decode.fair_ratios(rows)
    assert ratio["speedup_vs_static_graph_base"] == pytest.approx(4.0)
    assert ratio["state_bytes_ratio_base_over_ours"] == pytest.approx(9.0)
    assert ratio["extra_speedup_vs_eager_dynamic_base"] == pytest.approx(40.0)
    assert ratio["ours_floor_fraction"] == pytest.approx(0.5 / 2.0)
    table = _fair_table(rows, [ratio])
    assert "**4.00x**" in table and "4.00 TB/s" in table and "out of memory" in table and "40.0x" in table


def test_fused_and_unfused_converted_rows_side_by_side():
    def row(kind, tps, floor):
        return _fair_row(kind, shape="llama3-8b", batch=4, context=4096, tps=tps, floor=floor)

    rows = [row("base_static_graph", 1000.0, 2.0), row("converted_graph", 3000.0, 0.5), row("converted_graph_unfused", 1000.0, 0.5)]
    (ratio,) = decode.fair_ratios(rows)
    assert ratio["fused_speedup_over_unfused"] == pytest.approx(3.0)
    assert ratio["unfused_floor_fraction"] == pytest.approx(0.5 / 4.0)
    assert ratio["ours_floor_fraction"] == pytest.approx(0.5 / (4e3 / 3000.0))
    table = _fair_table(rows, [ratio])
    assert "| converted_graph_unfused | 4 | 4096 |" in table and "| 3.00x | 12% |" in table


def test_deferred_fold_rows_give_their_own_ratio_to_the_captured_base():
    def row(kind, tps, floor):
        return _fair_row(kind, batch=1024, context=32768, tps=tps, floor=floor)

    rows = [row("base_static_graph", 1000.0, 2.0), row("converted_graph", 3000.0, 0.5),
            row("converted_graph_fold16", 5000.0, 100.0)]
    (ratio,) = decode.fair_ratios(rows)
    assert ratio["speedup_vs_static_graph_base"] == pytest.approx(3.0)
    assert ratio["fold16_speedup_vs_static_graph_base"] == pytest.approx(5.0)
    assert ratio["fold16_floor_fraction"] == pytest.approx(100.0 / (1024e3 / 5000.0))
    table = _fair_table(rows, [ratio])
    assert "| converted_graph_fold16 | 1024 | 32768 |" in table and "| 5.00x | 49% |" in table


def test_the_base_at_a_short_context_gives_the_ceiling_of_any_attention_speedup():
    def row(kind, ctx, ms):
        return _fair_row(kind, batch=1024, context=ctx, tps=1024e3 / ms, floor=1.0)

    ours = _fair_row("converted_graph", batch=1024, context=32768, tps=1024e3 / 12.0, floor=3.0, cache=3)
    rows = [row("base_static_graph", 32768, 36.0), row("base_static_graph", 16, 6.0), ours]
    (ratio,) = decode.fair_ratios(rows)  # the short-context base row has no converted row of its own
    assert ratio["context"] == 32768 and ratio["speedup_vs_static_graph_base"] == pytest.approx(3.0)
    assert ratio["outside_attention_ms"] == pytest.approx(6.0)
    assert ratio["ceiling_speedup_vs_static_graph_base"] == pytest.approx(6.0)
    # the state's share of the 3 ms floor (3 of 4 bytes; the weights are read inside the 6 ms step already): 2.25 ms
    assert ratio["state_read_bound_speedup"] == pytest.approx(36.0 / (6.0 + 2.25))
    # attention free, the step still takes the 6 ms outside attention: at most half of its 3 ms floor
    assert ratio["floor_fraction_bound"] == pytest.approx(0.5)
    assert "| 6.00 | 6.0x | 4.4x | 50% |" in _fair_table(rows, [ratio])


def test_the_compiled_rows_give_the_same_treatment_ratios():
    def row(kind, ctx, ms, floor=1.0):
        return _fair_row(kind, batch=1024, context=ctx, tps=1024e3 / ms, floor=floor)

    rows = [row("base_static_graph", 32768, 36.0), row("base_static_graph", 16, 6.0), row("converted_graph", 32768, 12.0),
            row("base_static_graph_compiled", 32768, 32.0), row("base_static_graph_compiled", 16, 2.0),
            row("converted_graph_compiled", 32768, 8.0, floor=1.5)]
    (ratio,) = decode.fair_ratios(rows)
    assert ratio["speedup_vs_static_graph_base"] == pytest.approx(3.0)  # the captured pair as before
    assert ratio["compiled_speedup_vs_compiled_base"] == pytest.approx(4.0)
    assert ratio["compiled_base_over_base"] == pytest.approx(36.0 / 32.0)
    assert ratio["compiled_over_ours"] == pytest.approx(1.5)
    assert ratio["compiled_floor_fraction"] == pytest.approx(1.5 / 8.0)
    assert ratio["compiled_outside_attention_ms"] == pytest.approx(2.0)
    assert ratio["compiled_ceiling_speedup"] == pytest.approx(16.0)
    assert ratio["compiled_floor_fraction_bound"] == pytest.approx(0.75)
    assert "| gemma3-270m | 1024 | 32768 | **4.00x** | 1.12x | 1.50x | 19% | — | — | 2.00 | 16.0x | 75% |" in _fair_table(rows, [ratio])
    # with the deferred fold too: against the compiled base, its own floor %
    (both,) = decode.fair_ratios(rows + [row("converted_graph_fold16_compiled", 32768, 4.0, floor=1.5)])
    assert both["compiled_fold16_speedup_vs_compiled_base"] == pytest.approx(8.0)
    assert both["compiled_fold16_floor_fraction"] == pytest.approx(1.5 / 4.0)
    assert "| 19% | 8.00x | 38% | 2.00 |" in _fair_table(rows, [both])
    (plain,) = decode.fair_ratios(rows[:3])  # a run without the compiled rows: no such keys, no such table
    assert not any(k.startswith("compiled") for k in plain) and "compiled into" not in _fair_table(rows[:3], [plain])


def test_each_model_at_its_largest_batch_gives_the_same_gpu_throughput_ratio():
    def row(kind, batch, tps, ctx=32768, floor=1.0):
        return dict(_fair_row(kind, batch=batch, context=ctx, tps=tps, floor=floor), peak_gib=batch / 64)

    rows = [row("base_static_graph_compiled", 1, 500.0), row("base_static_graph_compiled", 1024, 30000.0),
            row("base_static_graph_compiled", 1024, 90000.0, ctx=16),  # a short row: no comparison of its own
            row("converted_graph_compiled", 1024, 90000.0), row("converted_graph_compiled", 4096, 240000.0, floor=8.0),
            row("converted_graph_fold16_compiled", 4096, 270000.0),
            dict(shape="gemma3-270m", kind="converted_graph_compiled", batch=8192, context=32768, error="out of memory"),
            row("converted_graph_compiled", 1024, 50000.0, ctx=131072)]  # no compiled base at 128k: no entry
    (entry,) = decode.largest_batch_ratios(rows)
    assert (entry["context"], entry["base_batch"], entry["batch"]) == (32768, 1024, 4096)
    assert entry["throughput_vs_compiled_base"] == pytest.approx(8.0)
    assert entry["fold16_throughput_vs_compiled_base"] == pytest.approx(9.0)
    assert entry["floor_fraction"] == pytest.approx(8.0 / (4096e3 / 240000.0))
    assert (entry["base_peak_gib"], entry["peak_gib"]) == (16.0, 64.0)
    table = _fair_table(rows, decode.fair_ratios(rows))
    # rows without a recorded default (runs before the fold could be one): the default is the F = 1 row
    assert (entry["default_fold_every"], entry["default_throughput_vs_compiled_base"]) == (1, pytest.approx(8.0))
    assert "| gemma3-270m | 32768 | 1024 | 30000 | 16.0 | 4096 | 240000 | 64.0 | 47% | 8.00x | 9.00x | **8.00x** (F=1, 47%) |" in table
    assert "same GPU filled by each model" not in _fair_table(rows[:3], [])


def test_the_default_step_is_the_row_whose_fold_the_default_takes():
    """Converted rows record their F and the F the default step takes at that batch (decode.BY_LOAD): the goals read
    the default's row -- the deferred fold's where the default folds, the F = 1 row where it does not."""
    def row(kind, batch, tps, fold=None, default=None):
        r = dict(_fair_row(kind, batch=batch, context=32768, tps=tps, floor=1.0), peak_gib=1.0)
        return r if fold is None else dict(r, fold_every=fold, default_fold_every=default)

    base = [row("base_static_graph", 512, 1000.0), row("base_static_graph_compiled", 512, 1000.0)]
    for default, want in ((16, 9.0), (1, 8.0)):
        rows = base + [row("converted_graph", 512, 5000.0, 1, default), row("converted_graph_fold16", 512, 6000.0, 16, default),
                       row("converted_graph_compiled", 512, 7000.0, 1, default),
                       row("converted_graph_compiled", 4096, 8000.0, 1, default),
                       row("converted_graph_fold16_compiled", 4096, 9000.0, 16, default)]
        (ratio,) = decode.fair_ratios(rows)
        assert ratio["default_speedup_vs_static_graph_base"] == pytest.approx(6.0 if default == 16 else 5.0)
        assert ratio["default_fold_every"] == default
        (entry,) = decode.largest_batch_ratios(rows)
        assert (entry["default_fold_every"], entry["default_throughput_vs_compiled_base"]) == (default, pytest.approx(want))


def test_fold_every_sets_and_restores_the_tuning():
    pytest.importorskip("triton")
    from linearize.attention.triton.decode import TUNING

    before = TUNING["fold_every"]
    with decode.fold_every(decode.FOLD_ROWS):
        assert TUNING["fold_every"] == 16
    assert TUNING["fold_every"] == before
    with pytest.raises(RuntimeError), decode.fold_every(8):
        raise RuntimeError("a failing row")
    assert TUNING["fold_every"] == before


def test_fused_decode_switch_sets_and_restores_the_environment(monkeypatch):
    pytest.importorskip("triton")
    from linearize.attention.triton.decode import FUSED_ENV

    monkeypatch.delenv(FUSED_ENV, raising=False)
    with decode.fused_decode(False):
        assert os.environ[FUSED_ENV] == "0"
    assert FUSED_ENV not in os.environ
    monkeypatch.setenv(FUSED_ENV, "0")
    with decode.fused_decode(True):
        assert os.environ[FUSED_ENV] == "1"
    assert os.environ[FUSED_ENV] == "0"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_converted_rows_capture_the_fused_step_only_when_switched_on(monkeypatch):
    """The benchmark's converted step (synthetic state, GraphDecoder) runs the fused kernel in the fused row and not
    in the unfused one."""
    import linearize
    import linearize.attention.triton.decode as fused

    model = linearize.convert(tiny_model("gemma3", vocab_size=1024), linearize.HybridConfig()).to("cuda", torch.bfloat16)
    launches = []
    real = fused.fused_decode_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(fused, "fused_decode_kernel", Counting())
    counts = {}
    for on in (True, False):
        with decode.fused_decode(on):
            cache = decode._fill_hybrid_cache(model, 8, 300, torch.bfloat16)
            tps, ms, _ = decode._decode_rate(model, cache, 8, 300, 4, graph=True)
        counts[on] = len(launches) - sum(counts.values())
        assert tps > 0 and ms > 0
    assert counts[True] == 3 * 3 and counts[False] == 0  # 3 layers x (2 eager warm-up steps + the capture)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_converted_batches_go_past_the_base_only_as_far_as_memory_allows():
    import linearize

    model = linearize.convert(tiny_model("gemma3", vocab_size=1024), linearize.HybridConfig()).to("cuda", torch.bfloat16)
    tried = decode.converted_batches(model, 300, above=1024)
    assert tried and all(b > 1024 for b in tried) and tried == sorted(tried, reverse=True)  # a tiny state fits them all
    assert decode.converted_batches(model, 300, above=max(decode.CONVERTED_BATCHES)) == []


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", ["gemma3", "llama"])
def test_captured_static_step_replays_the_eager_static_step(family):
    model = (tiny_model(family, sliding_window=4) if family == "gemma3" else tiny_model(family)).cuda()
    decode.use_unmasked_sdpa(model)
    ctx, room = 10, 12
    torch.manual_seed(0)
    eager_cache = decode.fill_static_cache(model, 2, ctx, room, dtype=torch.float32)
    torch.manual_seed(0)
    graph_cache = decode.fill_static_cache(model, 2, ctx, room, dtype=torch.float32)
    stepper = decode.CapturedStaticStep(model, graph_cache, 2, ctx)
    for i in range(8):
        ids = torch.randint(1, 128, (2, 1), device="cuda")
        with torch.no_grad():
            want = model(ids, position_ids=torch.full((2, 1), ctx + i, device="cuda"), **cache_kwargs(eager_cache), use_cache=True).logits
        got = stepper.step(ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert stepper.graph is not None


def test_compiled_layer_ratios_against_eager_and_compiled_sdpa():
    from linearize.bench.kernels import layer_ratios, render_markdown

    rows = [dict(config="gemma3-270m", T=2048, impl=impl, fwd_ms=ms / 3, fwd_bwd_ms=ms, peak_mib=10.0, fwd_tflops=1.0,
                 fwd_bwd_tflops=1.0)
            for impl, ms in [("sdpa", 1.0), ("triton", 1.5), ("triton_compiled", 1.1), ("sdpa_compiled", 0.5)]]
    (entry,) = layer_ratios(rows)
    assert entry["triton_compiled_over_sdpa_fwd_bwd"] == pytest.approx(1.1)
    assert entry["triton_compiled_over_sdpa_compiled_fwd_bwd"] == pytest.approx(2.2)
    md = render_markdown(dict(environment=dict(device="d", torch="t", triton="t", git_commit="c", command="x"),
                              layer=rows, layer_ratios=[entry]))
    assert "| gemma3-270m | 2048 | **1.10x** | 2.20 |" in md


def test_a_chain_of_layers_feeds_each_output_into_the_next_queries_and_reports_per_layer():
    from linearize.bench.kernels import chained, per_layer, render_markdown

    calls = []

    def layer(q, k):  # records what each call saw
        calls.append(q.clone())
        return torch.tanh(q @ k)

    q, k = torch.randn(2, 3, 3), torch.randn(3, 3)
    out = chained(layer, 3)(q, k)
    x = q
    for i in range(3):
        torch.testing.assert_close(calls[i], x)
        x = x + torch.tanh(x @ k)
    torch.testing.assert_close(out, x)
    assert chained(layer, 1) is layer
    times = per_layer(dict(fwd_ms=6.0, fwd_bwd_ms=9.0, graph_fwd_ms=None, peak_mib=30.0), 3)
    assert times == dict(fwd_ms=2.0, fwd_bwd_ms=3.0, graph_fwd_ms=None, peak_mib=30.0)  # the chain's memory
    rows = [dict(config="gemma3-270m", T=2048, impl="sdpa", layers=3, fwd_ms=2.0, fwd_bwd_ms=3.0, peak_mib=30.0)]
    md = render_markdown(dict(environment=dict(device="d", torch="t", triton="t", git_commit="c", command="x"), layer=rows))
    assert "3 layers chained in one step, time / 3" in md and "| 2048 | 2.000 | 3.000 | 30 |" in md
