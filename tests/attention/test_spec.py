"""The component-mode registry and the attention spec: the backends read a mode's fields (a new entry needs no code),
the layer's spec follows its settings, and one function picks the backend."""

import dataclasses

import pytest
import torch

import linearize
from linearize.attention import module as attention_module
from linearize.attention.chunked import hybrid_attention_chunked
from linearize.attention.module import choose_backend
from linearize.attention.recurrent import decode_step, prefill_state
from linearize.attention.reference import hybrid_attention_reference
from linearize.attention.spec import AttentionSpec
from linearize.config import COMPONENT_MODES, MODES, ComponentMode, component_mode
from linearize.evaluate.diagnose import PAPER_LABELS
from linearize.models.convert import hybrid_modules, set_hybrid
from test_implementations import D, make_inputs
from tiny_models import tiny_model


@pytest.mark.parametrize("name", ["hybrid", "swa_only", "la_only", "sinks_only", "none"])
@pytest.mark.parametrize("settings", [{}, {"placement": "overlap", "rule": "mix"}, {"softmax_sinks": 2},
                                      {"sparse_memory": 2, "memory_block": 4}])
def test_a_new_entry_with_the_same_fields_computes_the_same_in_every_backend(name, settings):
    """An entry under another name, never registered, passed straight to the backends: the same numbers as the
    registered mode with its fields (the backends branch on fields, not names)."""
    twin = dataclasses.replace(MODES[name], name=f"{name}_twin", kernel_code=None, paper_label="twin")
    t, prompt = 17, 6
    q, k, v, fq, fk, valid, weight = make_inputs(t)
    qf, kf = fq(q), fk(k)
    spec = AttentionSpec(scale=D**-0.5, window=4, num_sinks=3, chunk_size=8, **settings)
    with torch.no_grad():
        for fn in (hybrid_attention_reference, hybrid_attention_chunked):
            want = fn(q, k, v, qf, kf, spec=spec, mode=name, weight=weight, valid=valid)
            assert torch.equal(fn(q, k, v, qf, kf, spec=spec, mode=twin, weight=weight, valid=valid), want), fn.__name__
        states = [prefill_state(k[:, :, :prompt], v[:, :, :prompt], kf[:, :, :prompt], valid[:, :prompt], spec=spec)
                  for _ in range(2)]
        for i in range(prompt, t):
            s = slice(i, i + 1)
            args = (q[:, :, s], k[:, :, s], v[:, :, s], qf[:, :, s], kf[:, :, s])
            named = decode_step(states[0], *args, spec=spec, modes=[name], weight=weight, valid=valid[:, s])[name]
            other = decode_step(states[1], *args, spec=spec, modes=[twin], weight=weight, valid=valid[:, s])[twin]
            assert torch.equal(other, named)


def test_the_registry_defines_names_labels_and_lags():
    assert COMPONENT_MODES == tuple(MODES) and all(MODES[n].name == n for n in MODES)
    assert set(PAPER_LABELS) == {"base", *COMPONENT_MODES}
    assert component_mode(MODES["la_only"]) is MODES["la_only"]
    lags = {n: (m.linear_lag("complementary", 5), m.linear_lag("overlap", 5)) for n, m in MODES.items()}
    assert lags == {"hybrid": (5, 0), "swa_only": (None, None), "la_only": (0, 0), "sinks_only": (None, None),
                    "none": (None, None)}
    with pytest.raises(ValueError, match="unknown component mode 'nope'"):
        component_mode("nope")
    with pytest.raises(ValueError, match="runs alone"):
        ComponentMode("bad", uses_window=True, uses_linear=False, paper_label="x", uses_sinks=True)


def test_the_layer_spec_follows_its_settings():
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=6, softmax_sinks=2, combine="mix"))
    layer = hybrid_modules(model)[0]
    assert layer.spec == AttentionSpec(scale=layer.scale, window=6, rule="mix", softmax_sinks=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.spec.window = 3
    set_hybrid(model, window=3, placement="overlap")
    assert (layer.spec.window, layer.spec.placement) == (3, "overlap")


def test_one_function_picks_the_backend(monkeypatch):
    short, long_ = torch.zeros(1, 2, 16, 8), torch.zeros(1, 2, 17, 8)  # DENSE_UP_TO_CHUNKS * chunk 4 = 16
    spec = AttentionSpec(scale=1.0, window=4, chunk_size=4)
    hybrid, la_only = MODES["hybrid"], MODES["la_only"]
    assert choose_backend(spec, short, hybrid).backend == "reference"
    assert choose_backend(spec, long_, hybrid).backend == "torch"
    assert choose_backend(dataclasses.replace(spec, sparse_memory=2), short, hybrid).backend == "torch"
    assert choose_backend(dataclasses.replace(spec, backend="reference"), long_, hybrid).backend == "reference"
    assert choose_backend(spec, short).backend == "torch"  # decoding off CUDA
    # where Triton is available: 16-bit inputs take it, except where the softmax branch holds sinks or memory
    monkeypatch.setattr(attention_module, "_triton_available", lambda x: True)
    half = short.to(torch.float16)
    sinks = dataclasses.replace(spec, softmax_sinks=2)
    assert choose_backend(spec, half, hybrid) == ("triton", "chunked", None)
    assert choose_backend(sinks, half, hybrid).backend == "reference"
    assert choose_backend(sinks, half, la_only).backend == "triton"  # la_only has no softmax branch
    assert choose_backend(spec, short, hybrid).backend == "torch"  # fp32 without autocast: PyTorch
    assert choose_backend(spec, half).backend == "triton" and choose_backend(sinks, half).backend == "torch"
    assert choose_backend(dataclasses.replace(spec, linear_state="gated"), half, hybrid).backend != "triton"
