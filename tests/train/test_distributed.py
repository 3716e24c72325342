"""Two CPU processes (gloo) give the same training as one process."""

import json
import os
import socket

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from linearize.train import run_recipe
from lz_train_helpers import random_data, tiny_llama, tiny_recipe

import pytest

CONFIGS = {
    # batch 2 split over 2 processes; per-sample SSD draws
    "split_batch": tiny_recipe(**{"stage1.max_steps": 3, "stage2.max_steps": 3, "stage2.ssd.granularity": "sample",
                                  "eval.batch_size": 1}),
    # LoLCATs shape: batch 1 x accumulation 2 -> one micro-batch per process
    "split_accum": tiny_recipe(**{"stage1.max_steps": 3, "stage2.max_steps": 3, "stage1.batch_size": 1,
                                  "stage1.grad_accum": 2, "stage2.batch_size": 1, "stage2.grad_accum": 2,
                                  "eval.batch_size": 1}),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, sets: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from accelerate import Accelerator

    dist.init_process_group("gloo", rank=rank, world_size=world)
    acc = Accelerator(cpu=True)
    assert acc.num_processes == world and acc.process_index == rank
    run_recipe(tiny_llama(), "ssd", out, overrides=sets, data=random_data(), accelerator=acc)
    dist.barrier()
    dist.destroy_process_group()


def _losses(out):
    records = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    return [(r["stage"], r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_two_gloo_processes_match_one(tmp_path, config):
    single = tmp_path / "single"
    one = run_recipe(tiny_llama(), "ssd", single, overrides=CONFIGS[config], data=random_data())
    double = tmp_path / "double"
    mp.spawn(_worker, args=(2, _free_port(), str(double), CONFIGS[config]), nprocs=2, join=True)
    a, b = _losses(single), _losses(double)
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 6
    for (_, _, la), (_, _, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-4 * max(1.0, abs(la)), (a, b)
    summary = json.loads((double / "summary.json").read_text())
    assert summary["processes"] == 2
    for mode, value in one["val"].items():
        assert abs(summary["val"][mode] - value) < 1e-4
    wa, wb = load_file(str(single / "model.safetensors")), load_file(str(double / "model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
