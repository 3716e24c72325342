"""linearize: convert pretrained Transformers into linear + sliding-window attention hybrids."""

from linearize.config import HybridConfig
from linearize.models.convert import components, convert, hybrid_config_of, is_converted, load, set_hybrid

__version__ = "0.1.0"


def load_base(name_or_path: str, **kwargs):
    """Load a base model and tokenizer (HF directory, .gguf file or short name); see linearize.models.loading."""
    from linearize.models.loading import load_base as _load_base

    return _load_base(name_or_path, **kwargs)


__all__ = ["HybridConfig", "components", "convert", "hybrid_config_of", "is_converted", "load", "load_base", "set_hybrid"]
