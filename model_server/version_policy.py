"""Which versions of a model to serve (kept free of heavy imports: the CLI validates it early,
before `--workers` forks, and nothing that creates metrics may be imported by then)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions to serve: the newest `latest` loadable ones, or exactly `specific`."""

    latest: int | None = 1
    specific: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`latest:N`, `specific:1,3` or `all`."""
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "latest":
                n = int(arg or "1")
                if n < 1:
                    raise ValueError
                return cls(latest=n)
            if kind == "specific":
                versions = tuple(sorted({int(v) for v in arg.split(",") if v.strip()}))
                if not versions or min(versions) < 1:
                    raise ValueError
                return cls(latest=None, specific=versions)
            if kind == "all" and not arg:
                return cls(latest=None)
        except ValueError:
            pass
        raise ValueError(f"version policy must be latest:N (N >= 1), specific:V1,V2,... or all; got {text!r}")

    @classmethod
    def from_config(cls, data: object) -> VersionPolicy:
        """From a model's config.yaml `version_policy` mapping."""
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError("version_policy must be one of {latest: N}, {specific: [V, ...]}, {all: true}")
        ((key, value),) = data.items()
        if key == "latest":
            return cls.parse(f"latest:{int(value)}")
        if key == "specific":
            values = value if isinstance(value, list) else [value]
            return cls.parse("specific:" + ",".join(str(int(v)) for v in values))
        if key == "all":
            return cls.parse("all")
        raise ValueError(f"unknown version_policy {key!r}")

    def describe(self) -> str:
        if self.specific:
            return "specific:" + ",".join(map(str, self.specific))
        return f"latest:{self.latest}" if self.latest else "all"
