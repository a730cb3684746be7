"""The error of a source checkpoint that cannot be used, shared by the modules that read one.

``checkpoint.py`` (resolving ids and folders, reading configs) and ``weights.py`` (reading tensors; its
``WeightError`` is a :class:`CheckpointError`) both raise it; it lives here, standard library only, so that
``checkpoint.py`` can import ``weights.py`` without ``weights.py`` importing it back.
"""
from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(RuntimeError):
    """A source checkpoint is missing, unreadable or of an unsupported kind."""
