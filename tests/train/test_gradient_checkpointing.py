"""Gradient checkpointing (`stage1.gradient_checkpointing`: each layer's transfer loss; `stage2.gradient_checkpointing`:
each decoder layer): the same loss and gradients as the plain run, far fewer tensors kept for the backward pass, and
a resumed run that ends bit for bit where the plain run does."""

import contextlib
import json

import pytest
import torch
from autograd_memory import kept_bytes
from safetensors.torch import load_file

from linearize import HybridConfig, convert
from linearize.train import finetune, loop, run_recipe, stage1_parts
from linearize.train.ssd import SSDSchedule
from lz_train_helpers import random_data, tiny_llama, tiny_recipe

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def _stage2_model(**hybrid):
    model = tiny_llama(num_hidden_layers=3)
    for p in model.parameters():
        p.requires_grad_(False)
    # rows of 6 chunks take the chunked path; sinks and the dynamic gate add the softmax merge and a trained gate
    convert(model, HybridConfig(window=8, chunk_size=8, softmax_sinks=2, combine="mix", mix_gate="dynamic", **hybrid))
    peft_model, params = finetune.add_lora(model, LORA, train_feature_maps=True, train_mixing=True)
    model.train()
    return model, params, peft_model


def _loss_and_grads(model, params, rows, ssd, checkpointed: bool, objective: str = "lm", peft_model=None):
    for p in params.values():
        p.grad = None
    loss_fn = finetune.finetune_loss_fn(model, chunk=16, ssd=ssd, objective=objective,
                                       peft_model=peft_model)
    ctx = {"step": 0, "micro": 0, "epoch": 0, "total_steps": 4, "rows_per_step": len(rows),
           "positions": torch.arange(len(rows))}
    if checkpointed:
        with finetune.layer_checkpointing(model):
            loss, _ = loss_fn(rows, ctx)
            loss.backward()  # after loss_fn returned: SSD has cleared its draws, the recomputation must not see that
    else:
        loss, _ = loss_fn(rows, ctx)
        loss.backward()
    # a layer that dropped its window leaves its gate unused (no gradient): as the loop does, that is a zero
    return loss.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize("granularity, state, objective", [("layer", "sum", "lm"), ("sample", "delta", "lm"),
                                                             ("layer", "delta", "kl")])
def test_checkpointed_layers_give_the_same_loss_and_gradients(granularity, state, objective):
    """(kl: the teacher's forward, without gradients, runs through the checkpointed layers too)"""
    model, params, peft_model = _stage2_model(linear_state=state)
    rows = random_data(rows=2, seq_len=48, seed=3).train
    ssd = SSDSchedule(schedule=[(0.0, 0.5)], granularity=granularity, seed=2)
    drops = ssd.draw(0.5, 0, 3, 2)[:3 if granularity == "layer" else 2]
    assert drops.any() and not drops.all()  # some layers (rows) drop the window, others keep it: modes differ
    plain_loss, plain = _loss_and_grads(model, params, rows, ssd, checkpointed=False, objective=objective,
                                        peft_model=peft_model)
    loss, grads = _loss_and_grads(model, params, rows, ssd, checkpointed=True, objective=objective,
                                    peft_model=peft_model)
    assert torch.equal(loss, plain_loss)
    assert plain.keys() == grads.keys() and any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-6, atol=1e-9, msg=name)
    # the layers are whole again: no forward of ours left on them
    assert all("forward" not in vars(layer) for layer in model.get_decoder().layers)




def test_checkpointed_layers_keep_a_fraction_of_the_activations():
    model, _, _ = _stage2_model()
    rows = random_data(rows=2, seq_len=48, seed=3).train
    plain = kept_bytes(lambda: finetune.lm_loss(model, rows, chunk=16))
    with finetune.layer_checkpointing(model):
        checkpointed = kept_bytes(lambda: finetune.lm_loss(model, rows, chunk=16))
        with torch.no_grad():  # validation: the layers run as they are
            assert torch.equal(finetune.lm_loss(model, rows, chunk=16), finetune.lm_loss(model.eval(), rows, chunk=16))
    assert checkpointed < plain / 10, (checkpointed, plain)


