"""Scheduled Sliding-window Dropout: schedule, rates, and the layers actually dropping SWA."""

import math

import pytest
import torch

from linearize import HybridConfig, convert
from linearize.models.convert import hybrid_modules
from linearize.train import finetune, loop
from linearize.train.ssd import SSDSchedule
from lz_train_helpers import random_data, tiny_llama


def test_schedule_values():
    s = SSDSchedule()
    total = 300
    assert [s.probability(i, total) for i in (0, 99, 100, 199, 200, 299)] == [0.9, 0.9, 0.75, 0.75, 0.5, 0.5]
    e = SSDSchedule(per_epoch=[0.9, 0.75, 0.5])
    assert [e.probability(0, 10, epoch) for epoch in range(5)] == [0.9, 0.75, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError):
        SSDSchedule(schedule=[(0.0, 0.9), (0.0, 0.5)])
    with pytest.raises(ValueError):
        SSDSchedule(granularity="head")


def _within_binomial(hits, n, p, sigmas=4.5):
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("granularity", ["step", "layer", "sample"])
def test_drop_rate_follows_schedule(granularity):
    s = SSDSchedule(granularity=granularity, seed=1)
    total = 3000
    for lo, hi, p in ((0, 1000, 0.9), (1000, 2000, 0.75), (2000, 3000, 0.5)):
        draws = torch.cat([s.draw(s.probability(i, total), i, num_layers=4, rows=3) for i in range(lo, hi)])
        assert _within_binomial(int(draws.sum()), draws.numel(), p), (granularity, p, float(draws.float().mean()))
    # the same step gives the same draw (resume, several processes)
    assert torch.equal(s.draw(0.5, 17, 4, 3), s.draw(0.5, 17, 4, 3))


def test_drop_swa_makes_the_layer_la_only():
    model = tiny_llama()
    convert(model, HybridConfig(window=4, chunk_size=8))
    ids = random_data(rows=2, seq_len=24).train
    with torch.no_grad():
        hybrid = model(ids).logits
        from linearize import components

        with components(model, "la_only"):
            la = model(ids).logits
        for m in hybrid_modules(model):
            m.drop_swa = True
        dropped = model(ids).logits
        for m in hybrid_modules(model):
            m.drop_swa = torch.tensor([True, False])
        mixed = model(ids).logits
    assert torch.allclose(dropped, la, atol=1e-5) and not torch.allclose(dropped, hybrid, atol=1e-3)
    assert torch.allclose(mixed[0], la[0], atol=1e-5) and torch.allclose(mixed[1], hybrid[1], atol=1e-5)


def test_training_drops_swa_at_the_scheduled_rate(tmp_path):
    """Over a real stage-2 run, the layers see drop_swa set at the scheduled rate, and cleared afterwards."""
    from accelerate import Accelerator

    model = tiny_llama(num_hidden_layers=1)
    for p in model.parameters():
        p.requires_grad_(False)
    convert(model, HybridConfig(window=4, chunk_size=8))
    _, params = finetune.add_lora(model, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["v_proj"]})
    seen = []
    for m in hybrid_modules(model):
        m.register_forward_pre_hook(lambda mod, args: seen.append(mod.drop_swa))
    total = 240
    ssd = SSDSchedule(seed=0)
    spec = loop.LoopSpec(name="stage2", lr=1e-4, batch_size=1, grad_accum=1, epochs=total, max_steps=total,
                         checkpoint_every=10_000)
    data = random_data(rows=4, seq_len=8).train
    trainer = loop.Trainer(model=model, params=params, data=data, loss_fn=finetune.finetune_loss_fn(model, chunk=8, ssd=ssd),
                           spec=spec, ckpt_dir=tmp_path, accelerator=Accelerator(cpu=True), log=loop.JsonlLog(None),
                           show_progress=False)
    trainer.run()
    # one forward per step, and the probe of the updated parameters before the final checkpoint (same draw)
    assert len(seen) == total + 1 and seen[-1] == seen[-2] and all(isinstance(d, bool) for d in seen)
    seen = seen[:total]
    for lo, hi, p in ((0, 80, 0.9), (80, 160, 0.75), (160, 240, 0.5)):
        assert _within_binomial(sum(seen[lo:hi]), hi - lo, p), (p, sum(seen[lo:hi]))
    assert all(m.drop_swa is None for m in hybrid_modules(model))
