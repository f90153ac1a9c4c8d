"""A fused kernel that, once it fails, gives its work to PyTorch for the rest of the process.

A training run must not die because Triton cannot build or launch a kernel for this GPU or
Triton version: the first failure warns once, naming the error and what takes over, and the
caller's PyTorch path (the same results) runs from then on. The fused search, its selections,
the int8 copy's write and the LOOK loss terms each hold one.
"""

from __future__ import annotations

import warnings

__all__ = ["KernelFallback"]


class KernelFallback:
    """Whether a fused kernel is still used (``failed`` False), and the one warning on failure:
    "``what`` failed (ErrorType: error); ``instead``"."""

    def __init__(self, what: str, instead: str) -> None:
        self.what = what
        self.instead = instead
        self.failed = False

    def fail(self, error: Exception, *, stacklevel: int = 2) -> None:
        """Record the failure and warn (``stacklevel`` as for ``warnings.warn`` from the
        caller)."""
        self.failed = True
        warnings.warn(
            f"{self.what} failed ({type(error).__name__}: {error}); {self.instead}",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
