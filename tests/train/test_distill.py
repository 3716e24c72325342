"""Stage 2 as self-distillation: the `kl` objective against the base model computed inside the converted one
(`finetune.base_teacher`), and stage 2 without LoRA (the base's weights, and so its softmax branch, untouched)."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from linearize import HybridConfig, convert
from linearize.attention.module import hybrid_param_kind
from linearize.train import finetune, loop, run_recipe
from linearize.train.recipes import RecipeError, load_recipe
from lz_train_helpers import random_data, tiny_gemma3, tiny_llama, tiny_recipe

DELTA = dict(window=4, chunk_size=8, combine="mix", mix_gate="dynamic", linear_state="delta")


def _converted(make, **hybrid):
    base = make()
    model = copy.deepcopy(base)
    convert(model, HybridConfig(**{**DELTA, **hybrid}))
    return base, model


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_base_teacher_is_the_base_model_even_with_lora_on(make):
    """Inside base_teacher the converted model's hidden states are the unconverted model's (Gemma: its local layers
    keep their own window), also with LoRA adapters that change q/k/v/o (switched off for the teacher)."""
    base, model = _converted(make)
    peft_model, _ = finetune.add_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0,
                                              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the model
    ids = random_data(rows=2, seq_len=24).val
    with torch.no_grad():
        want = base.get_decoder()(input_ids=ids).last_hidden_state
        with finetune.base_teacher(model, peft_model):
            got = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        student = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (student - want).abs().max() > 1e-2  # the student differs: the comparison can fail
    assert all(m.transfer_hook is None for m in finetune.hybrid_modules(model))  # hooks removed on exit


def test_chunked_kl_loss_and_its_gradients_equal_the_full_logits_kl():
    """kl_loss = mean over predicted positions of KL(base || converted), from whole logits; the gradients of the
    feature maps, the delta rule's beta and the gate equal those of that plain computation (fp32, random inputs)."""
    base, model = _converted(tiny_llama)
    _, params = finetune.add_lora(model, {"enabled": False}, train_feature_maps=True, train_mixing=True)
    assert {hybrid_param_kind(n) for n in params} == {"feature_map", "linear_state", "mixing"}
    ids = random_data(rows=3, seq_len=20, seed=1).val
    with torch.no_grad():
        teacher_logp = F.log_softmax(base(input_ids=ids).logits[:, :-1].float(), -1)
    student_logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
    want = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()
    want_grads = torch.autograd.grad(want, list(params.values()))
    got = finetune.kl_loss(model, ids, chunk=7)
    got_grads = torch.autograd.grad(got, list(params.values()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert float(got.detach()) > 1e-4  # the models differ: the comparison can fail
    for name, g, w in zip(params, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7, msg=name)
    assert any(w.abs().sum() > 0 for w in want_grads)


def test_kl_is_zero_where_the_converted_model_is_the_base():
    """A window covering the rows with the linear branch off is the base model: the KL is 0."""
    from linearize import components

    _, model = _converted(tiny_llama, window=64)
    ids = random_data(rows=2, seq_len=32).val
    with torch.no_grad(), components(model, "swa_only"):
        assert abs(float(finetune.kl_loss(model, ids, chunk=16))) < 1e-6
    with torch.no_grad():
        _, small = _converted(tiny_llama, window=4)
        assert float(finetune.kl_loss(small, ids, chunk=16)) > 1e-3


def test_distillation_without_lora_lowers_the_kl_and_leaves_every_base_weight_as_it_was(tmp_path):
    from accelerate import Accelerator

    base, model = _converted(tiny_llama)
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model, params = finetune.add_lora(model, {"enabled": False}, train_feature_maps=True, train_mixing=True)
    assert peft_model is None and params
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in params}
    data = random_data(rows=8, seq_len=32)
    with torch.no_grad():
        before = float(finetune.kl_loss(model, data.val))
    spec = loop.LoopSpec(name="stage2", lr=1e-2, batch_size=4, grad_accum=1, epochs=100, max_steps=10,
                         checkpoint_every=100)
    loop.Trainer(model=model, params=params, data=data.train, spec=spec, ckpt_dir=tmp_path,
                 loss_fn=finetune.finetune_loss_fn(model, chunk=16, objective="kl"), accelerator=Accelerator(cpu=True),
                 log=loop.JsonlLog(None), show_progress=False).run()
    with torch.no_grad():
        after = float(finetune.kl_loss(model, data.val))
    assert after < 0.8 * before, (before, after)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


SETS = tiny_recipe(**{"hybrid.combine": "mix", "hybrid.mix_gate": "dynamic", "hybrid.linear_state": "delta",
                      "stage1.objective": "hybrid_output", "stage2.objective": "kl", "stage2.lora.enabled": "false",
                      "stage2.train_feature_maps": "true", "stage2.train_mixing": "true", "stage2.lr": "1e-3"})


def test_a_distillation_run_saves_the_base_weights_unchanged_and_resumes_exactly(tmp_path):
    """The `kl` objective without LoRA through the whole driver: no adapter saved, every weight the base had saved
    as it was, and a run killed in stage 2 resumes to the same weights and losses as the uninterrupted one."""
    base = tiny_llama()
    ref = tmp_path / "ref"
    summary = run_recipe(tiny_llama(), "ssd", ref, overrides=SETS, data=random_data())
    assert not (ref / "adapter").exists()
    saved = load_file(str(ref / "model.safetensors"))
    for name, p in base.state_dict().items():
        key = name if name in saved else next(k for k in saved if k.endswith(name))
        assert torch.equal(saved[key], p), name
    assert any(hybrid_param_kind(k) for k in saved)  # the trained hybrid parameters are saved beside them
    losses = [json.loads(line) for line in (ref / "train_log.jsonl").read_text().splitlines()]
    stage2 = [r["loss"] for r in losses if r.get("stage") == "stage2" and "loss" in r]
    assert stage2 and all(v >= 0 for v in stage2)  # a KL, not a cross-entropy of the data

    out = tmp_path / "cut"
    with pytest.raises(loop.RunInterrupted):
        run_recipe(tiny_llama(), "ssd", out, overrides=SETS, data=random_data(), interrupt_after=6)
    again = run_recipe(tiny_llama(), "ssd", out, data=random_data(), resume=True)
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == saved.keys()
    for name in saved:
        assert torch.equal(got[name], saved[name]), name
    assert again["val"] == summary["val"]


@pytest.mark.parametrize("sets, message", [
    (["stage2.objective=mse"], "stage2.objective"),
    (["stage2.lora.enabled=false", "stage2.train_feature_maps=false", "stage2.train_mixing=false"],
     "stage2 trains nothing"),
])
def test_bad_stage2_settings_are_refused(sets, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("ssd", sets)


def test_lora_settings_are_not_checked_when_lora_is_off():
    r = load_recipe("ssd", ["stage2.lora.enabled=false", "stage2.lora.target_modules=[]", "stage2.train_mixing=true"])
    assert r["stage2"]["lora"]["enabled"] is False and r["stage2"]["objective"] == "lm"
