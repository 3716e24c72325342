"""HybridAttention: the drop-in replacement for a Hugging Face attention module.

It reuses the base module's q/k/v/o projections and q/k norms (same parameter names, so base weights
load unchanged), the family's RoPE and softmax scale, and adds per-head feature maps (with qk_conv, a short causal
convolution on the q/k they read, `features`) plus the mixing parameters. Which branches run is set by `mode` (whole layer) or `head_modes` (per head); training
can replace 'hybrid' by 'la_only' through `drop_swa` (Scheduled Sliding-window Dropout).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from linearize.attention.adapters import FamilyAdapter, head_dim, layer_types
from linearize.attention.cache import hybrid_cache_layer, take_cache
from linearize.attention.chunked import hybrid_attention_chunked, reads_linear_sums
from linearize.attention.common import causal_conv, softmax_attention
from linearize.attention.linear import fla_route, linear_state
from linearize.attention.recurrent import decode_step, prefill_selecting, prefill_state
from linearize.attention.reference import hybrid_attention_reference
from linearize.attention.spec import AttentionSpec
from linearize.config import ComponentMode, HybridConfig, component_mode
from linearize.feature_maps import FeatureMap


#: With backend 'auto' off CUDA, rows of at most this many chunks take the quadratic path: on a 2-core CPU it is
#: 3-6x faster than the chunked one up to T = 256 (chunk 64) and slower beyond (fp32, Gemma 3 270M head shapes).
DENSE_UP_TO_CHUNKS = 4


class PaddingContext:
    """The 2-D attention mask of the current forward, shared by all converted layers of a model.

    Set by a forward pre-hook on the decoder; each layer takes the columns of its own new tokens,
    so padding never enters the linear-attention sums or the window.
    """

    def __init__(self):
        self.mask: torch.Tensor | None = None

    def hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
        if self.mask is None or kwargs.get("position_ids") is not None or bool(self.mask.all()):
            return None
        tokens = next((kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None), args[0] if args else None)
        if tokens is None or self.mask.shape[1] < tokens.shape[1]:
            return None
        # Padded rows without position_ids: count positions over the valid tokens, as generate does. Softmax is blind
        # to a shift of every position (RoPE is relative), the feature maps of the linear branch are not: a left-padded
        # row would otherwise see other rotations than the same row unpadded.
        positions = (self.mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens.shape[1]:]
        return args, {**kwargs, "position_ids": positions.to(tokens.device)}

    def valid(self, batch: int, length: int, device) -> torch.Tensor | None:
        if self.mask is None or self.mask.shape[0] != batch or self.mask.shape[1] < length:
            return None
        return self.mask[:, -length:].to(device=device, dtype=torch.bool)


def hybrid_param_kind(name: str) -> str | None:
    """What a parameter that a conversion adds is, from its name in the model: 'feature_map' (with the q/k convolution
    before the feature maps, which trains with them), 'linear_state' (the
    gated/delta states' decay and beta projections; they train with the feature maps), 'mixing' (gamma, the learned or
    input-dependent gate) or None for the base model's own parameters (LoRA included)."""
    if ".feature_map_q." in name or ".feature_map_k." in name or name.endswith((".qk_conv_q", ".qk_conv_k")):
        return "feature_map"
    if ".decay_proj." in name or ".beta_proj." in name:
        return "linear_state"
    if name.endswith(("gamma_logit", "gate_logit")) or ".gate." in name:
        return "mixing"
    return None


