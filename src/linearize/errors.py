"""Errors raised by linearize. Each names what was expected, so a user can fix the input."""


class LinearizeError(Exception):
    """Base class for every error linearize raises on bad input."""


class UnknownModelError(LinearizeError):
    """A model name or path that linearize cannot resolve."""


class ModelFileError(LinearizeError):
    """A model file or directory that is missing, unreadable or corrupt."""


class UnsupportedArchitectureError(LinearizeError):
    """A model family that has no attention adapter."""


class DegenerateModelError(LinearizeError):
    """A loaded model whose greedy continuation of a known prompt degenerates (a mis-load)."""


class TrainingDivergedError(LinearizeError):
    """A NaN or infinite loss; the last good checkpoint is kept."""


class DoesNotFitError(LinearizeError):
    """A training step that does not fit in the device's memory even split as far as it goes."""
