"""Swap a Hugging Face model's attention modules for HybridAttention; save and load converted models.

Converted models as Hugging Face classes of their own, registered with the Auto classes.

A converted checkpoint must never load silently as its base model. So each supported family gets a config class
with its own ``model_type`` (``linearized_<base model_type>``) and a causal-LM class that converts itself in its
constructor from ``config.linearize``; both are registered with ``AutoConfig`` / ``AutoModelForCausalLM`` when
``linearize`` is imported. :func:`linearize.convert` switches a model to these classes, so ``save_pretrained``
writes the new ``model_type`` and ``architectures``, and then, after ``import linearize``,

    AutoModelForCausalLM.from_pretrained(dir)   # the converted model, every weight from the checkpoint

and everything built on it (``pipeline``, lm-eval's ``hf`` model, ``AutoPeftModelForCausalLM``) gets the hybrid.
Without linearize installed, transformers refuses the unknown ``model_type`` with an error naming it, instead of
returning the base model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig, AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
    MistralConfig, MistralForCausalLM, PretrainedConfig, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

from linearize.attention.adapters import adapter_for, layer_types
from linearize.attention.module import HybridAttention, PaddingContext, hybrid_param_kind
from linearize.config import STRUCTURAL_FIELDS, HybridConfig, measured_keep
from linearize.errors import LinearizeError, ModelFileError
from linearize.models import generation
from linearize.models.rundir import check_complete

CONFIG_KEY = "linearize"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at .get_decoder().layers")
    return layers


def text_config(model: nn.Module):
    return model.config.get_text_config(decoder=True)


def resolve_layers(spec, config) -> list[int]:
    n = config.num_hidden_layers
    if measured_keep(spec) is not None:  # needs a model, text and forward passes: resolved before conversion
        raise LinearizeError(f"hybrid.layers={spec!r} is chosen by measurement, which needs text: measure first "
                             f"(`linearize select-layers MODEL --keep K`, or linearize.models.layer_select."
                             f"select_layers; `linearize convert` does it itself) and convert with the list it gives")
    if spec == "all":
        return list(range(n))
    if spec == "global":
        return [i for i, kind in enumerate(layer_types(config)) if kind == "full_attention"]
    layers = sorted(int(i) for i in spec)
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a {n}-layer model")
    return layers


def convert(model: nn.Module, hybrid: HybridConfig | None = None, layers=None) -> nn.Module:
    """Replace the attention of `layers` (default: hybrid.layers) by HybridAttention, in place.

    The base weights are kept; new parameters are the feature maps and the mixing parameters.
    The settings are recorded in `model.config.linearize` so `save_pretrained` + `load` restore them.
    """
    hybrid = hybrid or HybridConfig()
    config = text_config(model)
    adapter = adapter_for(config)
    if layers is not None:
        hybrid.layers = layers if isinstance(layers, str) else list(layers)
    indices = resolve_layers(hybrid.layers, config)
    hybrid = dataclasses.replace(hybrid, layers=indices)  # each layer's settings may depend on its place among them
    padding = PaddingContext()
    blocks = decoder_layers(model)
    ref = next(model.parameters())
    for i in indices:
        base = blocks[i].self_attn
        if isinstance(base, HybridAttention):
            raise ValueError(f"layer {i} is already converted")
        blocks[i].self_attn = HybridAttention(base, config, hybrid, adapter, i, padding).to(device=ref.device, dtype=ref.dtype)
    model.get_decoder().register_forward_pre_hook(padding.hook, with_kwargs=True)
    model.config.__dict__[CONFIG_KEY] = {**hybrid.to_dict(), "layers": indices}
    adopt(model)  # its own model_type from now on: a saved checkpoint cannot load as the base
    return model


def convert_from_config(model: nn.Module) -> nn.Module:
    """Convert a model built from a converted checkpoint's config (the settings in ``config.linearize``)."""
    settings = getattr(model.config, CONFIG_KEY, None)
    if not settings:
        raise ModelFileError(f"{type(model).__name__}: the config has no '{CONFIG_KEY}' settings to convert with")
    return convert(model, HybridConfig.from_dict(dict(settings)))


def hybrid_modules(model: nn.Module) -> list[HybridAttention]:
    return [m for m in model.modules() if isinstance(m, HybridAttention)]


def is_converted(model: nn.Module) -> bool:
    return bool(hybrid_modules(model))


