"""The echo service: a do-nothing gRPC method used as the latency and throughput floor.

Benchmarks start it in the same run as the server they measure and print ratios against
it, so a figure says how much a Twofold server adds on top of Python gRPC itself.
"""

from __future__ import annotations

import asyncio

import grpc

from protos.twofold.echo.v1 import echo_pb2, echo_pb2_grpc
from twofold.server import ServiceRegistration

SERVICE_NAME = echo_pb2.DESCRIPTOR.services_by_name["EchoService"].full_name


class EchoServicer(echo_pb2_grpc.EchoServiceServicer):
    """Returns the payload; waits `delay_seconds` first when asked to."""

    async def Echo(self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext) -> echo_pb2.EchoResponse:
        if request.delay_seconds > 0:
            await asyncio.sleep(request.delay_seconds)
        return echo_pb2.EchoResponse(payload=request.payload)


def registration() -> ServiceRegistration:
    """The echo service as a registration for `twofold.server.start_server`."""
    return ServiceRegistration(SERVICE_NAME, EchoServicer(), echo_pb2_grpc.add_EchoServiceServicer_to_server)


async def start_bare_echo(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """A plain `grpc.aio` echo server with no metrics, health or limits: the honest floor."""
    server = grpc.aio.server()
    echo_pb2_grpc.add_EchoServiceServicer_to_server(EchoServicer(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound
