"""How several processes share a stage's steps (``runtime.distributed`` in a recipe; one process trains the model
as it is).

`accelerate` picks the device and the processes: the same code runs on CPU, one GPU, or several processes
(``accelerate launch`` / torchrun; gloo on CPU, NCCL on GPU). Each optimizer step consumes ``batch_size *
grad_accum`` packed rows of the *global* batch; each process takes an equal share.

- ``allreduce``: every process holds the whole model; after the step's backward passes the trainable
  parameters' gradients are averaged with one all-reduce.
- ``ddp``: torch DistributedDataParallel; the gradients are averaged in buckets while the backward pass
  runs (overlapping communication with compute), once per optimizer step.
- ``fsdp``: FSDP2 (``fully_shard``) per decoder layer, then the rest of the model: parameters, gradients
  and optimizer states are sharded over the processes and a layer is whole only while it computes. After
  the stage the model is whole again on every process (evaluation, LoRA, saving work as before).

All three give the same steps (to float rounding); checkpoints hold whole tensors whatever the strategy and the
number of processes (:func:`whole`, :func:`as_held`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from linearize.models.convert import decoder_layers


def whole(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2 shard (DTensor) gathered into the whole tensor -- a collective, every process calls it."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def as_held(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`value`, a whole tensor from a checkpoint, as `p` holds it: this process's shard where FSDP2 shards `p`."""
    if isinstance(p, DTensor) and value.shape == p.shape:
        return distribute_tensor(value.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return value


def local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of `p` (its shard under FSDP2, else `p`)."""
    return p.to_local() if isinstance(p, DTensor) else p


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers FSDP2 shards one by one (none for a model that is not a transformers decoder)."""
    return decoder_layers(model) if hasattr(model, "get_decoder") else []


class _Forward(torch.nn.Module):
    """What DDP / FSDP2 wrap: holds the model; its forward runs `fn()` (a micro-batch's loss, or a validation).

    The loss functions call the decoder and the LM head (and stage 1's hooks) directly, so a wrapper around
    the model's own forward would never run: DDP prepares its gradient reduction in the wrapper's forward and
    FSDP2's root all-gathers the parameters outside the decoder layers there.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable):
        return fn()


class _Layer(torch.nn.Module):
    """A decoder layer in a shell that FSDP2 marks (class, hooks, state) instead of the model's own layer, so
    putting the layer back after the stage leaves the model as it was."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return self.layer(*args, **kwargs)

    def __getattr__(self, name: str):  # the decoder (and get_parameter) reach through to the layer's attributes
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)


class Processes:
    """The processes of a stage and the strategy (allreduce, ddp, fsdp) by which they share its steps."""

    def __init__(self, strategy: str, accelerator):
        self.strategy, self.acc = strategy, accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module each micro-batch and validation runs through: ``runner(fn)`` calls ``fn()``."""
        runner = _Forward(model)
        if self.world == 1 or self.strategy == "allreduce":
            return runner
        if self.strategy == "ddp":
            # find_unused_parameters: which trainable parameters a step uses depends on the recipe (the `weights` and
            # `output` objectives never use gamma / the gate) and on the SSD draw (a la_only layer skips them).
            # init_sync=False: every process built the same model from the same seeds (as `allreduce` assumes), so
            # the whole, mostly frozen, model is not broadcast
            return DistributedDataParallel(runner, find_unused_parameters=True, init_sync=False)
        mesh = init_device_mesh(self.acc.device.type, (self.world,))
        layers = _layers(model)
        for i, layer in enumerate(layers):
            layers[i] = fully_shard(_Layer(layer), mesh=mesh)
        fully_shard(runner, mesh=mesh)
        # a process can leave a trainable parameter unused where another uses it (SSD per row): every process
        # must reduce-scatter the same parameters, with zeros for its unused ones
        runner.set_reduce_scatter_unused_params(True)
        return runner

    @staticmethod
    def release(runner: torch.nn.Module, model: torch.nn.Module, params: dict[str, torch.Tensor],
                given: dict[str, torch.nn.Parameter]) -> None:
        """`model` as the caller gave it, whole on every process: FSDP2's shells out, the shards gathered (the
        trained `params` into the `given` parameter objects, tied weights kept tied)."""
        if not isinstance(runner, FSDPModule):
            return
        layers = _layers(model)
        for module in (runner, *layers):
            module.reshard()  # a root left whole by a validation registers its shards again
        gathered = {}
        with torch.no_grad():
            for name, p in params.items():
                gathered[id(p)] = given[name].copy_(p.full_tensor())
        for module in model.modules():
            for attr, p in list(module.named_parameters(recurse=False)):
                if isinstance(p, DTensor):
                    if id(p) not in gathered:
                        gathered[id(p)] = torch.nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                    setattr(module, attr, gathered[id(p)])
        for i, shell in enumerate(layers):
            layers[i] = shell.layer

    def accumulating(self, runner: torch.nn.Module, last_micro_batch: bool) -> AbstractContextManager:
        """The context of a micro-batch's forward and backward: DDP reduces the gradients once per step, after the
        last micro-batch (FSDP2 reduce-scatters every micro-batch's, so that only the shards accumulate)."""
        if isinstance(runner, DistributedDataParallel) and not last_micro_batch:
            return runner.no_sync()
        return nullcontext()

    def reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """allreduce: the gradients averaged over the processes, in one all-reduce (ddp and fsdp did it already)."""
        if self.world == 1 or self.strategy != "allreduce":
            return
        import torch.distributed as dist

        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    def mean(self, value: float) -> float:
        """The mean of `value` over the processes."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.acc.device)
        return float(self.acc.reduce(t, reduction="mean")[0])
