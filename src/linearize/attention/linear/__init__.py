"""The linear states of the hybrid layer's linear branch: one folder per kind, one registry entry each.

A kind's folder (`attention/linear/<kind>/`) exposes plain fp32 torch functions:
    naive(qf, kf, v, *, log_decay=None, beta=None, enter=None, lag=0) -> (num, den)      the definition
    chunked(..., chunk=64) -> (num, den)                                                  PyTorch, no (T x T) tensor
    init_state(batch, num_kv_heads, m, d, *, dtype, device) -> state                       fixed shapes, .tensors()
    step(state, qf_t, kf_in, v_in, *, log_decay_t=None, beta_in=None, enter_in=None)      one step, in place
    fla_forward(...)                                                                       optional GPU backend
    fla_kernel_sizes(m, d) -> (key size, value size) its kernel sees, where not (m, d)    (fla_route's tile check)
    fla_supports(m, d) -> bool: the sizes fla_forward computes, where it has limits
and, optionally, final_state(kf, v, *, log_decay, beta, enter, lag) -> state (the decode prefill; without it the
prefill runs `step` over the prompt). A kind that the sparse memory (`attention.memory`) can serve also has
    read(state, qf[, log_decay=]) -> (num, den)          queries (B, Hq, L, m) against the state (decayed per query)
    recall_error(state, kf, v) -> (B, Hkv, L)                 the memory's score of keys against the state
    absorb(state, kf, v, valid, *, log_weight, beta) -> state  keys evicted from the memory enter, in order (not in place)
    decayed(state, log_decay (B, Hkv)) -> state                kinds with a decay (not in place) Shapes: qf (B, Hq, T, m), kf (B, Hkv, T, m), v (B, Hkv, T, d), log_decay /
beta (B, Hkv, T), enter (B, T) bool; key s enters the state at step s + lag. At step t the state decays by
exp(log_decay[t]), key t - lag enters if enter[t - lag], then query t reads it: num (B, Hq, T, d), den (B, Hq, T)
merge with the softmax window's sums through `attention.common.combine`.

To add a kind: its folder, one entry in `_KINDS` below, its name in `config.LINEAR_STATE_KINDS` (and
`NORMALISED_STATES` if it has a normaliser); import fails while these disagree.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from linearize.attention.linear import delta as delta_kind
from linearize.attention.linear import gated as gated_kind
from linearize.attention.linear import sum as sum_kind
from linearize.config import LINEAR_STATE_KINDS, NORMALISED_STATES

__all__ = ["LINEAR_STATES", "LinearState", "linear_state"]


@dataclass(frozen=True)
class LinearState:
    name: str
    help: str
    normalised: bool  # den is a real normaliser (else 1 once a key entered): 'shared_norm' needs one
    needs_log_decay: bool  # the layer computes a per-(KV head, step) log decay for it
    needs_beta: bool  # the layer computes a per-(KV head, key) write strength beta for it
    additive: bool  # the state is a plain sum of the keys: the decode state adds the window's keys at read time
    triton: bool  # the fused Triton kernels of attention/triton/ compute it (forward and decode)
    naive: Callable
    chunked: Callable
    init_state: Callable
    step: Callable
    fla_forward: Callable | None = None
    fla_kernel_sizes: Callable | None = None  # (m, d) -> the key and value sizes fla_forward's kernel sees (else m, d)
    fla_supports: Callable | None = None  # (m, d) -> whether fla_forward computes these sizes (None: any)
    final_state: Callable | None = None
    read: Callable | None = None
    recall_error: Callable | None = None
    absorb: Callable | None = None
    decayed: Callable | None = None

    @classmethod
    def from_module(cls, name: str, module: ModuleType, **fields) -> "LinearState":
        """The entry of the kind in `module`: its functions by their interface names, unless `fields` name them."""
        names = ("naive", "chunked", "init_state", "step", "fla_forward", "fla_kernel_sizes", "fla_supports",
                 "final_state", "read", "recall_error", "absorb", "decayed")
        fns = {f: getattr(module, f, None) for f in names}
        return cls(name=name, help=(module.__doc__ or "").strip().split("\n")[0], **{**fns, **fields})

    @property
    def serves_memory(self) -> bool:
        """The sparse memory can serve this kind: it has read, recall_error, absorb (and decayed if it decays)."""
        return None not in (self.read, self.recall_error, self.absorb) and (self.decayed is not None or not self.needs_log_decay)

    def state_bytes(self, num_kv_heads: int, m: int, d: int) -> int:
        """Bytes of one row's state (fp32), from the kind's own init_state: what the decode cache holds."""
        state = self.init_state(1, num_kv_heads, m, d, dtype=torch.float32, device="meta")
        # builtins: the 'sum' kind's folder shadows the builtin in this package's namespace
        return builtins.sum(t.numel() * t.element_size() for t in state.tensors())


_KINDS = (
    LinearState.from_module("sum", sum_kind, normalised=True, needs_log_decay=False, needs_beta=False, additive=True,
                            triton=True),
    LinearState.from_module("gated", gated_kind, normalised=True, needs_log_decay=True, needs_beta=False, additive=False,
                            triton=False),
    LinearState.from_module("delta", delta_kind, normalised=False, needs_log_decay=True, needs_beta=True, additive=False,
                            triton=False, final_state=delta_kind.prefill_state),
)
LINEAR_STATES: dict[str, LinearState] = {k.name: k for k in _KINDS}

if tuple(LINEAR_STATES) != LINEAR_STATE_KINDS or {k.name for k in _KINDS if k.normalised} != set(NORMALISED_STATES):
    raise ImportError(f"linear-state registry {tuple(LINEAR_STATES)} disagrees with config.LINEAR_STATE_KINDS "
                      f"{LINEAR_STATE_KINDS} / NORMALISED_STATES {NORMALISED_STATES}")


def linear_state(name: str) -> LinearState:
    if name not in LINEAR_STATES:
        raise ValueError(f"unknown linear state {name!r}; expected one of {tuple(LINEAR_STATES)}")
    return LINEAR_STATES[name]
