"""linearize: convert pretrained Transformers into linear + sliding-window attention hybrids."""

__version__ = "0.1.0"
