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
