"""`google.protobuf.Struct` to plain Python, shared by the assignment server and the SDK.

Hand-written rather than `json_format.MessageToDict` because it runs on every resolve (server)
and every answer (SDK), where MessageToDict's generic descriptor walk costs several times more.
Numbers come back as float, as JSON has them.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2


def value_to_python(value: struct_pb2.Value) -> Any:
    """A protobuf `Value` as plain Python (None for null or an unset value)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [value_to_python(v) for v in value.list_value.values]
    return None


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A protobuf `Struct` as a plain dict."""
    fields = struct.fields  # iterating keys stays in C; `.items()` is a Python-level view
    return {key: value_to_python(fields[key]) for key in fields}
