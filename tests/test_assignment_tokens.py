"""Resolve tokens: round trip, and no altered, truncated or foreign token is ever accepted."""

from __future__ import annotations

import base64
import os

import pytest

from assignment_server.tokens import (
    InvalidTokenError,
    ResolveToken,
    TokenAssignment,
    TokenCodec,
    load_key,
    new_token,
)


def _token() -> ResolveToken:
    return new_token("r" * 32, "clients/web", {
        "flags/a": (TokenAssignment("user-é", "flags/a/rules/x", "segments/s", "flags/a/variants/v", "id1"),),
        "flags/b": (TokenAssignment("u", "flags/b/rules/ft", "", "", "ft"),
                    TokenAssignment("u", "flags/b/rules/y", "segments/t", "flags/b/variants/w", "id2"))})


def test_round_trip_and_every_single_byte_change_is_rejected() -> None:
    codec = TokenCodec(os.urandom(32))
    token = _token()
    sealed = codec.seal(token)
    opened = codec.open(sealed)
    assert (opened.resolve_id, opened.client, opened.assignments) == (token.resolve_id, token.client, token.assignments)
    assert sealed != codec.seal(token)  # fresh nonce per token
    for i in range(len(sealed)):
        altered = bytearray(sealed)
        altered[i] ^= 0x40
        with pytest.raises(InvalidTokenError):
            codec.open(bytes(altered))
    for cut in (0, 1, 13, len(sealed) - 1):
        with pytest.raises(InvalidTokenError):
            codec.open(sealed[:cut])
    with pytest.raises(InvalidTokenError):
        TokenCodec(os.urandom(32)).open(sealed)  # another server's key


def test_key_loading() -> None:
    key = os.urandom(32)
    assert load_key(base64.b64encode(key).decode())[0] == key
    generated, origin = load_key(None, None) if "TWOFOLD_TOKEN_KEY" not in os.environ else (b"x" * 32, "env")
    assert len(generated) == 32 and origin
    with pytest.raises(ValueError):
        load_key(base64.b64encode(b"short").decode())
    with pytest.raises(ValueError):
        load_key("not base64!")