def _identity_taps(heads: int, channels: int, taps: int) -> torch.Tensor:
    """(heads, channels, taps) filters of `common.causal_conv` that pass the input through unchanged."""
    return F.one_hot(torch.full((heads, channels), taps - 1), taps).float()


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _triton_available(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    try:
        import linearize.attention.triton  # noqa: F401
    except ImportError:
        return False
    return True


class Route(NamedTuple):
    """Which implementation runs one call of the layer (`choose_backend`)."""

    backend: str  # 'triton', 'torch' (chunked) or 'reference'; decoding: 'triton' or 'torch' (recurrent)
    linear_backend: str = "chunked"  # the chunked path's linear sums: 'chunked' (PyTorch) or 'fla'
    cast: torch.dtype | None = None  # Triton on fp32 inputs under autocast: the dtype the kernels run in


def choose_backend(spec: AttentionSpec, q: torch.Tensor, mode: ComponentMode | None = None,
                   features: int | None = None, kv_heads: int | None = None) -> Route:
    """The one place that decides which backend runs: a full-sequence call in `mode`, or (mode None) one decoding
    step of every mode. `spec.backend` 'auto' takes Triton on CUDA where the kernels compute the call, else PyTorch;
    the chunked path's linear sums take flash-linear-attention where `fla_route.usable` says so (`features`: the
    feature size m, `kv_heads` the key/value heads; by default q's head size and head count)."""
    kind = linear_state(spec.linear_state)
    if mode is None:
        triton = kind.triton and not spec.softmax_extras and (
            spec.backend == "triton" or (spec.backend == "auto" and _triton_available(q)))
        return Route("triton" if triton else "torch")
    # softmax sinks and sparse memory change the modes with a window only; the Triton kernels do not have them
    extras = spec.softmax_extras and mode.uses_window
    backend, linear_backend = spec.backend, "chunked"
    if backend == "auto":
        backend = "triton" if kind.triton and _triton_available(q) and not extras else "torch"
        shape = fla_route.Shape(m=features or q.shape[-1], d=q.shape[-1], b=q.shape[0], hq=q.shape[1],
                                hkv=kv_heads or q.shape[1])
        if not kind.triton and reads_linear_sums(spec, mode) and fla_route.usable(kind, q, shape):
            linear_backend = "fla"
        elif backend == "torch" and q.shape[2] <= DENSE_UP_TO_CHUNKS * spec.chunk_size and not spec.sparse_memory:
            backend = "reference"  # short rows (benchmark prompts): one (T x T) product beats the chunk bookkeeping
    cast = None
    if backend == "triton" and q.dtype == torch.float32:
        # the kernels tile for 16-bit inputs (fp32 tiles of head_dim 256 overflow shared memory); under autocast
        # run them in its dtype, else fp32 takes the chunked PyTorch path
        if torch.is_autocast_enabled("cuda"):
            cast = torch.get_autocast_dtype("cuda")
        elif spec.backend == "auto":
            backend = "torch"
    return Route(backend, linear_backend, cast)


class HybridAttention(nn.Module):
    def __init__(self, base_attention: nn.Module, model_config, hybrid: HybridConfig, adapter: FamilyAdapter,
                 layer_idx: int, padding: PaddingContext):
        super().__init__()
        self.scale = adapter.scale(model_config)
        self.layer_idx = layer_idx
        self.hybrid = hybrid  # after the scale and the index: setting it builds the spec
        self.padding = padding
        self.num_heads = model_config.num_attention_heads
        self.num_kv_heads = model_config.num_key_value_heads
        self.head_dim = head_dim(model_config)
        self._rope = adapter.rope()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj") + (("q_norm", "k_norm") if adapter.qk_norm else ()):
            setattr(self, name, getattr(base_attention, name))
        self.qk_norm = adapter.qk_norm
        h = hybrid
        self.feature_map_q = FeatureMap(self.num_heads, self.head_dim, h.feature_map, h.feature_size, h.init_noise)
        self.feature_map_k = FeatureMap(self.num_kv_heads, self.head_dim, h.feature_map, h.feature_size, h.init_noise)
        if h.qk_conv:  # (H, d, K) taps, starting as the identity: the last tap (the token itself) 1, the past ones 0
            self.qk_conv_q = nn.Parameter(_identity_taps(self.num_heads, self.head_dim, h.qk_conv))
            self.qk_conv_k = nn.Parameter(_identity_taps(self.num_kv_heads, self.head_dim, h.qk_conv))
        if h.combine == "shared_norm":
            self.gamma_logit = nn.Parameter(torch.full((self.num_heads,), _logit(h.gamma_init)), requires_grad=h.gamma_trainable)
        elif h.mix_gate == "learned":
            self.gate_logit = nn.Parameter(torch.full((self.num_heads,), _logit(min(max(h.mix_value, 1e-4), 1 - 1e-4))))
        elif h.mix_gate == "dynamic":
            self.gate = nn.Linear(model_config.hidden_size, self.num_heads)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, _logit(min(max(h.mix_value, 1e-4), 1 - 1e-4)))
        self.linear_kind = linear_state(h.linear_state)
        if self.linear_kind.needs_log_decay:  # log_decay = -softplus(x W + b); W = 0 starts every head at decay_init
            self.decay_proj = nn.Linear(model_config.hidden_size, self.num_kv_heads)
            nn.init.zeros_(self.decay_proj.weight)
            nn.init.constant_(self.decay_proj.bias, math.log(1 / h.decay_init - 1))
        if self.linear_kind.needs_beta:  # beta = sigmoid(x W + b)
            self.beta_proj = nn.Linear(model_config.hidden_size, self.num_kv_heads)
            nn.init.zeros_(self.beta_proj.weight)
            nn.init.constant_(self.beta_proj.bias, _logit(h.delta_beta_init))
        kinds = layer_types(model_config)
        # the base layer's own softmax window (Gemma 3 local layers, Mistral): the teacher's attention span
        self.base_sliding_window = model_config.sliding_window if kinds[layer_idx] == "sliding_attention" else None
        self.mode = "hybrid"
        self.head_modes: dict[int, str] | None = None
        self.drop_swa: bool | torch.Tensor | None = None
        # training hook: called as hook(module, q, k, v, valid, weight, hidden_states) in full-sequence forwards;
        # a tensor it returns (B, Hq, T, d) replaces the layer's per-head output (e.g. the teacher's)
        self.transfer_hook = None

    @property
    def hybrid(self) -> HybridConfig:
        return self._hybrid

    @hybrid.setter
    def hybrid(self, hybrid: HybridConfig) -> None:
        """Settings change as a whole (`convert.set_hybrid`); the spec the backends read follows them."""
        self._hybrid = hybrid
        self.spec = AttentionSpec.from_config(hybrid, self.scale, self.layer_idx)

    # -- pieces the training and diagnostics code reuses -------------------------------------------
    def project(self, hidden_states, position_embeddings):
        """q (B, Hq, T, d), k and v (B, Hkv, T, d) exactly as the base attention computes them."""
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin)
        return q, k, v

    def mixing_weight(self, hidden_states) -> torch.Tensor | float:
        """gamma (shared_norm) or g (mix): per head (Hq,), per token (B, Hq, T), or a constant."""
        h = self.hybrid
        if h.combine == "shared_norm":
            return torch.sigmoid(self.gamma_logit)
        if h.mix_gate == "learned":
            return torch.sigmoid(self.gate_logit + h.mix_shift)
        if h.mix_gate == "dynamic":
            return torch.sigmoid(self.gate(hidden_states) + h.mix_shift).transpose(1, 2)
        return h.mix_value

    def state_inputs(self, hidden_states, valid) -> dict:
        """The linear state's gates from the layer input (B, T, hidden), fp32 (B, Hkv, T): log_decay (0 at padding,
        so a padded row decays as the row alone) and beta; {} for the 'sum' state."""
        x = hidden_states.float()
        out = {}
        for name, proj, fn in (("log_decay", "decay_proj", lambda a: -F.softplus(a)), ("beta", "beta_proj", torch.sigmoid)):
            if hasattr(self, proj):
                layer = getattr(self, proj)
                out[name] = fn(F.linear(x, layer.weight.float(), layer.bias.float())).transpose(1, 2)
        if "log_decay" in out and valid is not None:
            out["log_decay"] = out["log_decay"] * valid[:, None, :].to(torch.float32)
        return out

    def features(self, q, k, valid, history=None):
        """qf (B, Hq, T, m) and kf (B, Hkv, T, m), the linear branch's features of q and k (B, H, T, d): with qk_conv,
        the feature maps read q and k through the causal convolution (`causal_conv`; `history`: the state's last
        K - 1 queries and keys, None at the start of the rows). Returns (qf, kf, the history after these tokens or
        None without qk_conv)."""
        if not self.hybrid.qk_conv:
            return self.feature_map_q(q), self.feature_map_k(k), None
        hq, hk = history if history is not None else (None, None)
        q, hq = causal_conv(q, self.qk_conv_q, valid, hq)
        k, hk = causal_conv(k, self.qk_conv_k, valid, hk)
        return self.feature_map_q(q), self.feature_map_k(k), (hq, hk)

    def attend(self, q, k, v, weight, valid, mode: str | ComponentMode, gates: dict | None = None) -> torch.Tensor:
        """The hybrid layer's per-head output (B, Hq, T, d) for one component mode, full sequence. `gates`: the linear
        state's log_decay / beta (`state_inputs`), needed by the kinds that use them."""
        mode = component_mode(mode)
        spec = self.spec.full_forward()  # under memory_select 'query' the memory acts at prefill only
        gates = gates or {}
        kind = self.linear_kind
        needed = {name for name, needs in (("log_decay", kind.needs_log_decay), ("beta", kind.needs_beta)) if needs}
        if mode.uses_linear and not needed <= set(gates):
            raise ValueError(f"linear_state {spec.linear_state!r} needs the layer's gates: pass "
                             f"gates=module.state_inputs(hidden_states, valid)")
        route = choose_backend(spec, q, mode, self.feature_map_k.num_features, self.num_kv_heads)
        if mode.uses_linear or route.backend == "triton":
            qf, kf, _ = self.features(q, k, valid)
        else:  # these modes never read the features: skip the feature maps
            qf, kf = q, k
        if route.backend == "triton":
            from linearize.attention.triton import hybrid_attention_triton

            if route.cast is not None:
                q, k, v, qf, kf = (x.to(route.cast) for x in (q, k, v, qf, kf))
            return hybrid_attention_triton(q, k, v, qf, kf, spec=spec, mode=mode, weight=weight, valid=valid)
        dtype = q.dtype
        f32 = [x.float() for x in (q, k, v, qf, kf)]
        weight = weight.float() if torch.is_tensor(weight) else weight
        call = dict(spec=spec, mode=mode, weight=weight, valid=valid, **gates)
        if route.backend == "reference":
            return hybrid_attention_reference(*f32, **call).to(dtype)
        return hybrid_attention_chunked(*f32, linear_backend=route.linear_backend, **call).to(dtype)

    def head_mode_list(self) -> list[str]:
        modes = [self.mode] * self.num_heads
        for head, mode in (self.head_modes or {}).items():
            modes[head] = mode
        for mode in set(modes):
            component_mode(mode)
        return modes

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        cache = take_cache(kwargs)
        b, t, _ = hidden_states.shape
        q, k, v = self.project(hidden_states, position_embeddings)
        valid = self.padding.valid(b, t, q.device)
        weight = self.mixing_weight(hidden_states)
        hook = self.transfer_hook if cache is None else None
        out = hook(self, q, k, v, valid, weight, hidden_states) if hook is not None else None
        gates = self.state_inputs(hidden_states, valid) if out is None else {}
        if out is None and cache is not None:
            out = self._forward_cached(cache, q, k, v, weight, valid, gates)
        elif out is None:
            out = self._forward_full(q, k, v, weight, valid, gates)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out), None

    def _forward_full(self, q, k, v, weight, valid, gates=None):
        modes = self.head_mode_list()
        drop = self.drop_swa
        if drop is not None and not (isinstance(drop, bool) and not drop) and "hybrid" in modes:
            if isinstance(drop, bool):
                modes = ["la_only" if m == "hybrid" else m for m in modes]
            else:  # per sample: la_only rows where drop is True
                hybrid = self._by_head(q, k, v, weight, valid, modes, gates)
                dropped = self._by_head(q, k, v, weight, valid, ["la_only" if m == "hybrid" else m for m in modes], gates)
                return torch.where(drop.view(-1, 1, 1, 1).to(q.device), dropped, hybrid)
        return self._by_head(q, k, v, weight, valid, modes, gates)

    def _by_head(self, q, k, v, weight, valid, modes, gates=None):
        distinct = sorted(set(modes))
        if len(distinct) == 1:
            return self.attend(q, k, v, weight, valid, distinct[0], gates)
        out = torch.zeros_like(q)
        for mode in distinct:
            heads = torch.tensor([i for i, m in enumerate(modes) if m == mode], device=q.device)
            out[:, heads] = self.attend(q, k, v, weight, valid, mode, gates)[:, heads]
        return out

    def _forward_cached(self, cache, q, k, v, weight, valid, gates):
        layer = hybrid_cache_layer(cache, self.layer_idx)
        spec = self.spec
        if layer.state is None:
            if spec.selects_at_prefill and spec.memory_prefill == "exact":  # the base's attention (a diagnostic)
                out = softmax_attention(q, k, v, scale=self.scale, window=self.base_sliding_window, valid=valid)
            else:
                out = self._forward_full(q, k, v, weight, valid, gates)
            qf, kf, conv_history = self.features(q, k, valid)
            if valid is None:
                valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
            # non-additive states keep one state per lag the modes read (linear_lag); 'sum' serves every mode
            modes = self.head_mode_list()
            lags = {component_mode(m).linear_lag(spec.placement, spec.window) for m in modes} - {None}
            if not spec.selects_at_prefill:
                layer.state = prefill_state(k, v, kf, valid, spec=spec, lags=lags, conv_history=conv_history, **gates)
                return out
            # memory_select 'query': the memory is chosen now, and the prompt's last memory_reread tokens are
            # decoded against it (their outputs replace the full forward's)
            layer.state, per_mode = prefill_selecting(q, k, v, qf, kf, valid, spec=spec, modes=sorted(set(modes)),
                                                      weight=weight, lags=lags, conv_history=conv_history, **gates)
            reread = _by_mode(per_mode, modes).to(out.dtype)
            return torch.cat([out[:, :, :out.shape[2] - reread.shape[2]], reread], dim=2)
        modes = self.head_mode_list()
        state = layer.state
        if (state.conv_q is not None) != bool(self.hybrid.qk_conv):
            raise ValueError(f"this cache was prefilled {'with' if state.conv_q is not None else 'without'} the q/k "
                             f"convolution and the layer has qk_conv={self.hybrid.qk_conv}: start with an empty cache")
        history = None if state.conv_q is None else (state.conv_q, state.conv_k)
        qf, kf, history = self.features(q, k, valid, history)
        if history is not None:  # in place, same shapes: a captured CUDA-graph step replays it
            state.conv_q.copy_(history[0])
            state.conv_k.copy_(history[1])
        step = decode_step
        if choose_backend(spec, q).backend == "triton":
            from linearize.attention.triton import decode_step_triton as step
        outs = []
        for i in range(q.shape[2]):
            sl = slice(i, i + 1)
            w = weight[..., sl] if torch.is_tensor(weight) and weight.dim() == 3 else weight
            step_valid = None if valid is None else valid[:, sl]
            step_gates = {name: g[:, :, sl] for name, g in gates.items()}
            # every mode reads the state before this token; then the token is appended once, in place
            per_mode = step(layer.state, q[:, :, sl], k[:, :, sl], v[:, :, sl], qf[:, :, sl], kf[:, :, sl], spec=spec,
                            modes=sorted(set(modes)), weight=w, valid=step_valid, **step_gates)
            outs.append(_by_mode(per_mode, modes))
        return torch.cat(outs, dim=2)


def _by_mode(per_mode: dict[str, torch.Tensor], modes: list[str]) -> torch.Tensor:
    """Outputs (B, Hq, n, d): head h from the output of its mode modes[h]."""
    if len(per_mode) == 1:
        return per_mode[modes[0]]
    return torch.stack([per_mode[m][:, head] for head, m in enumerate(modes)], dim=1)
