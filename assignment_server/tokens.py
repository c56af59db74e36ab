"""Resolve tokens: what ApplyFlags needs later, sealed so a client can neither read nor alter it.

A token is AES-256-GCM over a compact JSON payload (resolve id, client, issue time, and per
flag the unit, rule, segment, variant and assignment id), with a fresh 96-bit nonce and a
fixed associated-data label: `b"\\x01" | nonce | ciphertext+tag`. Any change to a byte fails
authentication. The key comes from `--token-key` / `TWOFOLD_TOKEN_KEY` (base64 of 32 bytes) or
`--token-key-file`; when none is configured a random key is generated at startup, which is
fine for one replica but means tokens do not survive a restart or work across replicas.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = b"\x01"
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


class TokenCodec:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, token: ResolveToken) -> bytes:
        payload = {"r": token.resolve_id, "c": token.client, "t": round(token.issued_at, 3),
                   "a": {f: [[a.unit, a.rule, a.segment, a.variant, a.assignment_id] for a in items]
                         for f, items in token.assignments.items()}}
        nonce = os.urandom(_NONCE)
        plain = json.dumps(payload, separators=(",", ":")).encode()
        return _VERSION + nonce + self._aead.encrypt(nonce, plain, _AAD)

    def open(self, data: bytes) -> ResolveToken:
        if len(data) < 1 + _NONCE + 16 or data[:1] != _VERSION:
            raise InvalidTokenError("malformed resolve token")
        try:
            plain = self._aead.decrypt(data[1:1 + _NONCE], data[1 + _NONCE:], _AAD)
            payload = json.loads(plain)
            assignments = {str(f): tuple(TokenAssignment(*(str(x) for x in a)) for a in items)
                           for f, items in payload["a"].items()}
            return ResolveToken(str(payload["r"]), str(payload["c"]), float(payload["t"]), assignments)
        except InvalidTag as exc:
            raise InvalidTokenError("resolve token was not issued by this server or was altered") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidTokenError("malformed resolve token") from exc


def new_token(resolve_id: str, client: str, assignments: dict[str, tuple[TokenAssignment, ...]]) -> ResolveToken:
    return ResolveToken(resolve_id, client, time.time(), assignments)