@contextlib.contextmanager
def components(model: nn.Module, modes):
    """Switch attention branches at inference.

    `modes` is a mode for the whole model ('hybrid', 'swa_only', 'la_only', 'sinks_only', 'none'), or a dict
    {layer_idx: mode} (other layers keep theirs), or {layer_idx: {head: mode}} for per-head attribution.
    """
    modules = {m.layer_idx: m for m in hybrid_modules(model)}
    if not modules:
        raise ValueError("model has no converted attention layers; call linearize.convert first")
    saved = {i: (m.mode, m.head_modes) for i, m in modules.items()}
    try:
        if isinstance(modes, str):
            plan = {i: modes for i in modules}
        else:
            missing = set(modes) - set(modules)
            if missing:
                raise ValueError(f"layers {sorted(missing)} are not converted (converted: {sorted(modules)})")
            plan = modes
        for i, mode in plan.items():
            if isinstance(mode, str):
                modules[i].mode = mode
                modules[i].head_modes = None
            else:
                modules[i].head_modes = dict(mode)
            modules[i].head_mode_list()  # validates names
        yield model
    finally:
        for i, (mode, heads) in saved.items():
            modules[i].mode, modules[i].head_modes = mode, heads


def set_hybrid(model: nn.Module, **changes) -> HybridConfig:
    """Change a converted model's computation-only settings in place (window, placement, backend, ...), e.g. to try
    a training-free option on a trained conversion; the change is recorded in the config, so it is saved with it.
    Structural fields (feature maps, the combine rule and its parameters, which layers) are refused."""
    structural = sorted(set(changes) & set(STRUCTURAL_FIELDS))
    if structural:
        raise ValueError(f"{structural} decide the converted layers' parameters; they cannot change after conversion")
    modules = hybrid_modules(model)
    if not modules:
        raise ValueError("model has no converted attention layers; call linearize.convert first")
    current = model.config.__dict__[CONFIG_KEY]
    hybrid = HybridConfig.from_dict({**current, **changes})  # validates names and values
    for m in modules:
        m.hybrid = hybrid
    model.config.__dict__[CONFIG_KEY] = {**hybrid.to_dict(), "layers": current["layers"]}
    return hybrid


def hybrid_config_of(model_or_config) -> HybridConfig:
    config = getattr(model_or_config, "config", model_or_config)
    data = dict(getattr(config, CONFIG_KEY, None) or config.__dict__.get(CONFIG_KEY) or {})
    if not data:
        raise ValueError("this model has no linearize settings in its config (not converted)")
    return HybridConfig.from_dict(data)


