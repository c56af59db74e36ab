"""Resolve tokens: what ApplyFlags needs later, sealed so a client can neither read nor alter it.

A token is AES-256-GCM over a compact binary payload (resolve id, issue time in ms, client, and per
flag the unit, rule, segment, variant and assignment id, each a UTF-8 string behind its 16-bit
length) with a fixed associated-data label: `b"\\x03" | nonce | ciphertext+tag`. Fields that
repeat across tokens (client, flag, rule, segment, variant) are packed once and cached, since
sealing runs on every resolve. Any change to a byte fails authentication.

A nonce is 8 random bytes drawn per codec (process) followed by a 4-byte counter, re-drawn
when the counter wraps: never repeated within a process, and across processes sharing a key
only if two draws of 64 random bits collide (cheaper on the hot path than a system call per
token). The key comes from `--token-key` / `TWOFOLD_TOKEN_KEY` (base64 of 32 bytes) or
`--token-key-file`; when none is configured a random key is generated at startup, which is
fine for one replica but means tokens do not survive a restart or work across replicas.
"""

from __future__ import annotations

import base64
import functools
import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = b"\x03"
_AAD = b"twofold.assignment.v1.resolve-token"
_NONCE = 12


class InvalidTokenError(ValueError):
    """The token was not issued with this key, was altered, or is malformed."""


@dataclass(frozen=True, slots=True)
class TokenAssignment:
    unit: str
    rule: str
    segment: str
    variant: str
    assignment_id: str


@dataclass(frozen=True)
class ResolveToken:
    resolve_id: str
    client: str
    issued_at: float
    # Per flag, the assignments an apply logs: the match, and any fallthrough assignments passed.
    assignments: dict[str, tuple[TokenAssignment, ...]]
    # Per flag that declares dimensions: the exposure's `dimensions` JSON, taken from the context
    # at resolve time (an apply carries no context). Sealed after the assignments, so tokens
    # issued before this field existed still open.
    dimensions: dict[str, str] = field(default_factory=dict)


def load_key(key: str | None = None, key_file: str | None = None) -> tuple[bytes, str]:
    """(32-byte key, where it came from). Raises ValueError for a key that is not 32 bytes."""
    text = key or os.environ.get("TWOFOLD_TOKEN_KEY")
    origin = "flag or TWOFOLD_TOKEN_KEY"
    if not text and (key_file or os.environ.get("TWOFOLD_TOKEN_KEY_FILE")):
        path = Path(key_file or os.environ["TWOFOLD_TOKEN_KEY_FILE"])
        text, origin = path.read_text().strip(), str(path)
    if not text:
        return AESGCM.generate_key(bit_length=256), "generated at startup"
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValueError("token key must be base64") from exc
    if len(raw) != 32:
        raise ValueError(f"token key must be 32 bytes (base64 of 32 random bytes), got {len(raw)}")
    return raw, origin


def _part(text: str) -> bytes:
    """One field: its UTF-8 length as a big-endian 16-bit number, then the bytes."""
    data = text.encode()
    if len(data) > 0xFFFF:
        raise ValueError("token field too long")
    return len(data).to_bytes(2, "big") + data


@functools.lru_cache(maxsize=65_536)
def _packed(*parts: str) -> bytes:
    """Fields that repeat across tokens (client, flag, rule, segment, variant), packed once."""
    return b"".join(_part(p) for p in parts)


def _unpack(payload: bytes) -> list[str]:
    parts, offset, end = [], 0, len(payload)
    while offset < end:
        if offset + 2 > end:
            raise ValueError("token fields do not add up")
        n = int.from_bytes(payload[offset:offset + 2], "big")
        offset += 2
        if offset + n > end:
            raise ValueError("token fields do not add up")
        parts.append(payload[offset:offset + n].decode())
        offset += n
    return parts


class TokenCodec:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._lock = threading.Lock()
        self._prefix = os.urandom(8)
        self._counter = itertools.count()

    def _nonce(self) -> bytes:
        # next() on itertools.count is atomic under the GIL, so the common case takes no lock.
        n = next(self._counter)
        prefix = self._prefix
        if n > 0xFFFFFFFF:
            with self._lock:
                if self._prefix is prefix:  # the first thread past the end draws the next prefix
                    self._prefix, self._counter = os.urandom(8), itertools.count()
                prefix, n = self._prefix, next(self._counter)
        return prefix + n.to_bytes(4, "big")

    def seal(self, token: ResolveToken) -> bytes:
        assignments = token.assignments
        # The issue time in whole milliseconds: an integer's str() costs a fraction of a float's repr().
        out = [_part(token.resolve_id), _part(str(int(token.issued_at * 1000))),
               _packed(token.client, str(len(assignments)))]
        for flag, items in assignments.items():
            out.append(_packed(flag, str(len(items))))
            for a in items:
                out.append(_part(a.unit))
                out.append(_packed(a.rule, a.segment, a.variant, a.assignment_id))
        if token.dimensions:
            out.append(_part(str(len(token.dimensions))))
            out.extend(_part(flag) + _part(dims) for flag, dims in token.dimensions.items())
        nonce = self._nonce()
        return _VERSION + nonce + self._aead.encrypt(nonce, b"".join(out), _AAD)

    def open(self, data: bytes) -> ResolveToken:
        if len(data) < 1 + _NONCE + 16 or data[:1] != _VERSION:
            raise InvalidTokenError("malformed resolve token")
        try:
            parts = _unpack(self._aead.decrypt(data[1:1 + _NONCE], data[1 + _NONCE:], _AAD))
            resolve_id, issued, client, count = parts[0], int(parts[1]) / 1000, parts[2], int(parts[3])
            i, assignments = 4, {}
            for _ in range(count):
                flag, n = parts[i], int(parts[i + 1])
                i += 2
                assignments[flag] = tuple(TokenAssignment(*parts[i + 5 * k:i + 5 * k + 5]) for k in range(n))
                i += 5 * n
            dimensions: dict[str, str] = {}
            if i < len(parts):
                count, i = int(parts[i]), i + 1
                for _ in range(count):
                    dimensions[parts[i]] = parts[i + 1]
                    i += 2
            if i != len(parts):
                raise ValueError("trailing token fields")
            return ResolveToken(resolve_id, client, issued, assignments, dimensions)
        except InvalidTag as exc:
            raise InvalidTokenError("resolve token was not issued by this server or was altered") from exc
        except (ValueError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise InvalidTokenError("malformed resolve token") from exc


def new_token(resolve_id: str, client: str, assignments: dict[str, tuple[TokenAssignment, ...]],
              dimensions: dict[str, str] | None = None) -> ResolveToken:
    return ResolveToken(resolve_id, client, time.time(), assignments, dimensions or {})
