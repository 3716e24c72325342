"""The one-launch decode step (attention/triton/decode.py) against the PyTorch recurrent step, several steps in a row.

Without CUDA the kernel runs on the CPU under TRITON_INTERPRET=1 (set by test_triton's module code, imported below
before anything imports the kernel); `LINEARIZE_FUSED_DECODE=1` lets the fused step take CPU tensors there. The
`gpu` tests add bf16 at model shapes, CUDA-graph capture, and greedy decoding of a converted model.
"""

from __future__ import annotations

import copy
import types
import importlib

import pytest
import torch

import test_triton  # noqa: F401  -- sets TRITON_INTERPRET=1 without CUDA, before triton is imported, and readies it

import linearize  # noqa: E402
import linearize.attention.triton.decode as fused  # noqa: E402
from linearize.attention.recurrent import decode_step, linear_sums, prefill_state  # noqa: E402
from spec_kwargs import with_spec  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and type(fused.fused_decode_kernel).__name__ != "InterpretedFunction":
    fused = importlib.reload(fused)  # imported earlier without the interpreter: rebuild the kernel interpreted


@pytest.fixture(autouse=True)
def _fused_on(monkeypatch):
    """The fused step on (CPU tensors too, interpreted)."""
    monkeypatch.setenv(fused.FUSED_ENV, "1")


def _prompt_state(b, hkv, d, m, t, window, *, softmax_sinks=0, num_sinks=3, dtype=torch.float32, gen=None):
    """A prefilled state: the first token of row 0 is padding, so the sinks and the ring hold an invalid key."""
    k, v = (torch.randn(b, hkv, t, d, generator=gen) for _ in range(2))
    kf = torch.softmax(torch.randn(b, hkv, t, m, generator=gen), -1)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, 0] = False
    k, v, kf = (x.to(DEVICE, dtype) for x in (k, v, kf))
    return prefill_state(k, v, kf, valid.to(DEVICE), **with_spec(window=window, num_sinks=num_sinks, softmax_sinks=softmax_sinks))


def _token(b, hq, hkv, d, m, step, dtype, gen):
    q, k, v = torch.randn(b, hq, 1, d, generator=gen), torch.randn(b, hkv, 1, d, generator=gen), torch.randn(b, hkv, 1, d, generator=gen)
    qf = torch.softmax(torch.randn(b, hq, 1, m, generator=gen), -1)
    kf = torch.softmax(torch.randn(b, hkv, 1, m, generator=gen), -1)
    valid = torch.ones(b, 1, dtype=torch.bool)
    if b > 1 and step == 1:
        valid[1] = False  # a padded step in row 1
    return [x.to(DEVICE, dtype) for x in (q, k, v, qf, kf)], valid.to(DEVICE)


def _weight(kind, b, hq):
    if kind == "float":
        return 0.3
    if kind == "head":
        return torch.rand(hq, device=DEVICE)
    return torch.rand(b, hq, 1, device=DEVICE)  # per row (the dynamic gate)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run_against_reference(monkeypatch, *, mode, rule, placement, b, hq, hkv, d, m, window, prompt, steps,
                           softmax_sinks=0, num_sinks=3, wkind="head", dtype=torch.float32, tol=1e-5):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))  # fresh inputs every run
    ours = _prompt_state(b, hkv, d, m, prompt, window, softmax_sinks=softmax_sinks, num_sinks=num_sinks, dtype=dtype,
                         gen=gen)
    ref = copy.deepcopy(ours)
    weight = _weight(wkind, b, hq)
    kw = with_spec(modes=[mode], scale=d ** -0.5, weight=weight, rule=rule, placement=placement)
    addresses = [t.data_ptr() for t in ours.tensors()]
    for step in range(steps):
        (q, k, v, qf, kf), valid = _token(b, hq, hkv, d, m, step, dtype, gen)
        got = fused.fused_decode_step(ours, q, k, v, qf, kf, valid=valid, **kw)
        assert got is not None, "the fused step refused a case it covers"
        monkeypatch.setenv(fused.FUSED_ENV, "0")
        want = decode_step(ref, q, k, v, qf, kf, valid=valid, **kw)
        monkeypatch.setenv(fused.FUSED_ENV, "1")
        assert got[mode].dtype == q.dtype and got[mode].shape == q.shape
        assert _rel(got[mode], want[mode]) < tol, f"step {step}: output rel err {_rel(got[mode], want[mode]):.2e}"
        now = [t.data_ptr() for t in ours.tensors()]
        if step == 0:  # a deferred fold's pending list is made at the first step (appended to the tensors)
            addresses += now[len(addresses):]
        assert now == addresses, "the state must advance in place"
        assert ours.seen == ref.seen and torch.equal(ours.slot, ref.slot)
        for name in ("buf_valid", "sink_valid", "left_count"):
            a, r = getattr(ours, name), getattr(ref, name)
            assert (a is None and r is None) or torch.equal(a, r), f"step {step}: {name}"
        sums = dict(zip(("S", "z"), linear_sums(ours)))  # with the keys a deferred fold keeps aside
        for name in ("S", "z", "buf_k", "buf_v", "buf_kf", "sink_k", "sink_v", "sink_kf"):
            a, r = sums.get(name, getattr(ours, name)), getattr(ref, name)
            if r is None:
                assert a is None
                continue
            assert _rel(a, r) <= tol, f"step {step}: {name} rel err {_rel(a, r):.2e}"


