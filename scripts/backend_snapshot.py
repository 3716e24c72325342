"""Save the outputs of every attention path of tiny converted models, then compare two such files bit for bit.

    PYTHONPATH=src python scripts/backend_snapshot.py save /tmp/before.pt     # at the commit before a refactor
    PYTHONPATH=src python scripts/backend_snapshot.py save /tmp/after.pt      # after it
    PYTHONPATH=src python scripts/backend_snapshot.py compare /tmp/before.pt /tmp/after.pt
    PYTHONPATH=src python scripts/backend_snapshot.py save /tmp/gpu.pt --device cuda --dtype bfloat16   # Triton paths

Only the public API is called (`linearize.convert`, `components`, a cache), so the same script runs on both sides of
a change to the backends' signatures. Per family, setting and backend ('reference', 'torch', 'auto'), padded and not:
the logits of the full forward and of cached decoding (a prompt, then one token a step) in every component mode and
a per-head mix, and the gradients of the converted parameters. Fixed seeds; about 30 s on 2 CPU cores. `compare`
exits 1 and names each entry that is not `torch.equal`. On CUDA in bfloat16, backend 'auto' runs the Triton kernels
(compare only saves made on the same kind of device).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MODES = ["hybrid", "swa_only", "la_only", "sinks_only", "none", {0: {1: "la_only", 3: "sinks_only"}}]
SETTINGS = [
    {}, {"placement": "overlap"}, {"combine": "mix", "mix_gate": "dynamic"}, {"combine": "mix", "mix_gate": "learned"},
    {"softmax_sinks": 2}, {"sparse_memory": 3, "memory_block": 4},
    {"softmax_sinks": 2, "sparse_memory": 2, "memory_block": 4, "placement": "overlap"},
    {"window": 1}, {"linear_state": "gated"}, {"linear_state": "delta", "combine": "mix"},
    {"linear_state": "gated", "softmax_sinks": 2, "placement": "overlap"},
]
#: Gemma 3 (sliding and global layers, q/k norms) with the plain, the sparse-memory and the gated settings
GEMMA_SETTINGS = (0, 5, 8)
PROMPT = 9


def _outputs(family: str, settings: dict, backend: str, ids, mask, dtype=torch.float32) -> dict[str, torch.Tensor]:
    import linearize
    from linearize.compat import cache_kwargs
    from tiny_models import tiny_model
    from transformers import DynamicCache

    torch.manual_seed(1)
    hybrid = linearize.HybridConfig(**{"window": 5, "chunk_size": 4, "backend": backend, "num_sinks": 3, **settings})
    model = linearize.convert(tiny_model(family).to(device=ids.device, dtype=dtype), hybrid)
    with torch.no_grad():  # move the added parameters off their initial values
        for name, p in model.named_parameters():
            if any(part in name for part in ("feature_map", "decay_proj", "beta_proj", "gate", "gamma")):
                p.add_(0.1 * torch.randn_like(p))
    out = {}
    for mode in MODES:
        with torch.no_grad(), linearize.components(model, mode):
            out[f"{mode}/full"] = model(ids, attention_mask=mask).logits
            cache = DynamicCache(config=model.config)
            step_mask = (lambda n: {}) if mask is None else (lambda n: {"attention_mask": mask[:, :n]})
            logits = [model(ids[:, :PROMPT], **cache_kwargs(cache), use_cache=True, **step_mask(PROMPT)).logits]
            for i in range(PROMPT, ids.shape[1]):
                logits.append(model(ids[:, i:i + 1], **cache_kwargs(cache), use_cache=True, **step_mask(i + 1)).logits)
            out[f"{mode}/decode"] = torch.cat(logits, 1)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    model(ids, attention_mask=mask).logits.float().square().mean().backward()
    for name, p in model.named_parameters():
        if p.grad is not None and any(part in name for part in ("feature_map", "proj", "gate", "gamma")):
            out[f"grad/{name}"] = p.grad.clone()
    return out


def snapshot(families=("llama", "gemma3"), device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor | str]:
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (2, 21)).to(device)
    mask = torch.ones(2, 21, dtype=torch.long, device=device)
    mask[1, :4] = 0  # left padding
    out = {}
    for family in families:
        for i, settings in enumerate(SETTINGS):
            if family == "gemma3" and i not in GEMMA_SETTINGS:
                continue
            for backend in ("reference", "torch", "auto"):
                for padded in (False, True):
                    tag = f"{family}/{i}/{backend}/{padded}"
                    try:
                        found = _outputs(family, settings, backend, ids, mask if padded else None, dtype)
                    except Exception as exc:  # a refusal is an outcome to keep as well
                        found = {"error": repr(exc)}
                    out.update({f"{tag}/{key}": value.cpu() if torch.is_tensor(value) else value
                                for key, value in found.items()})
    return out


def differences(a: dict, b: dict) -> list[str]:
    """The entries of two snapshots that are not identical (missing ones included)."""
    out = [f"{key}: only in one" for key in sorted(set(a) ^ set(b))]
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        same = torch.equal(x, y) if torch.is_tensor(x) and torch.is_tensor(y) else x == y
        if not same:
            out.append(key)
    return out


def main(argv: list[str]) -> int:
    if len(argv) in (2, 4, 6) and argv[0] == "save":
        options = dict(zip(argv[2::2], argv[3::2]))
        if set(options) - {"--device", "--dtype"}:
            print(__doc__)
            return 2
        found = snapshot(device=options.get("--device", "cpu"), dtype=getattr(torch, options.get("--dtype", "float32")))
        torch.save(found, argv[1])
        print(f"{len(found)} entries saved to {argv[1]} ({sum(isinstance(v, str) for v in found.values())} refusals)")
        return 0
    if len(argv) == 3 and argv[0] == "compare":
        diff = differences(torch.load(argv[1]), torch.load(argv[2]))
        print("\n".join(diff) if diff else f"identical ({len(torch.load(argv[1]))} entries)")
        return 1 if diff else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
