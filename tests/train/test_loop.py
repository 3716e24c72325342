"""The shared loop: resume after a kill, determinism, NaN handling, logs and plots."""

import json

import pytest
import torch
from safetensors.torch import load_file

from linearize.errors import TrainingDivergedError
from linearize.train import loop, run_recipe
from lz_train_helpers import random_data, tiny_llama, tiny_recipe

SETS = tiny_recipe(**{"stage1.max_steps": 4, "stage2.max_steps": 4, "stage2.ssd.granularity": "layer"})


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = run_recipe(tiny_llama(), "ssd", out, overrides=SETS, data=random_data())
    return out, summary


def _weights(out):
    return load_file(str(out / "model.safetensors"))


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fixed_seed_gives_identical_results(reference_run, tmp_path):
    out, summary = reference_run
    again = run_recipe(tiny_llama(), "ssd", tmp_path / "again", overrides=SETS, data=random_data())
    _same(_weights(out), _weights(tmp_path / "again"))
    assert again["val"] == summary["val"]


@pytest.mark.parametrize("kill_after", [3, 7])  # inside stage 1 / inside stage 2
def test_resume_after_kill_gives_the_same_weights(reference_run, tmp_path, kill_after):
    ref_out, ref_summary = reference_run
    out = tmp_path / "run"
    with pytest.raises(loop.RunInterrupted):
        run_recipe(tiny_llama(), "ssd", out, overrides=SETS, data=random_data(), interrupt_after=kill_after)
    assert not (out / "model.safetensors").exists()
    summary = run_recipe(tiny_llama(), "ssd", out, data=random_data(), resume=True)
    _same(_weights(ref_out), _weights(out))
    assert summary["val"] == ref_summary["val"]
    steps = [(r["stage"], r["step"]) for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [("stage1", i) for i in range(1, 5)] + [("stage2", i) for i in range(1, 5)]


def test_outputs_of_a_run(reference_run):
    out, summary = reference_run
    for name in ("config.json", "model.safetensors", "recipe.yaml", "train_log.jsonl", "loss.png", "data_manifest.json",
                 "summary.json", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest["train_tokens"] == 16 * 32 and manifest["val_rows"] == 4
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["val"]) == {"hybrid", "swa_only", "la_only"}
    assert saved["tokens_per_s"]["stage1"] > 0 and saved["tokens_per_s"]["stage2"] > 0
    for record in (saved, manifest):  # provenance of every results file
        assert record["commit"] and record["device"] == "cpu"
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    s2 = [r for r in records if r.get("stage") == "stage2" and "loss" in r]
    assert all("ssd_p" in r and "swa_dropped" in r for r in s2)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    from accelerate import Accelerator

    net = torch.nn.Linear(4, 1)
    params = dict(net.named_parameters())
    data = torch.arange(64).view(16, 4)
    after = {}

    def loss_fn(batch, ctx):
        after[ctx["step"]] = {n: p.detach().clone() for n, p in params.items()}  # = state after step-1 steps
        loss = (net(batch.float() / 64) - 1).pow(2).mean()
        return (loss * float("nan") if ctx["step"] == 5 else loss), {}

    spec = loop.LoopSpec(name="stage1", lr=1e-2, batch_size=2, grad_accum=1, epochs=10, checkpoint_every=2)
    trainer = loop.Trainer(model=net, params=params, data=data, loss_fn=loss_fn, spec=spec, ckpt_dir=tmp_path,
                           accelerator=Accelerator(cpu=True), log=loop.JsonlLog(tmp_path / "log.jsonl"), show_progress=False)
    with pytest.raises(TrainingDivergedError, match=r"stage1 step 6: the loss is nan.*last good checkpoint"):
        trainer.run()
    ckpt = torch.load(tmp_path / loop.CHECKPOINT, weights_only=False)
    assert ckpt["step"] == 4
    for n in params:
        assert torch.equal(ckpt["params"][n], after[4][n])
    assert torch.isfinite(params["weight"]).all()  # no NaN update was applied


# The learning-rate factor at steps 0..10 of a 10-step stage, as the hand-written schedule before
# transformers.get_scheduler (commit 6339abe, loop._lr_lambda) gave it, without and with 3 warmup steps.
OLD_LR_FACTORS = {
    ("constant", 0): [1.0] * 11,
    ("cosine", 0): [1.0, 0.9755282581475768, 0.9045084971874737, 0.7938926261462366, 0.6545084971874737, 0.5,
                    0.34549150281252633, 0.2061073738537635, 0.09549150281252633, 0.024471741852423234, 0.0],
    ("linear", 0): [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.30000000000000004, 0.19999999999999996, 0.09999999999999998,
                    0.0],
    ("constant", 3): [0.3333333333333333, 0.6666666666666666] + [1.0] * 9,
    ("cosine", 3): [0.3333333333333333, 0.6666666666666666, 1.0, 1.0, 0.9504844339512095, 0.8117449009293668,
                    0.6112604669781572, 0.38873953302184283, 0.18825509907063326, 0.04951556604879048, 0.0],
    ("linear", 3): [0.3333333333333333, 0.6666666666666666, 1.0, 1.0, 0.8571428571428572, 0.7142857142857143,
                    0.5714285714285714, 0.4285714285714286, 0.2857142857142857, 0.1428571428571429, 0.0],
}


@pytest.mark.parametrize("schedule, warmup", list(OLD_LR_FACTORS))
def test_lr_schedules_match_the_hand_written_ones(schedule, warmup):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    spec = loop.LoopSpec(lr=0.5, lr_schedule=schedule, warmup_steps=warmup)
    scheduler = loop.lr_scheduler(opt, spec, total_steps=10)
    factors, lrs = [], []
    for _ in range(11):  # the factor the optimizer's step `s` runs with, as the Trainer steps it
        lrs.append(opt.param_groups[0]["lr"])
        factors.append(scheduler.lr_lambdas[0](len(factors)))
        opt.step()  # no gradient: nothing moves; the scheduler steps after the optimizer, as in the Trainer
        scheduler.step()
    old = OLD_LR_FACTORS[(schedule, warmup)]
    assert lrs == pytest.approx([0.5 * f for f in factors], rel=1e-15)
    # after the warmup, the same factor at every step (cosine and constant bit for bit, linear to rounding)
    assert factors[warmup:] == pytest.approx(old[warmup:], rel=1e-15, abs=1e-16)
    if schedule != "linear":
        assert factors[warmup:] == old[warmup:]
    # during the warmup transformers ramps from 0 (step s: s / warmup), the old schedule from 1 / warmup
    assert factors[:warmup] == [s / warmup for s in range(warmup)]
    assert old[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
