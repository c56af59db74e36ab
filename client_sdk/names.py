"""Flag and variant names as the SDK's callers write them (short) and as the wire carries them."""

from __future__ import annotations


def flag_name(flag: str) -> str:
    """The short flag name: "flags/home-ranking" and "home-ranking" both give "home-ranking"."""
    return flag[len("flags/"):] if flag.startswith("flags/") else flag


def variant_name(variant: str) -> str | None:
    """The short variant name from "flags/<flag>/variants/<name>", None when empty."""
    if not variant:
        return None
    _, sep, tail = variant.rpartition("/variants/")
    return tail if sep else variant
