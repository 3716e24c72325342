"""Two CPU processes (gloo) give the same training as one process, under every `runtime.distributed` strategy."""

import json
import os
import socket

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from linearize.train import run_recipe
from linearize.train.recipes import RecipeError, load_recipe
from lz_train_helpers import random_data, tiny_llama, tiny_recipe

import pytest

# gamma trains in both stages: the `weights` objective never uses it, an SSD-dropped (la_only) layer neither
MIXING = {"hybrid.gamma_trainable": True, "stage1.train_mixing": True, "stage2.train_mixing": True}
CONFIGS = {
    # batch 2 split over 2 processes; per-sample SSD draws (one process may use gamma where the other does not);
    # early stopping validates inside stage 2 and restores the best parameters
    "split_batch": tiny_recipe(**{"stage1.max_steps": 3, "stage2.max_steps": 3, "stage2.ssd.granularity": "sample",
                                  "stage2.early_stopping.enabled": True, "eval.batch_size": 1, **MIXING}),
    # LoLCATs shape: batch 1 x accumulation 4 -> two micro-batches per process (DDP reduces after the second); every
    # layer recomputed in the backward pass (under FSDP2 the checkpoint sits inside the layer's gather hooks)
    "split_accum": tiny_recipe(**{"stage1.max_steps": 3, "stage2.max_steps": 3, "stage1.batch_size": 1,
                                  "stage1.grad_accum": 4, "stage2.batch_size": 1, "stage2.grad_accum": 4,
                                  "stage2.gradient_checkpointing": True,
                                  "eval.batch_size": 1, **MIXING}),
}
# strategy -> the module a step runs through
STRATEGIES = {"allreduce": "_Forward", "ddp": "DistributedDataParallel", "fsdp": "FSDP_Forward"}
RESUMED = "fsdp"  # split_batch also runs under this strategy interrupted inside stage 2, then resumed
STOPS = "split_batch"  # the config whose worker also checks the NaN stop and the resume


def _diverging_run(out: str, acc, strategy: str) -> None:
    """test_loop's NaN case under `strategy`: a clear error, and the last checkpoint holds the step-4 weights."""
    from linearize.errors import TrainingDivergedError
    from linearize.train import loop

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    after = {}

    def loss_fn(batch, ctx):
        after[ctx["step"]] = {n: p.detach().clone() for n, p in net.named_parameters()}  # whole inside the forward
        loss = (net(batch.float() / 64) - 1).pow(2).mean()
        return (loss * float("nan") if ctx["step"] == 5 else loss), {}

    spec = loop.LoopSpec(name="stage1", lr=1e-2, batch_size=2, grad_accum=1, epochs=10, checkpoint_every=2,
                         distributed=strategy)
    trainer = loop.Trainer(model=net, params=dict(net.named_parameters()), data=torch.arange(64).view(16, 4),
                           loss_fn=loss_fn, spec=spec, ckpt_dir=out, accelerator=acc, log=loop.JsonlLog(None),
                           show_progress=False)
    with pytest.raises(TrainingDivergedError, match=r"stage1 step 6: the loss is nan.*last good checkpoint"):
        trainer.run()
    ckpt = torch.load(os.path.join(out, loop.CHECKPOINT), weights_only=False)
    assert ckpt["step"] == 4
    for n, p in ckpt["params"].items():
        assert torch.equal(p, after[4][n]), (strategy, n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, sets: list, stops: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from accelerate import Accelerator
    from torch.distributed.tensor import DTensor

    from linearize.train import distributed, loop

    dist.init_process_group("gloo", rank=rank, world_size=world)
    acc = Accelerator(cpu=True)
    assert acc.num_processes == world and acc.process_index == rank
    runners = []  # what each stage's steps ran through
    wrap = distributed.Processes.wrap

    def spy(self, model):
        runners.append(wrap(self, model))
        return runners[-1]

    distributed.Processes.wrap = spy
    for strategy, runs_through in STRATEGIES.items():
        runners.clear()
        model = tiny_llama()
        strategy_sets = sets + [f"runtime.distributed={strategy}"]
        run_recipe(model, "ssd", os.path.join(out, strategy), overrides=strategy_sets, data=random_data(),
                   accelerator=acc)
        assert [type(r).__name__ for r in runners] == [runs_through] * 2
        # the model is whole again, with its own layers, for the validations and the saved model
        assert not any(isinstance(p, DTensor) for p in model.parameters())
        assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in model.get_decoder().layers)
        if stops:
            _diverging_run(os.path.join(out, f"nan_{strategy}"), acc, strategy)
        if stops and strategy == RESUMED:
            path = os.path.join(out, "resumed")
            with pytest.raises(loop.RunInterrupted):
                run_recipe(tiny_llama(), "ssd", path, overrides=strategy_sets, data=random_data(), accelerator=acc,
                           interrupt_after=5)
            run_recipe(tiny_llama(), "ssd", path, data=random_data(), accelerator=acc, resume=True)
    dist.barrier()
    dist.destroy_process_group()


def _losses(out):
    records = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    return [(r["stage"], r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_two_gloo_processes_match_one(tmp_path, config):
    single = tmp_path / "single"
    one = run_recipe(tiny_llama(), "ssd", single, overrides=CONFIGS[config], data=random_data())
    stops = config == STOPS
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), CONFIGS[config], stops), nprocs=2, join=True)
    a = _losses(single)
    wa = load_file(str(single / "model.safetensors"))
    for name in [*STRATEGIES, *(["resumed"] if stops else [])]:
        double = tmp_path / name
        b = _losses(double)
        assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 6, name
        loss_diff = max(abs(la - lb) / max(1.0, abs(la)) for (_, _, la), (_, _, lb) in zip(a, b))
        summary = json.loads((double / "summary.json").read_text())
        assert summary["processes"] == 2 and summary["distributed"] == (RESUMED if name == "resumed" else name)
        val_diff = max(abs(summary["val"][mode] - value) for mode, value in one["val"].items())
        wb = load_file(str(double / "model.safetensors"))
        assert wa.keys() == wb.keys()
        weight_diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        print(f"{config} {name}: loss {loss_diff:.2e}, validation {val_diff:.2e}, weights {weight_diff:.2e}")
        assert loss_diff <= 1e-4 and val_diff < 1e-4 and weight_diff <= 1e-5, (name, a, b)


def test_unknown_strategy_is_refused():
    with pytest.raises(RecipeError, match="runtime.distributed='zero'; expected one of"):
        load_recipe("ssd", ["runtime.distributed=zero"])
