"""`linearize info MODEL`: the architecture, and what conversion would change."""

from __future__ import annotations

import argparse

from linearize.config import HybridConfig, measured_keep


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="print a model's attention layout and what conversion would change")
    p.add_argument("model", help="HF directory, .gguf file, converted directory, or a short name (gemma3-270m, smollm2-135m)")
    p.add_argument("--window", type=int, default=HybridConfig.window)
    p.add_argument("--feature-map", default=HybridConfig.feature_map)
    p.add_argument("--feature-size", default=HybridConfig.feature_size, choices=["full", "half"])
    p.add_argument("--layers", default="all", help="'all', 'global' or comma-separated layer indices")
    p.add_argument("--context", type=int, default=32768, help="context length for the cache-size comparison")
    p.set_defaults(func=run)


def parse_layers(text: str):
    if text in ("all", "global") or measured_keep(text) is not None:  # 'measured:K' is refused with its reason
        return text
    return [int(x) for x in text.split(",") if x]


def run(args: argparse.Namespace) -> int:
    from linearize.evaluate.lm_eval_model import converted_dir_info
    from linearize.models.convert import hybrid_config_of, hybrid_modules, load
    from linearize.models.loading import load_base

    if converted_dir_info(args.model) is not None:
        model = load(args.model)
        hybrid = hybrid_config_of(model)
    else:
        model, _ = load_base(args.model, check=False)
        hybrid = HybridConfig(window=args.window, feature_map=args.feature_map, feature_size=args.feature_size,
                              layers=parse_layers(args.layers))
    print(describe(model, hybrid, args.context, converted=bool(hybrid_modules(model))))
    return 0


def describe(model, hybrid: HybridConfig, context: int, converted: bool) -> str:
    import torch

    from linearize.attention.adapters import adapter_for, head_dim, layer_types
    from linearize.attention.linear import fla_route, linear_state
    from linearize.feature_maps import num_features
    from linearize.models.convert import resolve_layers, text_config
    from linearize.models.memory import decode_state_bytes

    c = text_config(model)
    d = head_dim(c)
    kinds = layer_types(c)
    layers = resolve_layers(hybrid.layers, c)
    m = num_features(hybrid.feature_map, d, hybrid.feature_size)
    adapter = adapter_for(c)
    params = sum(p.numel() for p in model.parameters())
    proj = d if hybrid.feature_size == "full" else d // 2
    new_params = len(layers) * (c.num_attention_heads + c.num_key_value_heads) * d * proj
    # fp32, as the model loads by default
    base_kv = decode_state_bytes(c, context, dtype_bytes=4)
    converted_bytes = decode_state_bytes(c, context, dtype_bytes=4, hybrid=hybrid, layers=layers)
    growing = [i for i in range(c.num_hidden_layers) if i not in layers and kinds[i] != "sliding_attention"]
    rings = c.num_hidden_layers - len(layers) - len(growing)  # unconverted sliding layers: a ring of their window
    lines = [
        f"model           {type(model).__name__} (model_type {c.model_type}, adapter '{adapter.family}'), {params / 1e6:.1f}M parameters",
        f"layers          {c.num_hidden_layers}: " + ", ".join(f"{n}x {k}" for k, n in sorted({k: kinds.count(k) for k in kinds}.items())),
        f"heads           {c.num_attention_heads} query, {c.num_key_value_heads} key/value, head_dim {d}, scale {adapter.scale(c):.4g}"
        + (", q/k norms" if adapter.qk_norm else ""),
        f"base window     {getattr(c, 'sliding_window', None)} (sliding layers)" if "sliding_attention" in kinds else "base window     none (all layers full attention)",
        f"status          {'converted' if converted else 'base model (not converted)'}",
        "",
        "conversion" + (" (as converted)" if converted else " (would)"),
        f"  layers        {len(layers)} of {c.num_hidden_layers}: {layers}",
        f"  attention     softmax over the last {hybrid.window} keys + linear attention ({hybrid.placement}), combined by {hybrid.combine}",
        f"  feature map   {hybrid.feature_map}, W {d}x{proj} per head -> {m} features",
        f"  linear state  {hybrid.linear_state}: {fla_route.describe(linear_state(hybrid.linear_state), m, d, cuda=torch.cuda.is_available())}",
        f"  new params    ~{new_params / 1e6:.2f}M feature-map weights (+ mixing parameters)",
        f"  decode cache  at {context} tokens, fp32, batch 1: base {base_kv / 2**20:.1f} MiB -> converted {converted_bytes / 2**20:.1f} MiB"
        + (f" (unconverted full-attention layers {growing} still grow)" if growing else " (constant in context"
           + (f"; {rings} unconverted sliding-window layers on rings of {c.sliding_window} keys)" if rings else ")")),
    ]
    return "\n".join(lines)
