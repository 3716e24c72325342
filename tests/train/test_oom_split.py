"""A training step that runs out of GPU memory: its micro-batches are split (the same rows per step), or the run
stops with a one-line error that says what to change."""

import json

import pytest
import torch

from linearize.errors import DoesNotFitError, LinearizeError
from linearize.train import loop


def _trainer(tmp_path, *, batch_size, grad_accum, fits_rows=None, split_on_oom=True, name="stage2"):
    """A linear model trained on 32 rows; the loss 'runs out of memory' on micro-batches of more than `fits_rows`
    rows (None: never). Returns the trainer and its trained parameters."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    params = dict(net.named_parameters())
    data = torch.randint(0, 64, (32, 4))

    def loss_fn(batch, ctx):
        loss = (net(batch.float() / 64) - 1).pow(2).mean()  # the graph exists when the GPU gives up
        if fits_rows is not None and len(batch) > fits_rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 864.00 MiB.")
        return loss, {}

    spec = loop.LoopSpec(name=name, lr=1e-2, batch_size=batch_size, grad_accum=grad_accum, epochs=1,
                         checkpoint_every=100, split_on_oom=split_on_oom)
    trainer = loop.Trainer(model=net, params=params, data=data, loss_fn=loss_fn, spec=spec, ckpt_dir=tmp_path,
                           accelerator=Accelerator(cpu=True), log=loop.JsonlLog(tmp_path / "log.jsonl"),
                           show_progress=False)
    return trainer, params


def test_out_of_memory_splits_the_micro_batches_into_the_same_steps(tmp_path):
    split, params = _trainer(tmp_path / "split", batch_size=8, grad_accum=1, fits_rows=2)
    with pytest.warns(RuntimeWarning) as warned:
        result = split.run()
    assert [str(w.message) for w in warned] == [
        f"stage2 step 1: out of GPU memory with micro-batches of {a} rows; running {b} rows x {c} micro-batches per "
        f"step instead (the same rows)" for a, b, c in ((8, 4, 2), (4, 2, 4))]
    assert result.steps == 4 and (split.spec.batch_size, split.spec.grad_accum) == (2, 4)
    events = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    splits = [(r["was"], r["batch_size"], r["grad_accum"]) for r in events if r.get("event") == "micro_batch_split"]
    assert splits == [([8, 1], 4, 2), ([4, 2], 2, 4)]  # on the first step only; the later ones run split
    planned, planned_params = _trainer(tmp_path / "planned", batch_size=2, grad_accum=4)
    planned.run()
    for name in params:  # the same rows per step, in the same micro-batches: the same updates
        assert torch.equal(params[name], planned_params[name]), name


@pytest.mark.parametrize("batch_size, split_on_oom, message", [
    (1, True, r"stage2: a micro-batch of 1 row\(s\) of 4 tokens does not fit in GPU memory; set "
              r"stage2.gradient_checkpointing=true, or fewer tokens per row \(data.seq_len\)"),
    (4, False, r"stage1: a micro-batch of 4 row\(s\) .* \(stage1.split_on_oom is off\); split it: --set "
               r"stage1.batch_size=<smaller> --set stage1.grad_accum=<larger>"),
])
def test_out_of_memory_that_cannot_be_split_is_a_one_line_error(tmp_path, batch_size, split_on_oom, message):
    trainer, params = _trainer(tmp_path, batch_size=batch_size, grad_accum=1, fits_rows=0, split_on_oom=split_on_oom,
                               name="stage1" if batch_size > 1 else "stage2")
    before = {n: p.detach().clone() for n, p in params.items()}
    with pytest.raises(LinearizeError, match=message) as caught:
        trainer.run()
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert isinstance(caught.value, DoesNotFitError)  # what `linearize bench --conversion` records as its row's error
    assert all(torch.equal(p, before[n]) for n, p in params.items())  # no update was applied
