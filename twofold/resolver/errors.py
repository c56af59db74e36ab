"""Errors of the resolver core. Per-flag problems are reasons in the result, not exceptions."""

from __future__ import annotations


class StateError(ValueError):
    """A resolver state that cannot be loaded (the previous state keeps serving)."""


class ResolveError(ValueError):
    """A request the resolver refuses as a whole: unknown client secret, too many flags."""


class UnknownClientError(ResolveError):
    """The client secret is not known to the state."""


class TooManyFlagsError(ResolveError):
    """More flags than `MAX_FLAGS_PER_RESOLVE` would be resolved by one request."""


class UnrecognizedRuleError(Exception):
    """A targeting rule of a kind this resolver does not know: its segment does not match."""


class MaterializationUnsupportedError(Exception):
    """A flag needs stored materializations but the caller provided no store."""
