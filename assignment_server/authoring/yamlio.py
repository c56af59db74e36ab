"""YAML loading that remembers where each mapping and list item came from (for error messages).

Booleans are YAML 1.2's `true`/`false` only: YAML 1.1 also reads `yes`, `no`, `on` and `off` as
booleans, which turns the country code `NO` or a variant named `on` into a boolean (the "Norway
problem"), a classic source of silent targeting bugs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml


class Located(dict):
    """A YAML mapping that knows its file, its line and the line of each key."""

    file: str = "?"
    line: int = 0
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int:
        return getattr(self, "key_lines", {}).get(key, self.line)


class LocatedList(list):
    file: str = "?"
    line: int = 0
    item_lines: list[int]

    def line_of(self, index: int) -> int:
        lines = getattr(self, "item_lines", [])
        return lines[index] if index < len(lines) else self.line


def _make_loader(file: str) -> type[yaml.SafeLoader]:
    class Loader(yaml.SafeLoader):
        pass

    bool_tag = "tag:yaml.org,2002:bool"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Located:
        loader.flatten_mapping(node)
        out = Located()
        out.file, out.line, out.key_lines = file, node.start_mark.line + 1, {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                raise yaml.constructor.ConstructorError(None, None, "mapping keys must be scalars",
                                                        key_node.start_mark)
            key = str(key) if not isinstance(key, str) else key
            if key in out:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            out[key] = loader.construct_object(value_node, deep=True)
            out.key_lines[key] = key_node.start_mark.line + 1
        return out

    def construct_sequence(loader: yaml.SafeLoader, node: yaml.SequenceNode) -> LocatedList:
        out = LocatedList(loader.construct_object(child, deep=True) for child in node.value)
        out.file, out.line = file, node.start_mark.line + 1
        out.item_lines = [child.start_mark.line + 1 for child in node.value]
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, construct_sequence)
    return Loader


def load_documents(path: Path, display: str) -> list[Any]:
    """All documents of a YAML file; raises yaml.YAMLError with a position on bad syntax."""
    with path.open("rb") as fh:
        return [d for d in yaml.load_all(fh, Loader=_make_loader(display)) if d is not None]
