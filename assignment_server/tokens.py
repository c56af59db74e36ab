"""Resolve tokens: what ApplyFlags needs later, sealed so a client can neither read nor alter it.

A token is AES-256-GCM over a compact binary payload (resolve id, client, issue time, and per
flag the unit, rule, segment, variant and assignment id, as length-prefixed UTF-8 strings) with a
fixed associated-data label: `b"\\x02" | nonce | ciphertext+tag`. Any change to a byte fails
authentication. A nonce is 8 random bytes drawn per codec (process) followed by a 4-byte
counter, re-drawn when the counter wraps: never repeated within a process, and across processes
sharing a key only if two draws of 64 random bits collide (cheaper on the hot path than a system
call per token). The key comes from `--token-key` / `TWOFOLD_TOKEN_KEY` (base64 of 32 bytes) or
`--token-key-file`; when none is configured a random key is generated at startup, which is
fine for one replica but means tokens do not survive a restart or work across replicas.
"""

from __future__ import annotations

import base64
import itertools
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = b"\x02"
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


def _pack(parts: list[str]) -> bytes:
    """`count | length of each part | parts`, big-endian 16-bit counts and lengths."""
    data = [part.encode() for part in parts]
    lengths = [len(d) for d in data]
    if len(data) > 0xFFFF or max(lengths, default=0) > 0xFFFF:
        raise ValueError("token field too long")
    return struct.pack(f">H{len(data)}H", len(data), *lengths) + b"".join(data)


def _unpack(payload: bytes) -> list[str]:
    (count,) = struct.unpack_from(">H", payload)
    lengths = struct.unpack_from(f">{count}H", payload, 2)
    offset = 2 + 2 * count
    if offset + sum(lengths) != len(payload):
        raise ValueError("token fields do not add up")
    parts = []
    for n in lengths:
        parts.append(payload[offset:offset + n].decode())
        offset += n
    return parts


class TokenCodec:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._lock = threading.Lock()
        self._new_prefix()

    def _new_prefix(self) -> None:
        self._prefix = os.urandom(8)
        self._counter = itertools.count()

    def _nonce(self) -> bytes:
        with self._lock:
            n = next(self._counter)
            if n > 0xFFFFFFFF:
                self._new_prefix()
                n = next(self._counter)
            return self._prefix + n.to_bytes(4, "big")

    def seal(self, token: ResolveToken) -> bytes:
        parts = [token.resolve_id, token.client, repr(round(token.issued_at, 3)), str(len(token.assignments))]
        for flag, items in token.assignments.items():
            parts += [flag, str(len(items))]
            for a in items:
                parts += [a.unit, a.rule, a.segment, a.variant, a.assignment_id]
        nonce = self._nonce()
        return _VERSION + nonce + self._aead.encrypt(nonce, _pack(parts), _AAD)

    def open(self, data: bytes) -> ResolveToken:
        if len(data) < 1 + _NONCE + 16 or data[:1] != _VERSION:
            raise InvalidTokenError("malformed resolve token")
        try:
            parts = _unpack(self._aead.decrypt(data[1:1 + _NONCE], data[1 + _NONCE:], _AAD))
            resolve_id, client, issued, count = parts[0], parts[1], float(parts[2]), int(parts[3])
            i, assignments = 4, {}
            for _ in range(count):
                flag, n = parts[i], int(parts[i + 1])
                i += 2
                assignments[flag] = tuple(TokenAssignment(*parts[i + 5 * k:i + 5 * k + 5]) for k in range(n))
                i += 5 * n
            if i != len(parts):
                raise ValueError("trailing token fields")
            return ResolveToken(resolve_id, client, issued, assignments)
        except InvalidTag as exc:
            raise InvalidTokenError("resolve token was not issued by this server or was altered") from exc
        except (ValueError, IndexError, TypeError, UnicodeDecodeError, struct.error) as exc:
            raise InvalidTokenError("malformed resolve token") from exc


def new_token(resolve_id: str, client: str, assignments: dict[str, tuple[TokenAssignment, ...]]) -> ResolveToken:
    return ResolveToken(resolve_id, client, time.time(), assignments)
