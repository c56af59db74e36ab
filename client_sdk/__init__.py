"""Client SDK: resolve a flag, then call the personalization system its arm names.

    from client_sdk import Client
    client = Client(assignment="dns:///assignment:50051", model="dns:///model:50052",
                    client_secret="backend-secret")
    decision = client.decide("home-ranking", unit="user-42", features=user_row, candidates=items)
    client.track("purchase", unit="user-42", value=12.5)

`Client` (blocking, thread-safe) and `AsyncClient` (asyncio) share one core; the OpenFeature
provider is `client_sdk.provider.TwofoldProvider`. See docs/sdk.md.
"""

from client_sdk.async_client import AsyncClient
from client_sdk.core import ClientStats
from client_sdk.errors import TwofoldError
from client_sdk.options import ClientOptions, Deadlines, RetryPolicy, TlsConfig
from client_sdk.results import Decision, ErrorCode, FlagResult, Reason
from client_sdk.sync_client import Client
from client_sdk.systems import SystemAnswer, SystemCall

__all__ = [
    "AsyncClient",
    "Client",
    "ClientOptions",
    "ClientStats",
    "Deadlines",
    "Decision",
    "ErrorCode",
    "FlagResult",
    "Reason",
    "RetryPolicy",
    "SystemAnswer",
    "SystemCall",
    "TlsConfig",
    "TwofoldError",
]
