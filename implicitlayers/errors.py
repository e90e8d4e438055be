"""Exceptions and warnings raised by implicitlayers."""

from __future__ import annotations

import warnings

__all__ = ["ConvergenceError", "ConvergenceWarning", "LipschitzWarning", "check_int_at_least"]


class ConvergenceWarning(UserWarning):
    """A solve stopped before every sample reached the requested tolerance."""


class LipschitzWarning(UserWarning):
    """A residual map is not certified to be a contraction, so a fixed point may not exist or be unique."""


class ConvergenceError(RuntimeError):
    """Raised by layers built with ``on_nonconvergence="raise"`` when a solve does not converge."""


class RateLimitedWarner:
    """Emits a warning on the 1st, 10th, 100th, ... occurrence of an event.

    Layers may fail to converge on every training step; one warning per step would drown the log,
    while one per process would hide a problem that keeps growing. Powers of ten keep both visible.
    """

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, message: str, category: type[Warning], stacklevel: int = 3) -> None:
        self.count += 1
        if not _is_power_of_ten(self.count):
            return
        if self.count > 1:
            message += f" (occurrence {self.count}; further warnings are rate-limited)"
        warnings.warn(message, category, stacklevel=stacklevel)


def _is_power_of_ten(count: int) -> bool:
    while count >= 10 and count % 10 == 0:
        count //= 10
    return count == 1


def check_int_at_least(name: str, value: object, minimum: int = 1) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
