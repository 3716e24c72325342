"""Scheduled Sliding-window Dropout (SSD), arXiv 2510.05901 remedy (iii).

During stage-2 fine-tuning the SWA branch of a converted layer is dropped -- the layer runs `la_only`
instead of `hybrid` -- with a probability p that follows a schedule:

- ``schedule``: a list of ``(fraction of training, p)`` points, piecewise constant: p is the value of the
  last point whose fraction is <= step / total_steps. Default ``[(0, 0.9), (1/3, 0.75), (2/3, 0.5)]``.
- ``per_epoch``: ``[p_epoch0, p_epoch1, ...]`` (the last value repeats); overrides ``schedule``.

Granularity of the Bernoulli draws:

- ``step``: one draw per optimizer step, shared by all layers, rows and micro-batches (the default);
- ``layer``: one draw per layer per optimizer step;
- ``sample``: one draw per row of the optimizer step's global batch, shared by all layers.

Draws come from a generator seeded by ``(seed, step)`` only, so they are identical across processes,
across runs with the same seed, and after ``--resume`` -- no random state to carry. The draws are set on
``HybridAttention.drop_swa`` (None / bool / BoolTensor(B,)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_SCHEDULE = [(0.0, 0.9), (1 / 3, 0.75), (2 / 3, 0.5)]


def check_schedule(schedule, per_epoch=None) -> None:
    if per_epoch is not None:
        if not per_epoch or any(not 0.0 <= float(p) <= 1.0 for p in per_epoch):
            raise ValueError(f"per_epoch must be a non-empty list of probabilities in [0, 1], got {per_epoch!r}")
        return
    if not schedule:
        raise ValueError("schedule must hold at least one (fraction, p) point")
    last = -1.0
    for point in schedule:
        if len(point) != 2:
            raise ValueError(f"schedule points are (fraction, p) pairs, got {point!r}")
        frac, p = float(point[0]), float(point[1])
        if not 0.0 <= frac <= 1.0 or not 0.0 <= p <= 1.0:
            raise ValueError(f"schedule point {point!r}: fraction and p must lie in [0, 1]")
        if frac <= last:
            raise ValueError(f"schedule fractions must increase, got {[pt[0] for pt in schedule]}")
        last = frac
    if float(schedule[0][0]) != 0.0:
        raise ValueError("the first schedule point must be at fraction 0")


@dataclass
class SSDSchedule:
    schedule: list = field(default_factory=lambda: list(DEFAULT_SCHEDULE))
    per_epoch: list | None = None
    granularity: str = "step"
    seed: int = 0

    def __post_init__(self):
        check_schedule(self.schedule, self.per_epoch)
        if self.granularity not in ("step", "layer", "sample"):
            raise ValueError(f"granularity must be step, layer or sample, got {self.granularity!r}")

    def probability(self, step: int, total_steps: int, epoch: int = 0) -> float:
        """p(drop SWA) at optimizer step `step` (0-based) of `total_steps`, in `epoch` (0-based)."""
        if self.per_epoch is not None:
            return float(self.per_epoch[min(epoch, len(self.per_epoch) - 1)])
        frac = step / max(total_steps, 1)
        p = float(self.schedule[0][1])
        for f, value in self.schedule:
            if frac + 1e-12 >= float(f):
                p = float(value)
        return p

    def generator(self, step: int, micro: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1009 + micro + 7919)

    def draw(self, p: float, step: int, num_layers: int, rows: int, micro: int = 0) -> torch.Tensor:
        """Drop decisions: (1,) for step, (num_layers,) for layer, (rows,) for sample (global rows)."""
        n = {"step": 1, "layer": num_layers, "sample": rows}[self.granularity]
        return torch.rand(n, generator=self.generator(step, micro)) < p

    @classmethod
    def from_recipe(cls, ssd: dict, seed: int) -> "SSDSchedule":
        return cls(schedule=[tuple(pt) for pt in ssd["schedule"]], per_epoch=ssd.get("per_epoch"),
                   granularity=ssd["granularity"], seed=seed)


def set_drops(modules, drops: torch.Tensor, granularity: str) -> None:
    """Write the draws onto the layers' `drop_swa` (sample: one entry per row of the micro-batch)."""
    for i, module in enumerate(modules):
        if granularity == "step":
            module.drop_swa = bool(drops[0])
        elif granularity == "layer":
            module.drop_swa = bool(drops[i])
        else:
            module.drop_swa = drops


def clear_drops(modules) -> None:
    for module in modules:
        module.drop_swa = None


def dropped_fraction(drops: torch.Tensor) -> float:
    return float(drops.float().mean()) if drops.numel() else 0.0
