"""Exceptions. ``GraphpruneError`` and its subclasses are errors a user can cause: the CLI prints one line, exit 2.
``InternalError`` is a bug (a pass that raised, or produced an invalid model): one line, exit 1."""

from __future__ import annotations


class GraphpruneError(Exception):
    """An error the user can fix (bad path, malformed model, bad config). Its message is one line."""


class ModelLoadError(GraphpruneError):
    """The model file is missing, not ONNX, truncated, or its external data is missing or unsafe."""


class ConfigError(GraphpruneError):
    """A pipeline or pass config is invalid; the message names the key."""


class VerificationError(GraphpruneError):
    """The optimized model's outputs do not match the original within the configured thresholds."""


class DataError(GraphpruneError):
    """User data (``--data``: npz, image folder, text + tokenizer, feed dicts) is missing, malformed or does not fit
    the model; the message names the file, the input or the numbers."""


class InternalError(Exception):
    """A bug, not the user's doing: a pass raised an unexpected exception or produced an invalid model. The message
    names the pass and what ran before it; the CLI prints it with exit code 1 (traceback with ``--debug``)."""