@pytest.mark.parametrize("objective, state", [("hybrid_output", "delta"), ("weights", "sum")])
def test_recomputed_transfer_losses_give_the_same_loss_and_gradients(objective, state):
    model = tiny_llama(num_hidden_layers=3)
    convert(model, HybridConfig(window=8, chunk_size=8, softmax_sinks=2, combine="mix", mix_gate="dynamic",
                                linear_state=state))
    rows = random_data(rows=2, seq_len=48, seed=3).train
    runs = []
    for recompute in (False, True):
        params, xfer, _ = stage1_parts(model, {"objective": objective, "train_mixing": True, "query_block": 16,
                                               "gradient_checkpointing": recompute})
        for p in params.values():
            p.grad = None
        losses = []
        with xfer:
            kept = kept_bytes(lambda: losses.append(xfer.loss(rows)))
            losses[0].backward()
        # the 'weights' objective never reads the gate: no gradient, a zero as in the loop
        runs.append((losses[0].detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                          for n, p in params.items()}, kept))
    (plain_loss, plain, plain_kept), (loss, grads, kept) = runs
    assert torch.equal(loss, plain_loss)
    assert any(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-6, atol=1e-9, msg=name)
    assert kept < plain_kept / 2, (kept, plain_kept)


SETS = tiny_recipe(**{"stage2.ssd.granularity": "layer", "stage1.max_steps": 2, "stage1.checkpoint_every": 1,
                      "stage2.max_steps": 4})


def _weights(out):
    return load_file(str(out / "model.safetensors"))


def test_resume_with_checkpointing_ends_where_the_plain_run_ends(tmp_path):
    plain = tmp_path / "plain"
    run_recipe(tiny_llama(), "ssd", plain, overrides=SETS, data=random_data())
    out = tmp_path / "run"
    with pytest.raises(loop.RunInterrupted):  # killed after stage 1's first step, then resumed with checkpointing on
        run_recipe(tiny_llama(), "ssd", out, overrides=SETS, data=random_data(), interrupt_after=1)
    on = ["stage1.gradient_checkpointing=true", "stage2.gradient_checkpointing=true"]
    run_recipe(tiny_llama(), None, out, overrides=on, data=random_data(), resume=True)
    ref, got = _weights(plain), _weights(out)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    changes = [json.loads(line).get("changes") for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"stage1.gradient_checkpointing": [False, True], "stage2.gradient_checkpointing": [False, True]} in changes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_of_a_qwen_shaped_stage2_step(capsys):
    """Qwen2.5-1.5B's layer shape (hidden 1536, MLP 8960, 12 heads, 2 KV heads, head_dim 128), 4 layers, 2 rows of 4096
    tokens, bf16 autocast, the conversion of gpu_long_qwen.sh: the step's peak memory above the weights falls by more
    than half with every layer checkpointed, and the gradients stay those of the plain step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=4096, hidden_size=1536, intermediate_size=8960, num_hidden_layers=4,
                                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=8192))
    for p in model.parameters():
        p.requires_grad_(False)
    convert(model, HybridConfig(window=512, softmax_sinks=8, combine="mix", mix_gate="dynamic", linear_state="delta",
                                feature_size="half"))
    model.cuda()
    _, params = finetune.add_lora(model, LORA, train_mixing=True)
    model.train()
    rows = torch.randint(0, 4096, (2, 4096), device="cuda")
    peaks, grads = {}, {}
    for checkpointed in (False, True, False):  # plain once more at the end: its peak without first-call allocations
        for p in params.values():
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with finetune.layer_checkpointing(model) if checkpointed else contextlib.nullcontext():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = finetune.lm_loss(model, rows)
            loss.backward()
        torch.cuda.synchronize()
        peaks[checkpointed] = torch.cuda.max_memory_allocated() - base
        grads[checkpointed] = {n: p.grad.float().clone() for n, p in params.items() if p.grad is not None}
    with capsys.disabled():
        print(f"\nstage-2 step, 4 Qwen-shaped layers, 2 x 4096 tokens: peak above the weights "
              f"{peaks[False] / 2**30:.2f} GiB plain, {peaks[True] / 2**30:.2f} GiB with layer checkpointing")
    assert peaks[True] < peaks[False] / 2
    assert grads[True].keys() == grads[False].keys()
    for name, want in grads[False].items():
        torch.testing.assert_close(grads[True][name], want, rtol=1e-3, atol=1e-3 * float(want.abs().max()), msg=name)
