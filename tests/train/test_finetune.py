"""Stage 2: chunked LM loss, LoRA, validation per component, early stopping."""

import json

import torch

from linearize import HybridConfig, convert
from linearize.train import finetune, loop, run_recipe
from lz_train_helpers import random_data, tiny_gemma3, tiny_llama, tiny_recipe


def test_chunked_lm_loss_equals_full_logits_loss():
    model = tiny_gemma3()
    ids = random_data(rows=3, seq_len=20).train
    with torch.no_grad():
        full = model(input_ids=ids, labels=ids).loss
        chunked = finetune.lm_loss(model, ids, chunk=7)
    assert torch.allclose(full, chunked, atol=1e-5)


def test_lora_trains_only_adapters_and_lowers_the_loss(tmp_path):
    from accelerate import Accelerator

    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    convert(model, HybridConfig(window=4, chunk_size=8))
    peft_model, params = finetune.add_lora(model, {"r": 8, "alpha": 16, "dropout": 0.0,
                                                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]})
    assert params and all("lora_" in n for n in params)
    assert {n.split(".")[-4] for n in params} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    data = random_data(rows=8, seq_len=32)
    before = finetune.validation_losses(model, data.val)
    assert set(before) == {"hybrid", "swa_only", "la_only"}
    spec = loop.LoopSpec(name="stage2", lr=3e-3, batch_size=4, grad_accum=1, epochs=100, max_steps=10, checkpoint_every=100)
    loop.Trainer(model=model, params=params, data=data.train, loss_fn=finetune.finetune_loss_fn(model, chunk=16),
                 spec=spec, ckpt_dir=tmp_path, accelerator=Accelerator(cpu=True), log=loop.JsonlLog(None),
                 show_progress=False).run()
    after = finetune.validation_losses(model, data.val)
    assert after["hybrid"] < before["hybrid"] - 0.05, (before, after)


def test_early_stopping_restores_the_best_checkpoint(tmp_path):
    from accelerate import Accelerator

    net = torch.nn.Linear(4, 1)
    params = dict(net.named_parameters())
    data = torch.arange(64).view(16, 4)
    vals = iter([3.0, 2.0, 2.5, 2.7, 2.9, 1.0])  # best at the 2nd validation (step 4), then 2 worse -> stop
    snapshots = {}

    def eval_fn(step):
        snapshots[step] = {n: p.detach().clone() for n, p in params.items()}
        return {"hybrid": next(vals)}

    def loss_fn(batch, ctx):
        return (net(batch.float() / 64) - 1).pow(2).mean(), {}

    spec = loop.LoopSpec(name="stage2", lr=1e-2, batch_size=2, grad_accum=1, epochs=100, max_steps=40, checkpoint_every=100,
                         eval_every=2, early_stopping={"enabled": True, "patience": 2, "metric": "hybrid"})
    log = loop.JsonlLog(tmp_path / "log.jsonl")
    result = loop.Trainer(model=net, params=params, data=data, loss_fn=loss_fn, spec=spec, ckpt_dir=tmp_path,
                          accelerator=Accelerator(cpu=True), log=log, eval_fn=eval_fn, show_progress=False).run()
    assert result.stopped_early and result.best_step == 4 and result.steps == 8
    for n, p in params.items():
        assert torch.equal(p.detach(), snapshots[4][n])
    assert not torch.equal(snapshots[8]["weight"], snapshots[4]["weight"])
    evals = [r for r in log.records() if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6, 8] and evals[1]["best"]


def test_hedgecats_run_logs_components_and_saves_merged_model(tmp_path):
    out = tmp_path / "hc"
    summary = run_recipe(tiny_llama(), "hedgecats", out, data=random_data(),
                         overrides=tiny_recipe(**{"stage2.max_steps": 6, "stage2.early_stopping.patience": 1}))
    s2 = summary["stages"]["stage2"]
    assert s2["best_step"] is not None and set(s2["val"]) == {"hybrid", "swa_only", "la_only"}
    evals = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r.get("event") == "eval" and r["stage"] == "stage2"]
    assert evals and all(set(r["val"]) == {"hybrid", "swa_only", "la_only"} for r in evals)
    assert (out / "adapter" / "adapter_config.json").is_file()
    from linearize import components, load

    model = load(out)
    ids = random_data().val
    with torch.no_grad():
        merged = {}
        for mode in ("hybrid", "swa_only", "la_only"):
            with components(model, mode):
                merged[mode] = finetune.lm_loss(model, ids)
    for mode in merged:  # the saved merged model reproduces the final validation losses
        assert abs(float(merged[mode]) - s2["val"][mode]) < 1e-4, (mode, float(merged[mode]), s2["val"][mode])


def test_mixing_parameters_train_at_their_own_learning_rate(tmp_path):
    """`mixing_lr` puts the gates in their own optimizer group: Adam's first step moves each parameter by about its
    group's learning rate, so a per-head gate can move at a rate LoRA would not survive."""
    from accelerate import Accelerator

    model = tiny_llama()
    convert(model, HybridConfig(window=4, chunk_size=8, combine="mix", mix_gate="learned"))
    _, params = finetune.add_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                                  train_mixing=True)
    gates = {n: p for n, p in params.items() if n.endswith("gate_logit")}
    lora_b = {n: p for n, p in params.items() if "lora_B" in n}
    assert gates and lora_b
    before = {n: p.detach().clone() for n, p in params.items()}
    spec = loop.LoopSpec(name="stage2", lr=1e-4, mixing_lr=1e-2, batch_size=4, grad_accum=1, max_steps=1,
                         checkpoint_every=100)
    trainer = loop.Trainer(model=model, params=params, data=random_data(rows=8, seq_len=32).train,
                           loss_fn=finetune.finetune_loss_fn(model, chunk=16), spec=spec, ckpt_dir=tmp_path,
                           accelerator=Accelerator(cpu=True), log=loop.JsonlLog(None), show_progress=False)
    assert sorted(g["lr"] for g in trainer.optimizer.param_groups) == [1e-4, 1e-2]
    trainer.run()
    gate_step = max((p.detach() - before[n]).abs().max().item() for n, p in gates.items())
    lora_step = max((p.detach() - before[n]).abs().max().item() for n, p in lora_b.items())
    assert 0.9e-2 < gate_step < 1.1e-2 and 0.9e-4 < lora_step < 1.1e-4, (gate_step, lora_step)
