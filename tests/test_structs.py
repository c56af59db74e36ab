"""Struct conversion shared by the assignment server and the SDK agrees with protobuf's own."""

from __future__ import annotations

from google.protobuf import json_format, struct_pb2

from twofold.structs import struct_to_dict, value_to_python


def test_struct_to_dict_matches_message_to_dict() -> None:
    doc = {"s": "x", "n": 1.5, "i": 3.0, "b": False, "null": None, "list": [1.0, "a", None, {"k": [True]}],
           "nested": {"deep": {"deeper": "y"}, "empty": {}, "empty_list": []}}
    struct = struct_pb2.Struct()
    struct.update(doc)
    assert struct_to_dict(struct) == json_format.MessageToDict(struct) == doc


def test_unset_value_is_none() -> None:
    assert value_to_python(struct_pb2.Value()) is None