def load(path: str | Path, *, dtype=torch.float32, device="cpu", **from_pretrained) -> nn.Module:
    """Load a converted model written by ``save_pretrained`` (in eval mode).

    Takes what ``from_pretrained`` takes (``dtype``, ``device_map``, ...); ``device`` is where the model goes when
    no ``device_map`` is given. A checkpoint written before converted models had their own ``model_type`` (its
    config keeps the base's) is loaded as the base, then converted and given its hybrid parameters.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    check_complete(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelFileError(f"{path} has no config.json; expected a directory written by save_pretrained")
    config = json.loads(config_file.read_text())
    if not config.get(CONFIG_KEY):
        raise ModelFileError(f"{config_file} has no '{CONFIG_KEY}' entry; it is not a converted model")
    if str(config.get("model_type", "")).startswith(PREFIX):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained)
    else:
        model = _load_legacy(path, config[CONFIG_KEY], dtype=dtype, **from_pretrained)
    if "device_map" not in from_pretrained:
        model.to(device)
    return model.eval()


def _load_legacy(path: Path, settings: dict, **from_pretrained) -> nn.Module:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the hybrid parameters are 'unexpected' to the base class; loaded below
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained)
    finally:
        hf_logging.set_verbosity(verbosity)
    convert(model, HybridConfig.from_dict(settings))
    own = {name for name, _ in model.named_parameters() if hybrid_param_kind(name) is not None}
    found = {}
    for shard in sorted(path.glob("*.safetensors")):
        found.update({k: v for k, v in load_file(shard).items() if k in own})
    missing = own - set(found)
    if missing:
        raise ModelFileError(f"{path} lacks hybrid parameters: {sorted(missing)[:5]} ...")
    model.load_state_dict(found, strict=False)
    return model


@torch.no_grad()
def mixing_report(model: nn.Module, input_ids: torch.Tensor | None = None) -> dict | None:
    """Where the mixing weights ended, per layer and head: gamma (shared_norm) or g, the window's share (mix).

    An input-dependent gate is averaged over the tokens of `input_ids` (a hybrid forward, rows without padding);
    its spread over tokens is `token_std`. None when the rule has nothing to learn (mix with a fixed g).
    """
    modules = hybrid_modules(model)
    if not modules:
        raise ValueError("model has no converted attention layers; call linearize.convert first")
    h = modules[0].hybrid
    if h.combine == "mix" and h.mix_gate == "fixed":
        return None
    values, spread = {}, {}
    if h.combine == "mix" and h.mix_gate == "dynamic":
        if input_ids is None:
            raise ValueError("an input-dependent gate needs input_ids to be measured on")
        gates: dict[int, list[torch.Tensor]] = {m.layer_idx: [] for m in modules}
        hooks = [m.gate.register_forward_hook(lambda mod, args, out, i=m.layer_idx: gates[i].append(torch.sigmoid(out.float())))
                 for m in modules]
        try:
            with components(model, "hybrid"):
                # the decoder alone: the gates are all we need, not the vocabulary logits
                model.get_decoder()(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        for i, g in gates.items():
            g = torch.cat([x.flatten(0, -2) for x in g])  # (tokens, heads)
            values[i], spread[i] = g.mean(0), g.std(0)
    else:
        values = {m.layer_idx: m.mixing_weight(None).float() for m in modules}
    every = torch.cat(list(values.values()))
    report = {"weight": "gamma" if h.combine == "shared_norm" else "g (SWA share)",
              "gate": None if h.combine == "shared_norm" else h.mix_gate,
              "mean": round(every.mean().item(), 4), "min": round(every.min().item(), 4),
              "max": round(every.max().item(), 4),
              "layers": {str(i): [round(x, 4) for x in v.tolist()] for i, v in sorted(values.items())}}
    if spread:
        report["token_std"] = {str(i): [round(x, 4) for x in v.tolist()] for i, v in sorted(spread.items())}
    return report

# ---------------------------------------------------------------------------------------------------------------
# The converted models' own Hugging Face classes (see the module doc). Here, not in a module of their own:
# constructing one converts it, and converting a model switches it to them.
# ---------------------------------------------------------------------------------------------------------------

#: model_type of a converted model = PREFIX + the base's model_type.
PREFIX = "linearized_"

#: The base classes a converted model derives from, by the base's model_type (the families of attention/adapters.py).
BASE_CLASSES: dict[str, tuple[type[PretrainedConfig], type[nn.Module]]] = {
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def _make(base_type: str, config_cls, model_cls) -> tuple[type, type]:
    name = "Linearized" + model_cls.__name__.removesuffix("ForCausalLM")
    config = type(name + "Config", (config_cls,), {
        "model_type": PREFIX + base_type, "base_model_type": base_type, "__module__": __name__,
        "__doc__": f"{config_cls.__name__} of a model converted by linearize; the settings are in `linearize`."})
    def __init__(self, config, *args, **kwargs):
        model_cls.__init__(self, config, *args, **kwargs)
        convert_from_config(self)

    def generate(self, *args, **kwargs):  # the captured decode step on CUDA where it applies (models/generation.py)
        return generation.generate(self, model_cls.generate.__get__(self), *args, **kwargs)

    model = type(name + "ForCausalLM", (model_cls,), {
        "config_class": config, "__init__": __init__, "generate": generate, "__module__": __name__,
        "__doc__": f"{model_cls.__name__} whose attention layers are linearize's HybridAttention."})
    AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModelForCausalLM.register(config, model, exist_ok=True)
    return config, model


#: base model_type -> (config class, model class) of its converted form; registered with the Auto classes.
LINEARIZED: dict[str, tuple[type, type]] = {t: _make(t, c, m) for t, (c, m) in BASE_CLASSES.items()}
globals().update({cls.__name__: cls for pair in LINEARIZED.values() for cls in pair})


def linearized_classes(model_type: str) -> tuple[type, type] | None:
    return LINEARIZED.get(model_type.removeprefix(PREFIX))


def adopt(model: nn.Module) -> bool:
    """Switch a freshly converted model (and its config) to its linearized classes, in place.

    Only a model of exactly a family's base class is switched (a subclass, or a multimodal wrapper around a text
    model, keeps its class: ``linearize.load`` still restores it). Returns whether the model was switched.
    """
    pair = linearized_classes(model.config.model_type)
    if pair is None:
        return False
    config_cls, model_cls = pair
    if type(model) is model_cls:
        return True
    if type(model) is not model_cls.__mro__[1] or type(model.config) is not config_cls.__mro__[1]:
        return False
    model.config.__class__ = config_cls
    model.__class__ = model_cls
    return True
