"""Conversions between Python values and the wire: Struct values, timestamps, feature rows.

Kept free of any client state so both flavours (and the demo and benchmarks) share them.
Features travel as raw little-endian float32 bytes (model.proto `DenseRows`), built with one
numpy call rather than a per-value Python loop.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf import struct_pb2, timestamp_pb2

from protos.twofold.model.v1 import model_pb2
from twofold.structs import struct_to_dict

struct_to_python = struct_to_dict
"""A protobuf `Struct` as a plain dict (see `twofold.structs`)."""


def python_to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON-like mapping as a `Struct`; raises TypeError/ValueError on values JSON cannot hold."""
    struct = struct_pb2.Struct()
    struct.update(dict(data))
    return struct


def now_timestamp() -> timestamp_pb2.Timestamp:
    """The current wall-clock time as a protobuf Timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def timestamp_from_ns(ns: int) -> timestamp_pb2.Timestamp:
    """A Timestamp from nanoseconds since the epoch."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def dense_rows(values: Any) -> model_pb2.DenseRows:
    """One row (1-D) or several rows (2-D) of numbers as raw float32 `DenseRows`."""
    if isinstance(values, model_pb2.DenseRows):
        return values
    array = np.asarray(values, dtype="<f4")
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"features must be a non-empty row or a 2-D matrix, got shape {array.shape}")
    return model_pb2.DenseRows(data=np.ascontiguousarray(array).tobytes(),
                               rows=array.shape[0], cols=array.shape[1])


def named_features(values: Mapping[str, Any]) -> model_pb2.NamedFeatures:
    """Named feature values (the model's manifest orders them on the server)."""
    return model_pb2.NamedFeatures(values={str(k): float(v) for k, v in values.items()})
