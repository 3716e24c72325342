"""Triton kernels for the hybrid layer (GPU; also runs on CPU under TRITON_INTERPRET=1).

    hybrid_attention_triton       chunked forward + backward, same semantics and keywords as
                                  linearize.attention.chunked.hybrid_attention_chunked
    decode_output_triton          one decoding step's output against the fixed-shape HybridState, same contract as
                                  linearize.attention.recurrent.decode_output
    decode_step_triton            outputs for several component modes, then the token appended in place, same
                                  contract as linearize.attention.recurrent.decode_step
    decode.fused_decode_step      the whole decode step of one component mode in one launch (ring and state
                                  written in place); decode_step_triton and recurrent.decode_step run it where it
                                  applies (LINEARIZE_FUSED_DECODE=0: not)
    hybrid_attention_op           the kernels as torch.library custom ops (linearize::hybrid_fwd / hybrid_bwd), what
                                  hybrid_attention_triton runs under torch.compile (ops.py)

Importing this package raises ImportError when triton is not installed (HybridAttention then keeps the
PyTorch path).
"""

from __future__ import annotations

import triton  # noqa: F401  -- ImportError here means: no Triton, use the PyTorch paths

from linearize.attention.triton.hybrid import TUNING, decode_output_triton, decode_step_triton, hybrid_attention_triton
from linearize.attention.triton.ops import hybrid_attention_op  # registers linearize::hybrid_fwd / hybrid_bwd

__all__ = ["TUNING", "decode_output_triton", "decode_step_triton", "hybrid_attention_op", "hybrid_attention_triton"]
