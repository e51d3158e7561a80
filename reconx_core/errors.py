"""Errors raised by reconx_core.

Every message names what was wrong and what to do about it. Callers (the ComfyUI nodes, scripts) catch
`ReconXError` and show the message as is; anything else escaping is a bug.
"""


class ReconXError(Exception):
    """Base class of every error that reconx_core raises on purpose."""


class InputError(ReconXError, ValueError):
    """The caller's data is unusable: wrong shape, too small, NaN pixels, too few views, ..."""


class CheckpointError(ReconXError):
    """A model file is missing, truncated, or does not match any known layout."""


class ResourceError(ReconXError):
    """Something the run needs is unavailable: a backbone's weights, a GPU, a compiled kernel, memory."""
