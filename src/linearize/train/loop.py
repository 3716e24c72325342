"""The training loop both stages share: :class:`Trainer` runs one stage's optimizer steps.

- How several processes share the steps: :mod:`linearize.train.distributed` (allreduce, ddp, fsdp); what a
  checkpoint holds: :mod:`linearize.train.checkpoint`.
- AdamW, gradient clipping (1.0), the learning-rate schedule from ``transformers.get_scheduler`` (constant,
  cosine or linear decay, after an optional linear warmup from 0).
- The row order is a function of ``(seed, epoch)`` and the step number, so a run is reproducible and
  ``resume`` continues exactly: a checkpoint holds the trainable parameters, the optimizer and scheduler
  states, the RNG states and the step (which fixes the data position). An interrupted run resumed from
  its last checkpoint ends with the same weights as an uninterrupted one.
- A NaN/inf loss or gradient norm, or an update that leaves a parameter NaN/inf, stops the run with
  :class:`linearize.errors.TrainingDivergedError` at that step. Before a checkpoint is written the loss of the
  updated parameters is computed on the step's first micro-batch, so a step whose update poisons the model
  (finite but huge parameters) is never kept: the previous checkpoint stays the last good one.
- Resuming with a changed learning rate, schedule or step count (see linearize.train.RESUMABLE) continues
  from the checkpoint with the new values.
- Every step is logged to a JSONL file; validations too (``event: eval``).
- A step that runs out of GPU memory is run again with its micro-batches split (``split_on_oom``; the same rows per
  step, so the same data order and effective batch), logged as ``event: micro_batch_split``; a micro-batch of one row
  that does not fit stops the run with a one-line error that says what to change.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import set_seed
from transformers import get_scheduler

from linearize.attention.module import hybrid_param_kind
from linearize.errors import DoesNotFitError, LinearizeError, TrainingDivergedError
from linearize.train.checkpoint import (
    BEST, CHECKPOINT, FINAL, Checkpoints, load_optimizer, load_params, optimizer_state, param_state, rng_state,
    set_rng_state,
)
from linearize.train.distributed import Processes, local, whole
from linearize.train.recipes import DISTRIBUTED, EarlyStoppingConfig, LoopConfig

#: The recipe's schedule names as transformers.get_scheduler calls them (each with the linear warmup).
SCHEDULERS = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


class RunInterrupted(LinearizeError):
    """Raised by the `interrupt_after` test hook: the run stops as if killed (checkpoints stay)."""


@dataclass
class LoopSpec(LoopConfig):
    """One stage's loop: the recipe's loop settings (:class:`LoopConfig`, its fields and defaults) and what the run
    adds: the stage's name, the seed, validation, early stopping and how several processes share the work."""

    name: str = field(default="stage", metadata={"help": "The stage's name (checkpoints, logs, messages)."})
    seed: int = field(default=0, metadata={"help": "Seed of the row order (with the epoch)."})
    eval_every: int = field(default=0, metadata={"help": "Optimizer steps between validations (0: none)."})
    early_stopping: EarlyStoppingConfig | None = field(default=None, metadata={"help": "Early stopping (None: off)."})
    distributed: str = field(default="allreduce", metadata={"help": "allreduce, ddp or fsdp (RuntimeConfig)."})

    def __post_init__(self) -> None:
        if isinstance(self.early_stopping, dict):
            self.early_stopping = EarlyStoppingConfig.from_dict(self.early_stopping)
        super().__post_init__()

    def check(self) -> None:
        super().check()
        if self.distributed not in DISTRIBUTED:
            raise LinearizeError(f"{self.name}: distributed={self.distributed!r}; expected one of {DISTRIBUTED}")

    @classmethod
    def from_recipe(cls, name: str, stage: LoopConfig | dict, seed: int, eval_every: int = 0,
                    early_stopping: EarlyStoppingConfig | dict | None = None,
                    distributed: str = "allreduce") -> "LoopSpec":
        """The loop of recipe section `stage` (typed, or its YAML form)."""
        values = stage.to_dict() if isinstance(stage, LoopConfig) else dict(stage)
        return cls(name=name, seed=seed, eval_every=eval_every, early_stopping=early_stopping, distributed=distributed,
                   **{f.name: values[f.name] for f in dataclasses.fields(LoopConfig)})

    @property
    def early(self) -> bool:
        """Whether validations decide when to stop (and the best weights are kept)."""
        return self.early_stopping is not None and self.early_stopping.enabled


