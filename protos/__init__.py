"""Twofold's `.proto` contracts and their generated Python modules.

Import the generated modules by their proto path, e.g.
`from protos.twofold.assignment.v1 import assignment_pb2, assignment_pb2_grpc`.
"""
