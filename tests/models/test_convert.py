"""Conversion of every supported family: with swa_only and a window covering the sequence, logits are the base's."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import linearize
from linearize.attention.module import HybridAttention
from linearize.errors import UnsupportedArchitectureError
from tiny_models import FAMILIES, tiny_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("combine", ["shared_norm", "mix"])
def test_swa_only_full_window_reproduces_base_logits(family, combine):
    model = tiny_model(family)
    ids = torch.randint(1, 128, (2, 48))
    with torch.no_grad():
        base = model(ids).logits
    linearize.convert(model, linearize.HybridConfig(window=64, combine=combine))
    assert len([m for m in model.modules() if isinstance(m, HybridAttention)]) == model.config.num_hidden_layers
    with torch.no_grad(), linearize.components(model, "swa_only"):
        converted = model(ids).logits
    assert (converted - base).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_linear_branch_changes_output_beyond_the_window(family):
    model = tiny_model(family)
    ids = torch.randint(1, 128, (1, 40))
    linearize.convert(model, linearize.HybridConfig(window=8))
    with torch.no_grad():
        hybrid = model(ids).logits
        with linearize.components(model, "swa_only"):
            swa = model(ids).logits
    assert torch.allclose(hybrid[:, :8], swa[:, :8], atol=1e-5)  # no key older than the window yet
    assert (hybrid[:, 8:] - swa[:, 8:]).abs().max() > 1e-3


def test_unsupported_architecture_lists_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="llama.*mistral"):
        linearize.convert(model)


def test_global_layers_only_and_layer_lists():
    model = tiny_model("gemma3")
    linearize.convert(model, linearize.HybridConfig(layers="global"))
    converted = [m.layer_idx for m in model.modules() if isinstance(m, HybridAttention)]
    assert converted == [2]
    model = tiny_model("llama")
    linearize.convert(model, layers=[1])
    assert [m.layer_idx for m in model.modules() if isinstance(m, HybridAttention)] == [1]
    with pytest.raises(ValueError, match="already converted"):
        linearize.convert(model, layers=[1])
    with pytest.raises(ValueError, match="out of range"):
        linearize.convert(tiny_model("llama"), layers=[7])


def test_components_context_restores_and_validates():
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4))
    ids = torch.randint(1, 128, (1, 20))
    with torch.no_grad():
        before = model(ids).logits
        with linearize.components(model, "none"):
            none = model(ids).logits
        after = model(ids).logits
    assert torch.equal(before, after) and not torch.allclose(before, none)
    with pytest.raises(ValueError, match="unknown component mode"):
        with linearize.components(model, "bogus"):
            pass
    with pytest.raises(ValueError, match="not converted"):
        with linearize.components(model, {5: "none"}):
            pass
    assert all(m.mode == "hybrid" and m.head_modes is None for m in model.modules() if isinstance(m, HybridAttention))


def test_per_layer_and_per_head_modes():
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4))
    ids = torch.randint(1, 128, (1, 20))
    with torch.no_grad():
        with linearize.components(model, {0: {h: "none" for h in range(4)}, 1: "none"}):
            heads = model(ids).logits
        with linearize.components(model, "none"):
            whole = model(ids).logits
        with linearize.components(model, {0: {1: "la_only"}}):
            one_head = model(ids).logits
        base = model(ids).logits
    torch.testing.assert_close(heads, whole)
    assert not torch.allclose(one_head, base)


def test_ssd_hook_replaces_hybrid_by_la_only():
    model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4))
    ids = torch.randint(1, 128, (2, 20))
    modules = [m for m in model.modules() if isinstance(m, HybridAttention)]
    with torch.no_grad():
        with linearize.components(model, "la_only"):
            la = model(ids).logits
        hybrid = model(ids).logits
        for m in modules:
            m.drop_swa = True
        dropped = model(ids).logits
        for m in modules:
            m.drop_swa = torch.tensor([True, False])
        per_sample = model(ids).logits
    torch.testing.assert_close(dropped, la)
    torch.testing.assert_close(per_sample[0], la[0])
    torch.testing.assert_close(per_sample[1], hybrid[1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_auto_backend_takes_the_dense_path_for_short_rows_and_the_chunked_path_for_long_ones(family, monkeypatch):
    import linearize.attention.module as module

    chunked_lengths = []
    real_chunked = module.hybrid_attention_chunked

    def spy(q, *args, **kwargs):
        chunked_lengths.append(q.shape[2])
        return real_chunked(q, *args, **kwargs)

    monkeypatch.setattr(module, "hybrid_attention_chunked", spy)
    chunk = 8
    threshold = module.DENSE_UP_TO_CHUNKS * chunk
    ids = torch.randint(1, 128, (2, threshold + 9))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in one row
    for mode in ("hybrid", "swa_only", "la_only", "sinks_only"):
        logits = {}
        for backend in ("auto", "reference"):
            model = tiny_model(family)
            linearize.convert(model, linearize.HybridConfig(window=6, chunk_size=chunk, backend=backend))
            with torch.no_grad(), linearize.components(model, mode):
                logits[backend] = model(ids, attention_mask=mask).logits
                short = model(ids[:, :threshold]).logits
            if backend == "auto":
                assert set(chunked_lengths) == {ids.shape[1]}, "long rows chunked, short rows dense"
                chunked_lengths.clear()
                assert torch.isfinite(short).all()
        assert chunked_lengths == []
        assert (logits["auto"] - logits["reference"]).abs().max().item() < 1e-4, mode


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_none_mode_ignores_everything_attention_trains(family):
    """With no attention only embeddings, norms, MLPs and o_proj's bias act: the `none` score is the same for every
    recipe (their feature maps, mixing weights and q/k/v/o LoRA all sit inside attention)."""
    model = tiny_model(family)
    linearize.convert(model, linearize.HybridConfig(window=8))
    ids = torch.randint(1, 128, (2, 32))
    with torch.no_grad(), linearize.components(model, "none"):
        before = model(ids).logits
        for layer in linearize.models.convert.hybrid_modules(model):
            for name, p in layer.named_parameters():
                if name != "o_proj.bias":
                    p.add_(torch.randn_like(p))
        after = model(ids).logits
        with linearize.components(model, "hybrid"):
            changed = model(ids).logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, changed)


def test_mixing_report_reads_the_gates_where_they_ended():
    from linearize.models.convert import hybrid_modules, mixing_report

    ids = torch.randint(1, 128, (2, 24))
    fixed = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4, combine="mix"))
    assert mixing_report(fixed, ids) is None  # nothing to learn

    learned = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4, combine="mix", mix_gate="learned"))
    with torch.no_grad():
        hybrid_modules(learned)[1].gate_logit[0] = 2.0
    report = mixing_report(learned)
    assert report["layers"]["1"][0] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), abs=1e-4)
    assert report["layers"]["0"] == [0.5] * learned.config.num_attention_heads and report["max"] > 0.88

    dynamic = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4, combine="mix", mix_gate="dynamic"))
    with pytest.raises(ValueError, match="input_ids"):
        mixing_report(dynamic)
    gate = hybrid_modules(dynamic)[0].gate
    with torch.no_grad():
        gate.weight.normal_()
    seen = []
    gate.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    report = mixing_report(dynamic, ids)
    with torch.no_grad():  # the gate's own inputs, through the gate again, by hand
        g = torch.sigmoid(seen[0] @ gate.weight.T + gate.bias).flatten(0, 1)
    assert report["layers"]["0"] == pytest.approx([round(x, 4) for x in g.mean(0).tolist()], abs=2e-4)
    assert report["token_std"]["0"] == pytest.approx([round(x, 4) for x in g.std(0).tolist()], abs=2e-4)
    assert report["layers"]["1"] == [0.5] * dynamic.config.num_attention_heads  # untouched: w = 0


def test_set_hybrid_changes_computation_settings_and_refuses_structural_ones(tmp_path):
    """A trained conversion can be evaluated with another window (or any computation-only option) without retraining;
    the setting is saved with the model; a field that decides the parameters cannot change."""
    ids = torch.randint(1, 128, (1, 24))
    with torch.no_grad():
        base = tiny_model("llama")(ids).logits
        model = linearize.convert(tiny_model("llama"), linearize.HybridConfig(window=4))
        with linearize.components(model, "swa_only"):
            narrow = model(ids).logits
            linearize.set_hybrid(model, window=64)  # now covers the 24 tokens: softmax attention again
            wide = model(ids).logits
    assert not torch.allclose(narrow, base, atol=1e-3)
    torch.testing.assert_close(wide, base, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    assert linearize.hybrid_config_of(linearize.load(tmp_path)).window == 64
    with pytest.raises(ValueError, match="parameters"):
        linearize.set_hybrid(model, combine="mix")
    for field, value in (("linear_state", "gated"), ("decay_init", 0.9), ("delta_beta_init", 0.3)):
        with pytest.raises(ValueError, match="parameters"):  # the gated / delta state's own layers and their init
            linearize.set_hybrid(model, **{field: value})
    with pytest.raises(ValueError, match="window"):
        linearize.set_hybrid(model, window=0)
