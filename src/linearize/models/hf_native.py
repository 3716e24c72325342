"""Converted models as Hugging Face classes of their own, registered with the Auto classes.

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

from torch import nn
from transformers import (
    AutoConfig, AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
    MistralConfig, MistralForCausalLM, PretrainedConfig, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

__all__ = ["PREFIX", "BASE_CLASSES", "LINEARIZED", "linearized_classes", "adopt"]

#: model_type of a converted model = PREFIX + the base's model_type.
PREFIX = "linearized_"

#: The base classes a converted model derives from, by the base's model_type (the families of models/adapters.py).
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
        from linearize.models.convert import convert_from_config  # convert imports this module

        model_cls.__init__(self, config, *args, **kwargs)
        convert_from_config(self)

    model = type(name + "ForCausalLM", (model_cls,), {
        "config_class": config, "__init__": __init__, "__module__": __name__,
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