def epoch_order(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 7919 + epoch + 1))


def batch_rows(spec: LoopSpec, n_rows: int, step: int, micro: int) -> tuple[torch.Tensor, int]:
    """Global row indices of micro-batch `micro` of optimizer step `step`, and the epoch."""
    per_epoch = spec.steps_per_epoch(n_rows)
    epoch, within = divmod(step, per_epoch)
    start = within * spec.rows_per_step + micro * spec.batch_size
    return epoch_order(n_rows, spec.seed, epoch)[start:start + spec.batch_size], epoch


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (on every device) before a step of the run."""
    set_seed(seed)


class JsonlLog:
    """Append-only JSONL training log (main process writes)."""

    def __init__(self, path: str | Path | None, enabled: bool = True):
        self.path = Path(path) if path else None
        self.enabled = enabled and self.path is not None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def truncate_after(self, stage: str, step: int) -> None:
        """Drop this stage's records after `step` (they belong to the run that was interrupted)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("stage") == stage and rec.get("step", 0) > step:
                continue
            keep.append(json.dumps(rec, default=float))
        self.path.write_text("".join(line + "\n" for line in keep))

    def records(self) -> list[dict]:
        if self.path is None or not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class StepCounter:
    """Counts optimizer steps over a whole invocation (all stages); raises RunInterrupted at `limit`."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.limit is not None and self.count >= self.limit:
            raise RunInterrupted(f"interrupted after {self.count} optimizer steps (test hook)")


@dataclass
class StageResult:
    name: str
    steps: int = 0
    total_steps: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0
    last_loss: float | None = None
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    evals: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def lr_scheduler(optimizer: torch.optim.Optimizer, spec: LoopConfig, total_steps: int):
    """The learning-rate schedule of a stage of `total_steps` optimizer steps (a LambdaLR)."""
    return get_scheduler(SCHEDULERS[spec.lr_schedule], optimizer, num_warmup_steps=spec.warmup_steps,
                         num_training_steps=total_steps)


class Trainer:
    """One stage of training.

    `loss_fn(rows, ctx)` gets this process's token rows (LongTensor (b, T)) and a context dict
    (step, micro, epoch, total_steps, rows: global row ids, positions: the rows' positions among the step's
    rows_per_step rows) and returns (loss, info): `loss` is the mean
    over the local rows (a scalar tensor), `info` a dict of floats to log. `eval_fn(step)` returns
    {name: float} validation losses.
    `params` are the trainable parameters by their `model.named_parameters()` names; after `run()` they hold
    the trained values and the model is as it was given, whatever `spec.distributed`.
    """

    def __init__(self, *, model: torch.nn.Module, params: dict[str, torch.nn.Parameter], data: torch.Tensor,
                 loss_fn: Callable, spec: LoopSpec, ckpt_dir: str | Path, accelerator, log: JsonlLog,
                 eval_fn: Callable | None = None, show_progress: bool = True, counter: StepCounter | None = None):
        if not params:
            raise LinearizeError(f"{spec.name}: no trainable parameters")
        self.model, self.data, self.loss_fn, self.spec = model, data, loss_fn, spec
        self.checkpoints = Checkpoints(ckpt_dir, accelerator)
        self.acc = accelerator
        self.log = log
        self.eval_fn = eval_fn
        self.show_progress = show_progress
        self.counter = counter or StepCounter()
        self.processes = Processes(spec.distributed, accelerator)
        if spec.rows_per_step % self.processes.world:
            raise LinearizeError(f"{spec.name}: batch_size x grad_accum = {spec.rows_per_step} rows per step must be a "
                                 f"multiple of the number of processes ({self.processes.world}); each takes an equal "
                                 f"share")
        self.given = params
        self.runner = self.processes.wrap(model)
        # what the optimizer updates: the given parameters, or under FSDP2 the shards (DTensors) now in their place
        self.params = {n: model.get_parameter(n) for n in params}
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=spec.lr, betas=tuple(spec.betas),
                                           weight_decay=spec.weight_decay)
        self.total = spec.total_steps(len(data))
        self.scheduler = lr_scheduler(self.optimizer, spec, self.total)
        self.result = StageResult(spec.name, total_steps=self.total)
        self.early = spec.early
        self.evals_since_best = 0

    def _param_groups(self) -> list[dict]:
        """One optimizer group at `lr`, and the mixing parameters in their own at `mixing_lr` when it is set."""
        rest, mixing = [], []
        for name, p in self.params.items():
            own_rate = self.spec.mixing_lr is not None and hybrid_param_kind(name) == "mixing"
            (mixing if own_rate else rest).append(p)
        return [g for g in ({"params": rest, "lr": self.spec.lr}, {"params": mixing, "lr": self.spec.mixing_lr})
                if g["params"]]

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        params, optimizer = param_state(self.params), optimizer_state(self.optimizer)
        per_epoch = self.spec.steps_per_epoch(len(self.data))
        self.checkpoints.write(CHECKPOINT, {
            "stage": self.spec.name, "step": step, "params": params,
            "optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
            "result": self.result.to_dict(), "evals_since_best": self.evals_since_best, "world": self.processes.world,
            # the data position follows from the step: epoch = step // steps_per_epoch, rows from epoch_order()
            "data_position": {"epoch": step // per_epoch, "row": (step % per_epoch) * self.spec.rows_per_step},
        })

    def load_checkpoint(self) -> int:
        """The state of the last checkpoint restored; returns its step (0 when there is none)."""
        state = self.checkpoints.read(CHECKPOINT)
        if state is None:
            return 0
        load_params(self.params, state["params"], self.spec.name)
        load_optimizer(self.optimizer, state["optimizer"], list(self.params.values()))
        self.scheduler.load_state_dict(state["scheduler"])
        rates = [g["lr"] for g in self._param_groups()]
        if rates != self.scheduler.base_lrs:  # resumed with another learning rate: it applies from here on
            self.scheduler.base_lrs = rates
            for group, rate, f in zip(self.optimizer.param_groups, rates, self.scheduler.lr_lambdas):
                group["initial_lr"], group["lr"] = rate, rate * f(self.scheduler.last_epoch)
        set_rng_state(state["rng"])
        for k, v in state["result"].items():
            setattr(self.result, k, v)
        self.result.total_steps = self.total
        self.evals_since_best = state["evals_since_best"]
        return int(state["step"])

    # -- steps -----------------------------------------------------------------------------------
    def _diverged(self, step: int, what: str, value: Any) -> TrainingDivergedError:
        last = self.checkpoints.path(CHECKPOINT)
        if last.is_file():
            where = f"the last good checkpoint is {last}; continue from it with --resume --set {self.spec.name}.lr=<lower>"
        else:
            where = f"no checkpoint was written yet; start again with --overwrite --set {self.spec.name}.lr=<lower>"
        return TrainingDivergedError(
            f"{self.spec.name} step {step + 1}: {what} is {value}; training stopped ({where}, "
            f"currently {self.spec.lr:g})")

    def _check_params(self, step: int) -> None:
        """Stop at the step whose update left a parameter NaN/inf (the checkpoint of an earlier step stays)."""
        local_params = {n: local(p) for n, p in self.params.items()}
        # one device-to-host sync per step (not one per parameter): names are only looked up once something is off
        finite = bool(torch.stack([torch.isfinite(p).all() for p in local_params.values()]).all()) if local_params else True
        bad = [] if finite else [n for n, p in local_params.items() if not bool(torch.isfinite(p).all())]
        if self.processes.mean(float(bool(bad))) > 0:
            raise self._diverged(step, "the update", f"non-finite in {bad[:3] or 'another process'}")

    def _probe(self, step: int) -> None:
        """The loss of the updated parameters on the step's first micro-batch, before they are checkpointed: a
        finite step can still leave the model unusable (parameters near the float limit). The RNG is restored,
        so the run continues exactly as without the probe."""
        micro_batches, epoch = self.local_micro_batches(step)
        rows, positions = micro_batches[0]
        ctx = {"step": step, "micro": 0, "epoch": epoch, "total_steps": self.total, "rows": rows,
               "positions": positions, "rows_per_step": self.spec.rows_per_step}
        saved = rng_state()
        try:
            with torch.no_grad(), self.acc.autocast():
                loss, _ = self.runner(partial(self.loss_fn, self.data[rows].to(self.acc.device), ctx))
        finally:
            set_rng_state(saved)
        value = self.processes.mean(float(loss))
        if not math.isfinite(value):
            raise self._diverged(step, "the loss after the update", value)

    def local_micro_batches(self, step: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """This process's micro-batches of optimizer step `step`: (global row ids, positions in the step).

        The step's ``batch_size * grad_accum`` rows (in the global order) are cut into `world` contiguous
        shares; a process splits its share into micro-batches of ``max(1, batch_size // world)`` rows.
        """
        spec = self.spec
        rows, epoch = [], 0
        for micro in range(spec.grad_accum):
            r, epoch = batch_rows(spec, len(self.data), step, micro)
            rows.append(r)
        rows = torch.cat(rows)
        world, rank = self.processes.world, self.processes.rank
        share = len(rows) // world
        positions = torch.arange(rank * share, (rank + 1) * share)
        size = max(1, spec.batch_size // world)
        return [(rows[positions[i:i + size]], positions[i:i + size]) for i in range(0, share, size)], epoch

    def train_step(self, step: int) -> tuple[float, dict]:
        spec = self.spec
        self.model.train()
        losses, infos, epoch = self._gradients(step)
        plist = list(self.params.values())
        for p in plist:
            # a parameter no row of the step used gets a zero gradient, so the optimizer treats it the same
            # whatever the number of processes and the strategy
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.processes.reduce_gradients(plist)
        loss = self.processes.mean(sum(losses))
        if not math.isfinite(loss):
            raise self._diverged(step, "the loss", loss)
        norm = whole(torch.nn.utils.get_total_norm([p.grad for p in plist]))
        gnorm = float(norm)
        if not math.isfinite(gnorm):
            raise self._diverged(step, "the gradient norm", gnorm)
        if spec.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(plist, spec.grad_clip, norm)
        self.optimizer.step()
        self._check_params(step)
        self.scheduler.step()
        info = {k: sum(v) / len(v) for k, v in infos.items()}
        info.update(grad_norm=gnorm, epoch=epoch)
        return loss, info

    def _gradients(self, step: int) -> tuple[list[float], dict, int]:
        """The step's gradients accumulated over its micro-batches; on CUDA out of memory in a forward or backward
        pass, again with smaller micro-batches (`split_on_oom`). Nothing is updated before they are complete."""
        while True:
            try:
                return self._accumulate(step)
            except torch.OutOfMemoryError as exc:
                error = self._unsplittable(exc)
                if error is not None:
                    raise error from exc
            # out of the except block: the traceback's frames, and the activations they hold, are gone
            self._split_micro_batches(step)

    def _unsplittable(self, exc: BaseException) -> DoesNotFitError | None:
        """Why an out-of-memory step cannot be retried with smaller micro-batches (None: it can)."""
        spec, seq_len = self.spec, self.data.shape[1]
        what = f"{spec.name}: a micro-batch of {spec.batch_size} row(s) of {seq_len} tokens does not fit in GPU memory"
        fixes = (f"set {spec.name}.gradient_checkpointing=true, or fewer tokens per row (data.seq_len)"
                 if spec.batch_size == 1 else
                 f"split it: --set {spec.name}.batch_size=<smaller> --set {spec.name}.grad_accum=<larger> (the same "
                 f"product), or set {spec.name}.gradient_checkpointing=true")
        if not spec.split_on_oom:
            return DoesNotFitError(f"{what} ({spec.name}.split_on_oom is off); {fixes}")
        if self.processes.world > 1:
            return DoesNotFitError(f"{what}; with several processes the micro-batches are not split automatically: {fixes}")
        if spec.batch_size == 1:
            return DoesNotFitError(f"{what}; {fixes}")
        return None

    def _split_micro_batches(self, step: int) -> None:
        """batch_size divided by its smallest factor, grad_accum multiplied by it: the step's rows stay the same."""
        spec = self.spec
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        factor = next(f for f in range(2, spec.batch_size + 1) if spec.batch_size % f == 0)
        before = (spec.batch_size, spec.grad_accum)
        spec.batch_size, spec.grad_accum = spec.batch_size // factor, spec.grad_accum * factor
        message = (f"{spec.name} step {step + 1}: out of GPU memory with micro-batches of {before[0]} rows; running "
                   f"{spec.batch_size} rows x {spec.grad_accum} micro-batches per step instead (the same rows)")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        if self.acc.is_main_process:
            self.log.write({"stage": spec.name, "step": step, "event": "micro_batch_split", "batch_size": spec.batch_size,
                            "grad_accum": spec.grad_accum, "was": list(before)})

    def _accumulate(self, step: int) -> tuple[list[float], dict, int]:
        spec = self.spec
        self.optimizer.zero_grad(set_to_none=True)
        losses, infos = [], {}
        micro_batches, epoch = self.local_micro_batches(step)
        share = sum(len(p) for _, p in micro_batches)
        for micro, (rows, positions) in enumerate(micro_batches):
            ctx = {"step": step, "micro": micro, "epoch": epoch, "total_steps": self.total, "rows": rows,
                   "positions": positions, "rows_per_step": spec.rows_per_step}
            batch = self.data[rows].to(self.acc.device)
            with self.processes.accumulating(self.runner, micro == len(micro_batches) - 1):
                with self.acc.autocast():
                    loss, info = self.runner(partial(self.loss_fn, batch, ctx))
                # each micro loss is a mean over its rows: weight by its share of this process's rows, so the
                # gradient (averaged over processes) is that of the mean over the step's rows
                (loss * (len(rows) / share)).backward()
            losses.append(float(loss.detach()) * len(rows) / share)
            for k, v in (info or {}).items():
                infos.setdefault(k, []).append(float(v))
        return losses, infos, epoch

    def evaluate(self, step: int) -> bool:
        """Run eval_fn; returns True when early stopping says stop."""
        if self.eval_fn is None:
            return False
        self.model.eval()
        with torch.no_grad():
            values = self.runner(partial(self.eval_fn, step))
        self.result.evals.append({"step": step, **values})
        record = {"stage": self.spec.name, "step": step, "event": "eval", "val": values}
        es = self.spec.early_stopping
        if self.early:
            metric = values[es.metric]
            best = self.result.best_metric
            if best is None or metric < best - es.min_delta:
                self.result.best_metric, self.result.best_step = metric, step
                self.evals_since_best = 0
                self.checkpoints.write(BEST, {"step": step, "metric": metric, "params": param_state(self.params)})
                record["best"] = True
            else:
                self.evals_since_best += 1
            record["evals_since_best"] = self.evals_since_best
        if self.acc.is_main_process:
            self.log.write(record)
        return self.early and self.evals_since_best >= es.patience

    def restore_best(self) -> None:
        state = self.checkpoints.read(BEST)
        if state is not None:
            load_params(self.params, state["params"], self.spec.name)

    def run(self, resume: bool = False) -> StageResult:
        """Train the stage (or, resuming, take its final parameters); then the model is whole again (on a
        divergence or interruption the process stops with the model as it is)."""
        result = self._train(resume)
        runner, self.runner = self.runner, None
        self.processes.release(runner, self.model, self.params, self.given)
        self.params = self.given
        return result

    def _train(self, resume: bool) -> StageResult:
        spec = self.spec
        final = self.checkpoints.read(FINAL) if resume else None
        if final is not None:  # this stage finished in an earlier invocation
            load_params(self.params, final["params"], spec.name)
            for k, v in final["result"].items():
                setattr(self.result, k, v)
            return self.result
        start = self.load_checkpoint() if resume else 0
        if resume and start and self.acc.is_main_process:
            self.log.truncate_after(spec.name, start)
            self.log.write({"stage": spec.name, "step": start, "event": "resumed"})
        self.acc.wait_for_everyone()
        tokens_per_step = spec.rows_per_step * self.data.shape[1]
        bar = None
        if self.show_progress and self.acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total, initial=start, desc=spec.name, unit="step", dynamic_ncols=True)
        stop = False
        step = start
        try:
            while step < self.total and not stop:
                t0 = time.perf_counter()
                loss, info = self.train_step(step)
                dt = time.perf_counter() - t0
                step += 1
                self.result.steps = step
                self.result.tokens += tokens_per_step
                self.result.train_seconds += dt
                self.result.tokens_per_s = self.result.tokens / max(self.result.train_seconds, 1e-9)
                self.result.last_loss = loss
                if self.acc.is_main_process and (step % spec.log_every == 0 or step == self.total):
                    self.log.write({"stage": spec.name, "step": step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                                    "tokens": self.result.tokens, "tokens_per_s": tokens_per_step / dt, **info})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{tokens_per_step / dt:.0f}")
                if spec.eval_every and step % spec.eval_every == 0 and step < self.total:
                    stop = self.evaluate(step)
                if step % spec.checkpoint_every == 0 or step == self.total or stop:
                    self._probe(step - 1)
                    self.save_checkpoint(step)
                self.counter.tick()
            if self.early and (not self.result.evals or self.result.evals[-1]["step"] != step):
                self.evaluate(step)
            self.result.stopped_early = stop
            if self.early:
                self.restore_best()
        finally:
            if bar is not None:
                bar.close()
        self.checkpoints.write(FINAL, {"params": param_state(self.params), "result": self.result.to_dict()})
        return self.result
