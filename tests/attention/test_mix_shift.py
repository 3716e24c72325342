"""`HybridConfig.mix_shift`: a training-free move of a trained mix gate towards the window (> 0) or the linear
branch (< 0), g = sigmoid(logit + shift), on every path that reads the gate (full forward, cached decoding)."""

from __future__ import annotations

import pytest
import torch

import linearize
from linearize import HybridConfig
from linearize.models.convert import CONFIG_KEY, hybrid_modules
from tests.tiny_models import converted_off_init, tiny_model

MIX = dict(window=4, combine="mix", softmax_sinks=1, init_noise=0.0)


def _gated(gate: str, seed: int = 0):
    torch.manual_seed(seed)
    model = converted_off_init("llama", HybridConfig(**MIX, mix_gate=gate, mix_value=0.6))
    with torch.no_grad():  # a gate that depends on the token (dynamic) and differs per head
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or name.endswith("gate.bias") or name.endswith("gate_logit"):
                p.add_(0.5 * torch.randn_like(p))
    return model


def _logits(model, ids, mode="hybrid"):
    with torch.no_grad(), linearize.components(model, mode):
        return model(ids).logits.float()


@pytest.mark.parametrize("gate", ["learned", "dynamic"])
def test_shift_moves_the_gate_by_its_logit(gate):
    model = _gated(gate)
    layer = hybrid_modules(model)[0]
    hidden = torch.randn(2, 24, model.config.hidden_size)
    logit = layer.gate_logit if gate == "learned" else layer.gate(hidden).transpose(1, 2)
    torch.testing.assert_close(layer.mixing_weight(hidden), torch.sigmoid(logit))
    linearize.set_hybrid(model, mix_shift=1.5)
    torch.testing.assert_close(layer.mixing_weight(hidden), torch.sigmoid(logit + 1.5))
    assert model.config.__dict__[CONFIG_KEY]["mix_shift"] == 1.5  # recorded with the model (saved with it)


@pytest.mark.parametrize("gate", ["learned", "dynamic"])
def test_shift_interpolates_between_the_linear_branch_and_the_window(gate):
    model = _gated(gate)
    ids = torch.randint(1, 128, (2, 24))
    swa = _logits(model, ids, mode="swa_only")
    trained = _logits(model, ids)
    linearize.set_hybrid(model, mix_shift=30.0)  # g -> 1: the window (and sinks) alone
    torch.testing.assert_close(_logits(model, ids), swa, atol=1e-4, rtol=1e-4)
    linearize.set_hybrid(model, mix_shift=0.0)
    torch.testing.assert_close(_logits(model, ids), trained)
    linearize.set_hybrid(model, mix_shift=-2.0)
    assert (_logits(model, ids) - trained).abs().max() > 1e-3  # the linear branch weighs more: another output


@pytest.mark.parametrize("gate", ["learned", "dynamic"])
def test_cached_decoding_with_a_shift_equals_the_full_forward(gate):
    model = _gated(gate, seed=1)
    linearize.set_hybrid(model, mix_shift=0.7, backend="torch")
    ids = torch.randint(1, 128, (1, 20))
    full = _logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :12], use_cache=True)
        steps = [out.logits[:, -1].float()]
        cache = out.past_key_values
        for t in range(12, 20):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[:, -1].float())
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 11:19], atol=2e-4, rtol=2e-4)


def test_a_shift_needs_a_learned_or_dynamic_mix_gate():
    with pytest.raises(ValueError, match="mix_shift"):
        HybridConfig(combine="shared_norm", mix_shift=1.0)
    with pytest.raises(ValueError, match="mix_shift"):
        HybridConfig(combine="mix", mix_gate="fixed", mix_shift=1.0)
    model = _gated("dynamic")
    with pytest.raises(ValueError, match="mix_shift"):
        linearize.set_hybrid(linearize.convert(tiny_model("llama"), HybridConfig(window=4)), mix_shift=1.0)
    linearize.set_hybrid(model, mix_shift=-1.0)  # computation only: allowed on a trained conversion
