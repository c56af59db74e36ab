"""The resolver core: pure, fast, and free of gRPC, so SDKs can evaluate flags in process.

Stable API (see docs/assignment.md)::

    from twofold.resolver import Resolver, ResolverState
    state = ResolverState.from_json(state_bytes)          # the WatchState snapshot bytes
    flags = Resolver(state).resolve(["flags/home-ranking"], {"targeting_key": "user-42"}, "secret")
    flags[0].variant, flags[0].value, flags[0].reason, flags[0].should_apply
"""

from twofold.resolver.bucketing import (
    ALLOCATION_BUCKETS,
    allocation_bucket,
    allocation_salt,
    arm_bucket,
    bucket,
    hash_key,
)
from twofold.resolver.errors import (
    ResolveError,
    StateError,
    TooManyFlagsError,
    UnknownClientError,
)
from twofold.resolver.materializations import (
    InMemoryMaterializations,
    MaterializationRecord,
    MaterializationStore,
    SqliteMaterializations,
    open_store,
)
from twofold.resolver.resolve import (
    MAX_FLAGS_PER_RESOLVE,
    MAX_TARGETING_KEY_LENGTH,
    FallthroughAssignment,
    Reason,
    Resolution,
    ResolvedFlag,
    Resolver,
)
from twofold.resolver.state import STATE_MEDIA_TYPE, Bitset, Client, Flag, ResolverState, encode_bitset
from twofold.resolver.sticky import MaterializationCache, resolve_steps

__all__ = [
    "ALLOCATION_BUCKETS",
    "MAX_FLAGS_PER_RESOLVE",
    "MAX_TARGETING_KEY_LENGTH",
    "STATE_MEDIA_TYPE",
    "Bitset",
    "Client",
    "FallthroughAssignment",
    "Flag",
    "InMemoryMaterializations",
    "MaterializationCache",
    "MaterializationRecord",
    "MaterializationStore",
    "Reason",
    "Resolution",
    "ResolveError",
    "ResolvedFlag",
    "Resolver",
    "ResolverState",
    "SqliteMaterializations",
    "StateError",
    "TooManyFlagsError",
    "UnknownClientError",
    "allocation_bucket",
    "allocation_salt",
    "arm_bucket",
    "bucket",
    "encode_bitset",
    "hash_key",
    "open_store",
    "resolve_steps",
]
