"""The error hierarchy of the engine.

Every error a client or operator can cause derives from :class:`PeftServeError` and carries the name of
the Triton error code it maps to, so the Triton glue maps errors in one place and the CLI tools can map
the same classes to exit codes. Each subclass also inherits the builtin it refines, so plain ``except
ValueError`` callers keep working.
"""

from __future__ import annotations


class PeftServeError(Exception):
    """Base class; ``triton_code`` names a ``pb_utils.TritonError`` code."""

    triton_code = "INTERNAL"


class ConfigError(PeftServeError, ValueError):
    """The model configuration is invalid; raised at load so the model never becomes ready."""


class InvalidRequestError(PeftServeError, ValueError):
    """A request argument is missing, malformed or out of its allowed range."""

    triton_code = "INVALID_ARG"


class AdapterNotFoundError(PeftServeError, LookupError):
    """The request names an adapter that the adapter repository does not hold."""

    triton_code = "NOT_FOUND"


class AdapterLoadError(PeftServeError, RuntimeError):
    """An adapter exists but its files cannot be served (broken, unsafe or incompatible)."""

    triton_code = "UNAVAILABLE"


class UnsupportedAdapterError(AdapterLoadError):
    """The adapter's PEFT type or one of its options is not supported by the engine."""

    triton_code = "UNSUPPORTED"


class OverLimitError(PeftServeError, RuntimeError):
    """An adapter's request rate or requests in flight exceed its configured limit; refused at once."""

    triton_code = "UNAVAILABLE"


class BlockedContentError(InvalidRequestError):
    """The prompt or the generated answer matched one of the configured blocked-content patterns."""


class CancelledError(PeftServeError):
    """The client cancelled the request or went away; its generation stopped within one step."""

    triton_code = "CANCELLED"


class CacheFullError(AdapterLoadError):
    """Every cached adapter is pinned or in use by running requests; a request can wait for one to leave."""


class AdapterNotReady(PeftServeError):
    """Internal: the adapter a queued request needs is not in memory (evicted or replaced meanwhile); the
    batching loop hands the request back to a loader thread instead of reading files itself."""