CASES = [
    # (mode, rule, placement, b, hq, hkv, window, prompt, steps, softmax_sinks, num_sinks, weight)
    ("hybrid", "shared_norm", "complementary", 2, 4, 2, 4, 2, 7, 0, 3, "head"),  # GQA, the ring wraps twice
    ("hybrid", "mix", "complementary", 2, 4, 1, 4, 5, 5, 2, 3, "rows"),  # MQA, softmax sinks, per-row gate
    ("hybrid", "shared_norm", "overlap", 1, 2, 2, 3, 6, 4, 1, 3, "float"),  # MHA, a sink
    ("hybrid", "mix", "overlap", 2, 4, 2, 9, 3, 3, 0, 0, "float"),  # the window never fills; no sink slots
    ("swa_only", "shared_norm", "complementary", 2, 4, 2, 3, 4, 4, 2, 3, "float"),
    ("la_only", "shared_norm", "complementary", 2, 2, 1, 4, 4, 5, 1, 3, "float"),
]


@pytest.mark.parametrize("contract,stages", [("loop", 0), ("dot", 0), ("dot", 2)], ids=["loop", "dot", "dot_staged"])
@pytest.mark.parametrize("d_tiles", [False, True], ids=["full_d", "d_tiles"])
@pytest.mark.parametrize("mode,rule,placement,b,hq,hkv,window,prompt,steps,sinks,num_sinks,wkind", CASES)
def test_fused_steps_match_the_recurrent_step(monkeypatch, mode, rule, placement, b, hq, hkv, window, prompt, steps,
                                              sinks, num_sinks, wkind, d_tiles, contract, stages):
    """full_d: one program per (b, kv head), tiles of 2 rows of S / 2 window keys (the online softmax and the S loop
    take several tiles; 'dot': its least, 16); d_tiles: head_dim in two programs of half the columns (the small-batch
    launch), which share the window's keys, z and the leaving key through the arrival counters. 'loop' meets the heads
    one at a time (head_dim 16, m 8), 'dot' in one tl.dot (head_dim 32 and m 24, so that tiles of 16 split both);
    stages 0 prefetches the next tile of S by hand, 2 leaves the loop to Triton's pipeliner."""
    d, m = (32, 24) if contract == "dot" else (16, 8)
    monkeypatch.setitem(fused.TUNING, "contract", contract)
    monkeypatch.setitem(fused.TUNING, "stages", stages)
    monkeypatch.setitem(fused.TUNING, "min_tile_d", d // 2 if d_tiles else 10**6)
    if not d_tiles:
        monkeypatch.setitem(fused.TUNING, "values_per_thread", 0)  # the least: tiles of 2 (of 16 with 'dot')
    launch = fused.launch_config(b, hkv, hq // hkv, d, m, window - 1, num_sinks, torch.device(DEVICE), torch.float32,
                                 torch.float32)
    assert launch["ND"] == (2 if d_tiles else 1) and launch["DOT"] == (contract == "dot")
    _run_against_reference(monkeypatch, mode=mode, rule=rule, placement=placement, b=b, hq=hq, hkv=hkv, d=d, m=m,
                           window=window, prompt=prompt, steps=steps, softmax_sinks=sinks, num_sinks=num_sinks,
                           wkind=wkind)


@pytest.mark.parametrize("contract,d_tiles,fold_pass", [("loop", False, "inline"), ("loop", True, "after"),
                                                        ("dot", False, "inline"), ("dot", False, "after")])
@pytest.mark.parametrize("mode,rule,placement,b,hq,hkv,window,prompt,steps,sinks,num_sinks,wkind", CASES)
def test_deferred_fold_matches_the_recurrent_step(monkeypatch, mode, rule, placement, b, hq, hkv, window, prompt,
                                                  steps, sinks, num_sinks, wkind, contract, d_tiles, fold_pass):
    """fold_every 3: the leaving keys wait in the state's pending list and enter S, z three at a time (S written as
    the readout reads it, or in a pass of its own); outputs and the linear sums (S, z with the pending keys) equal
    the step that folds every key at once, over 8 steps (two folds, with the ring wrapping and, in the softmax-sink
    cases, sinks that never enter S)."""
    d, m = (32, 24) if contract == "dot" else (16, 8)
    monkeypatch.setitem(fused.TUNING, "contract", contract)
    monkeypatch.setitem(fused.TUNING, "fold_pass", fold_pass)
    monkeypatch.setitem(fused.TUNING, "fold_every", 3)
    monkeypatch.setitem(fused.TUNING, "min_tile_d", d // 2 if d_tiles else 10**6)
    _run_against_reference(monkeypatch, mode=mode, rule=rule, placement=placement, b=b, hq=hq, hkv=hkv, d=d, m=m,
                           window=window, prompt=prompt, steps=8, softmax_sinks=sinks, num_sinks=num_sinks,
                           wkind=wkind)


def test_a_deferred_list_is_folded_where_the_fused_step_stops(monkeypatch):
    """Fused steps leave keys pending; the PyTorch step (switch off) folds them into S, z first (recurrent.fused_step);
    the fused steps after it go on with the state's list (fold_every changed in between does not change a state's),
    all equal to a state that never deferred."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    ours = _prompt_state(2, 2, 16, 8, 6, 4, gen=gen)
    ref = copy.deepcopy(ours)
    kw = with_spec(modes=["hybrid"], scale=0.25, weight=0.4, rule="shared_norm", placement="complementary")
    monkeypatch.setitem(fused.TUNING, "fold_every", 4)
    for step, setting in enumerate(["1", "1", "0", "1", "1", "1", "4to8", "1"]):
        if setting == "4to8":
            monkeypatch.setitem(fused.TUNING, "fold_every", 8)
        monkeypatch.setenv(fused.FUSED_ENV, "1" if setting != "0" else "0")
        (q, k, v, qf, kf), valid = _token(2, 4, 2, 16, 8, step, torch.float32, gen)
        got = decode_step(ours, q, k, v, qf, kf, valid=valid, **kw)["hybrid"]
        monkeypatch.setenv(fused.FUSED_ENV, "0")
        want = decode_step(ref, q, k, v, qf, kf, valid=valid, **kw)["hybrid"]
        assert _rel(got, want) < 1e-5, f"step {step}"
        if setting == "0":  # this step ran unfused, after folding the pending keys: nothing pending
            assert int(ours.pend_count) == 0 and _rel(ours.S, ref.S) < 1e-5
        for a, r in zip(linear_sums(ours), (ref.S, ref.z)):
            assert _rel(a, r) < 1e-5, f"step {step}"
    assert int(ours.pend_count) == 1 and ours.pend_kf.shape[2] == 4  # 4 fused steps since the flush: one fold, one key


@pytest.mark.parametrize("contract", ["loop", "dot"])
def test_head_dim_and_features_not_powers_of_two(monkeypatch, contract):
    """head_dim 24, m 12: the tiles are masked at the edges (the closing writes too), with a deferred fold."""
    monkeypatch.setitem(fused.TUNING, "contract", contract)
    monkeypatch.setitem(fused.TUNING, "fold_every", 2)
    _run_against_reference(monkeypatch, mode="hybrid", rule="mix", placement="overlap", b=2, hq=4, hkv=2, d=24, m=12,
                           window=5, prompt=3, steps=6, softmax_sinks=1, num_sinks=2, wkind="rows")


@pytest.mark.parametrize("contract", ["loop", "dot"])
def test_bf16_state_matches_the_recurrent_step(monkeypatch, contract):
    """A bf16 ring and inputs (the model's case): the kernel widens them to fp32 as the PyTorch step does. (On the GPU
    'dot' multiplies q . k in bf16 itself: the gpu tests below.)"""
    monkeypatch.setitem(fused.TUNING, "contract", contract)
    _run_against_reference(monkeypatch, mode="hybrid", rule="shared_norm", placement="complementary", b=2, hq=4, hkv=2,
                           d=32, m=24, window=4, prompt=5, steps=3, softmax_sinks=1, num_sinks=3, wkind="head",
                           dtype=torch.bfloat16, tol=2e-2)


def test_cases_it_does_not_cover_return_none_and_leave_the_state(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    state = _prompt_state(1, 1, 16, 8, 4, 3, gen=gen)
    (q, k, v, qf, kf), valid = _token(1, 2, 1, 16, 8, 0, torch.float32, gen)
    kw = with_spec(scale=0.25, weight=0.5, rule="shared_norm", placement="complementary")
    before = [t.clone() for t in state.tensors()]
    assert fused.fused_decode_step(state, q, k, v, qf, kf, modes=["hybrid", "la_only"], **kw) is None  # per-head modes
    assert fused.fused_decode_step(state, q, k, v, qf, kf, modes=["sinks_only"], **kw) is None
    assert fused.fused_decode_step(state, q.double(), k, v, qf, kf, modes=["hybrid"], **kw) is None
    assert fused.fused_decode_step(_prompt_state(1, 1, 16, 8, 4, 1, gen=gen), q, k, v, qf, kf, modes=["hybrid"], **kw) is None
    monkeypatch.setenv(fused.FUSED_ENV, "0")
    assert fused.fused_decode_step(state, q, k, v, qf, kf, modes=["hybrid"], **kw) is None
    assert all(torch.equal(a, b) for a, b in zip(state.tensors(), before)) and state.seen == 4
    with pytest.raises(ValueError, match="unknown component mode"):
        fused.fused_decode_step(state, q, k, v, qf, kf, modes=["bogus"], **kw)


def _greedy(model, prompt, mask, new_tokens):
    from transformers import GenerationMixin

    with torch.no_grad():  # HF's own loop on the model's eager forward: every step goes through decode_step
        return GenerationMixin.generate(model, prompt, attention_mask=mask, max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, do_sample=False)


def test_beam_search_reorders_the_pending_list(monkeypatch):
    """Beam search with the deferred fold (fold_every 2): reordering the cache picks the pending keys' rows with the
    rest of the state (HybridState.index_select); the same beams as without the fused step."""
    from transformers import GenerationMixin

    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4)).to(DEVICE)
    prompt = torch.randint(1, 128, (1, 5), device=DEVICE)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5, num_beams=2,
              do_sample=False)
    monkeypatch.setitem(fused.TUNING, "fold_every", 2)
    folds = []
    real = fused.launch_config
    monkeypatch.setattr(fused, "launch_config", lambda *a, **k: folds.append(real(*a, **k)["F"]) or real(*a, **k))
    with torch.no_grad():
        got = GenerationMixin.generate(model, prompt, **kw)
        monkeypatch.setenv(fused.FUSED_ENV, "0")
        want = GenerationMixin.generate(model, prompt, **kw)
    assert folds and set(folds) == {2}  # the fused steps ran, deferring
    assert torch.equal(got, want)


def test_tiny_model_greedy_decode_is_the_same_with_and_without_the_fused_step(monkeypatch):
    """A converted model (GQA, softmax sinks, a left-padded row) decodes the same tokens fused and unfused."""
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4, softmax_sinks=1)).to(DEVICE)
    prompt = torch.randint(1, 128, (2, 5), device=DEVICE)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    calls = []
    real = fused.fused_decode_kernel

    class Counting:  # counts the kernel's launches (the fused path really ran)
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(fused, "fused_decode_kernel", Counting())
    got = _greedy(model, prompt, mask, 6)
    monkeypatch.setenv(fused.FUSED_ENV, "0")
    launches = len(calls)
    want = _greedy(model, prompt, mask, 6)
    assert launches == 2 * 5 and len(calls) == launches  # 2 layers x 5 decode steps, none with the switch off
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------------------------
# GPU: model shapes in bf16, CUDA-graph capture, a converted model
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("rule,placement,sinks", [("shared_norm", "complementary", 0), ("mix", "overlap", 4),
                                                   ("shared_norm", "complementary", 4)])
@pytest.mark.parametrize("shape", [(16, 4, 1, 256, 512), (8, 32, 8, 128, 256),  # Gemma 3 270M, Llama 3 8B heads:
                                   (320, 4, 1, 256, 512), (48, 32, 8, 128, 256)])  # d-tiles; one program per (b, hk)
@pytest.mark.parametrize("variant", [{}, {"contract": "loop", "stages": 0, "num_warps": None}, {"dot_precision": "ieee"},
                                     {"stages": 0, "programs_per_sm": 16}, {"fold_every": 8},
                                     {"fold_every": 16, "contract": "loop", "stages": 2},
                                     {"fold_every": 16, "fold_pass": "after"}],
                         ids=["default", "loop", "ieee", "hand_prefetch_tiles", "deferred", "deferred_loop",
                              "deferred_pass"])
def test_gpu_bf16_model_shapes(monkeypatch, rule, placement, sinks, shape, variant):
    for key, value in variant.items():
        monkeypatch.setitem(fused.TUNING, key, value)
    b, hq, hkv, d, m = shape
    _run_against_reference(monkeypatch, mode="hybrid", rule=rule, placement=placement, b=b, hq=hq, hkv=hkv, d=d, m=m,
                           window=64, prompt=40, steps=30, softmax_sinks=sinks, dtype=torch.bfloat16, tol=2e-2)


def _captured_step(state, q, k, v, qf, kf, kw):
    """One fused step of `state` captured in a CUDA graph on a side stream: (graph, its 'hybrid' output tensor)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fused.fused_decode_step(state, q, k, v, qf, kf, **kw)["hybrid"]
    return graph, out


def _assert_same_state(a, b):
    torch.cuda.synchronize()
    for x, y in zip(a.tensors(), b.tensors()):
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fold_every", [1, 4])
def test_gpu_fused_step_replays_from_a_cuda_graph(monkeypatch, fold_every):
    """A captured fused step, replayed, advances the state exactly as eager fused steps do (counters reset too; with
    the deferred fold, the pending count decides on the device when to fold)."""
    monkeypatch.setitem(fused.TUNING, "fold_every", fold_every)
    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, d, m = 64, 8, 2, 128, 256
    eager = _prompt_state(b, hkv, d, m, 20, 16, softmax_sinks=2, dtype=torch.bfloat16, gen=gen)
    graphed = copy.deepcopy(eager)
    (q, k, v, qf, kf), valid = _token(b, hq, hkv, d, m, 0, torch.bfloat16, gen)
    kw = with_spec(modes=["hybrid"], valid=valid, scale=d ** -0.5, weight=torch.rand(hq, device="cuda"), rule="shared_norm",
              placement="complementary")
    fused.fused_decode_step(graphed, q, k, v, qf, kf, **kw)  # warm-up (compiles), then capture the next step
    graph, out = _captured_step(graphed, q, k, v, qf, kf, kw)
    graphed.seen -= 1  # capture records, it does not run
    fused.fused_decode_step(eager, q, k, v, qf, kf, **kw)
    for _ in range(20):  # the same token again and again: the ring (15 slots) wraps
        want = fused.fused_decode_step(eager, q, k, v, qf, kf, **kw)["hybrid"]
        graph.replay()
        assert torch.equal(out, want)
    _assert_same_state(graphed, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_a_state_first_stepped_in_a_capture_folds_every_step(monkeypatch):
    """fold_every 4, but the state's first step is captured: no pending list is made inside the capture (its zeros
    would replay every step); the state folds every step instead, as an eager fold_every 1 state does."""
    gen = torch.Generator().manual_seed(0)
    b, hq, hkv, d, m = 8, 8, 2, 64, 128
    eager = _prompt_state(b, hkv, d, m, 20, 16, dtype=torch.bfloat16, gen=gen)
    graphed, warm = copy.deepcopy(eager), copy.deepcopy(eager)
    (q, k, v, qf, kf), valid = _token(b, hq, hkv, d, m, 0, torch.bfloat16, gen)
    kw = with_spec(modes=["hybrid"], valid=valid, scale=d ** -0.5, weight=0.3, rule="shared_norm",
                   placement="complementary")
    monkeypatch.setitem(fused.TUNING, "fold_every", 1)
    fused.fused_decode_step(warm, q, k, v, qf, kf, **kw)  # compiles the F = 1 kernel outside the capture
    monkeypatch.setitem(fused.TUNING, "fold_every", 4)
    graph, out = _captured_step(graphed, q, k, v, qf, kf, kw)
    assert graphed.pend_count is None
    monkeypatch.setitem(fused.TUNING, "fold_every", 1)
    for _ in range(6):
        want = fused.fused_decode_step(eager, q, k, v, qf, kf, **kw)["hybrid"]
        graph.replay()
        assert torch.equal(out, want)
    _assert_same_state(graphed, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family,sinks", [("gemma3", 0), ("llama", 2)])
@pytest.mark.parametrize("fold_every", [1, 8])
def test_gpu_converted_model_greedy_decode_fused_equals_unfused(monkeypatch, family, sinks, fold_every):
    """Captured generate (GraphDecoder) with the fused step vs without it: the same tokens (fp32, as the other
    token-for-token tests: bf16 roundings of two summation orders could flip a near-tie of a random model); with
    the deferred fold too (48 tokens: six folds)."""
    monkeypatch.setitem(fused.TUNING, "fold_every", fold_every)
    model = linearize.convert(tiny_model(family), linearize.HybridConfig(window=6, softmax_sinks=sinks)).cuda()
    prompt = torch.randint(1, 128, (2, 11), device="cuda")
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    got = model.generate(prompt, attention_mask=mask, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    assert model.decode_path.path == "captured"
    monkeypatch.setenv(fused.FUSED_ENV, "0")
    want = model.generate(prompt, attention_mask=mask, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("setting,device,interpret,batch,runs", [
    (None, "cuda", False, 1, True), (None, "cuda", False, 1024, True), (None, "cpu", False, 1, False),
    (None, "cpu", True, 1, False), ("1", "cpu", True, 2, True), ("1", "cpu", False, 2, False),
    ("0", "cuda", False, 1, False), ("0", "cuda", False, 1024, False)])
def test_the_switch_runs_the_fused_step_on_cuda_unless_told(monkeypatch, setting, device, interpret, batch, runs):
    """Unset: every CUDA step (the tuned kernel beat the unfused step at every batch measured); '0' never; '1' CPU
    tensors too, under the interpreter only."""
    from types import SimpleNamespace

    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if setting is None:
        monkeypatch.delenv(fused.FUSED_ENV, raising=False)
    else:
        monkeypatch.setenv(fused.FUSED_ENV, setting)
    q = SimpleNamespace(is_cuda=device == "cuda", shape=(batch, 4, 1, 64))  # what the switch reads of q
    assert fused.fused_decode_enabled(q) is runs


def test_auto_tuning_takes_the_large_batch_launch_where_programs_fill_the_sms():
    """TUNING's 'auto' keys follow the step's load (batch rows x KV heads per SM) and head_dim (`decode.BY_LOAD`):
    no deferred fold and 4 warps, 3 stages at batch 1; the fold (F = 16) where the programs fill every SM twice
    over, with 2 warps and 2 stages for 256-wide heads and 4 and 3 for 128-wide ones; a value set by hand wins; a
    state's F follows its own batch."""
    cpu = torch.device("cpu")  # the interpreter's 4 "SMs"

    def launch(b, d, **tuning):
        got = fused.launch_config(b, 1, 4, d, 512, 63, 8, cpu, torch.bfloat16,
                                  tuning={**fused.TUNING, **tuning} if tuning else None)
        return got["num_warps"], got["STAGES"], got["F"]

    assert launch(1, 256) == launch(1, 128) == (4, 3, 1)
    assert launch(64, 256) == (2, 2, 16)
    assert launch(64, 128) == (4, 3, 16)
    assert launch(8, 256) == (2, 2, 16) and launch(7, 256) == (4, 3, 1)  # 2 programs per SM and more
    assert launch(64, 256, num_warps=8, fold_every=1) == (8, 2, 1)

    def state(batch, d):
        return types.SimpleNamespace(pend_kf=None, S=torch.zeros(batch, 1, 4, d))

    assert [fused.fold_every(state(b, d)) for b, d in ((1, 256), (64, 256), (64, 128))] == [1, 16, 16]
