"""The gated delta rule (Gated DeltaNet) as a linear-state kind of the hybrid layer.

Unit-norm features k^, q^; per key/value head a state S (m x d), decayed by exp(log_decay[t]) at every step and
corrected towards each entering value: S <- S + beta_s k^_s (v_s - S^T k^_s)^T; num = S^T q^_t. No normaliser:
den is 1 once a key has entered, else 0, so it suits the 'mix' combine rule only. `naive` is the definition;
`chunked` (training, CPU), `step` (decoding) and `fla_forward` (GPU, flash-linear-attention) equal it.
"""

from linearize.attention.linear.delta.chunked import chunked, prefill_state
from linearize.attention.linear.delta.fla import fla_forward, fla_supports
from linearize.attention.linear.delta.naive import naive
from linearize.attention.linear.delta.memory import absorb, recall_error
from linearize.attention.linear.delta.recurrent import DeltaState, decayed, init_state, read, step

__all__ = ["naive", "chunked", "init_state", "step", "fla_forward", "fla_supports", "prefill_state", "DeltaState",
           "absorb", "decayed", "read", "recall_error"]
