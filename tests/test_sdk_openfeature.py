"""The OpenFeature provider, used only through `openfeature.api` against a real assignment server."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from openfeature import api
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEvent
from openfeature.exception import ErrorCode, ProviderNotReadyError
from openfeature.flag_evaluation import Reason
from openfeature.provider import ProviderStatus
from openfeature.track import TrackingEventDetails

from client_sdk import AsyncClient, Client, ClientOptions, Deadlines
from client_sdk.provider import TwofoldProvider
from tests.test_sdk_client import FLAGS_YAML, SECRET, start_assignment, write_flags
from twofold.demo.processes import ServerGroup, ServerProcess
from twofold.lake import read_table

SE = EvaluationContext(targeting_key="user-1", attributes={"country": "SE"})
US = EvaluationContext(targeting_key="user-2", attributes={"country": "US"})


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServerGroup, ServerProcess, Path]]:
    with ServerGroup(tmp_path / "run") as group:
        yield group, start_assignment(group, tmp_path), tmp_path
    api.clear_providers()


def _provider(target: str, **options: object) -> TwofoldProvider:
    return TwofoldProvider(Client(target, client_secret=SECRET,
                                  options=ClientOptions(flush_at_exit=False, **options)))  # type: ignore[arg-type]


def test_all_five_types_with_reasons_and_variants(served: tuple[ServerGroup, ServerProcess, Path]) -> None:
    group, server, base = served
    api.set_provider_and_wait(_provider(server.target), "typed")
    flags = api.get_client("typed")
    assert flags.get_provider_status() is ProviderStatus.READY

    enabled = flags.get_boolean_details("checkout.enabled", False, SE)
    assert (enabled.value, enabled.reason, enabled.variant, enabled.error_code) == \
        (True, Reason.TARGETING_MATCH, "on", None)
    assert enabled.flag_metadata["rule"] == "flags/checkout/rules/sweden"
    assert flags.get_string_value("checkout.color", "blue", SE) == "green"
    discount = flags.get_integer_details("checkout.discount", 0, SE)
    assert discount.value == 10 and isinstance(discount.value, int)
    assert flags.get_float_value("checkout.ratio", 1.0, SE) == 0.25
    whole = flags.get_object_details("checkout", {}, SE)
    assert whole.value == {"enabled": True, "color": "green", "discount": 10.0, "ratio": 0.25, "tags": ["b"]}
    assert flags.get_object_value("checkout.tags", [], SE) == ["b"]

    # No rule matched: the caller's default, reason DEFAULT, no error.
    default = flags.get_string_details("checkout.color", "blue", US)
    assert (default.value, default.reason, default.error_code) == ("blue", Reason.DEFAULT, None)

    api.shutdown()  # flushes the exposures of the evaluations above
    group.stop_all()
    exposures = read_table(base / "lake", "exposures")
    assert exposures.column("unit").to_pylist() == ["user-1"]  # deduplicated; user-2 matched no rule


def test_errors_are_mapped(served: tuple[ServerGroup, ServerProcess, Path]) -> None:
    _, server, _ = served
    api.set_provider(_provider(server.target), "errors")
    flags = api.get_client("errors")
    mismatch = flags.get_integer_details("checkout.color", 7, SE)
    assert (mismatch.value, mismatch.reason, mismatch.error_code) == (7, Reason.ERROR, ErrorCode.TYPE_MISMATCH)
    not_bool = flags.get_boolean_details("checkout.discount", False, SE)
    assert not_bool.error_code == ErrorCode.TYPE_MISMATCH
    missing = flags.get_string_details("no-such-flag.color", "x", SE)
    assert (missing.value, missing.error_code) == ("x", ErrorCode.FLAG_NOT_FOUND)
    no_path = flags.get_string_details("checkout.nothing.here", "x", SE)
    assert (no_path.value, no_path.error_code) == ("x", ErrorCode.FLAG_NOT_FOUND)
    no_key = flags.get_boolean_details("checkout.enabled", False, EvaluationContext(attributes={"country": "SE"}))
    assert (no_key.value, no_key.error_code) == (False, ErrorCode.TARGETING_KEY_MISSING)
    # A non-integral number is not an integer.
    assert flags.get_integer_details("checkout.ratio", 1, SE).error_code == ErrorCode.TYPE_MISMATCH


def test_server_down_stale_then_error(served: tuple[ServerGroup, ServerProcess, Path]) -> None:
    _, server, _ = served
    api.set_provider(_provider(server.target), "outage")
    flags = api.get_client("outage")
    assert flags.get_string_value("checkout.color", "blue", SE) == "green"
    server.kill()
    stale = flags.get_string_details("checkout.color", "blue", SE)
    assert (stale.value, stale.reason, stale.error_code) == ("green", Reason.STALE, None)
    unknown = flags.get_string_details("checkout.color", "blue",
                                       EvaluationContext(targeting_key="never-seen", attributes={"country": "SE"}))
    assert (unknown.value, unknown.reason, unknown.error_code) == ("blue", Reason.ERROR, ErrorCode.GENERAL)
    assert "UNAVAILABLE" in (unknown.error_message or "") or "DEADLINE" in (unknown.error_message or "")


def test_track_and_async_evaluation(served: tuple[ServerGroup, ServerProcess, Path]) -> None:
    group, server, base = served

    async def main() -> tuple[str, str]:
        async_client = AsyncClient(server.target, client_secret=SECRET, options=ClientOptions(flush_at_exit=False))
        provider = TwofoldProvider(Client(server.target, client_secret=SECRET,
                                          options=ClientOptions(flush_at_exit=False)), async_client)
        api.set_provider(provider, "async")
        flags = api.get_client("async")
        details = await flags.get_string_details_async("checkout.color", "blue", SE)
        as_object = await flags.get_object_value_async("checkout", {}, US)
        flags.track("purchase", SE, TrackingEventDetails(value=12.5, attributes={"sku": "kettle"}))
        flags.track("no-unit-is-ignored", EvaluationContext())
        await async_client.close()
        return details.value, str(as_object)

    color, as_object = asyncio.run(main())
    assert (color, as_object) == ("green", "{}")
    api.shutdown()
    group.stop_all()
    events = read_table(base / "lake", "events")
    assert events.column("name").to_pylist() == ["purchase"]
    assert events.column("unit").to_pylist() == ["user-1"]
    assert events.column("value").to_pylist() == [12.5]
    assert events.column("properties").to_pylist() == ['{"sku":"kettle"}']


def test_initialize_waits_for_local_state(served: tuple[ServerGroup, ServerProcess, Path]) -> None:
    _, server, base = served
    api.set_provider_and_wait(_provider(server.target, local_evaluation=True), "local")
    flags = api.get_client("local")
    assert flags.get_provider_status() is ProviderStatus.READY
    assert flags.get_boolean_details("checkout.enabled", False, SE).reason == Reason.TARGETING_MATCH

    # A flag change arrives on the state stream: handlers hear PROVIDER_CONFIGURATION_CHANGED.
    changed = threading.Event()
    flags.add_handler(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, lambda details: changed.set())
    write_flags(base / "flags", FLAGS_YAML.replace("color: green", "color: teal"))
    assert changed.wait(15)
    assert flags.get_string_value("checkout.color", "blue", SE) == "teal"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(ProviderNotReadyError):
        api.set_provider_and_wait(_provider(dead, local_evaluation=True, deadlines=Deadlines(local_state=0.3)), "dead")
    dead_flags = api.get_client("dead")
    assert dead_flags.get_provider_status() is ProviderStatus.ERROR
    result = dead_flags.get_boolean_details("checkout.enabled", False, SE)
    assert (result.value, result.reason, result.error_code) == (False, Reason.ERROR, ErrorCode.PROVIDER_NOT_READY)


def test_local_values_handed_out_are_private(served: tuple[ServerGroup, ServerProcess, Path]) -> None:
    """The provider reads local results without copying the flag's value (issue 18); what it hands
    out must still be the caller's own: mutating it changes nothing for the next evaluation."""
    _, server, _ = served
    api.set_provider_and_wait(_provider(server.target, local_evaluation=True), "private")
    flags = api.get_client("private")
    whole = flags.get_object_value("checkout", {}, SE)
    assert whole == {"enabled": True, "color": "green", "discount": 10, "ratio": 0.25, "tags": ["b"]}
    whole["color"] = "mutated"
    whole["tags"].append("mutated")
    tags = flags.get_object_value("checkout.tags", [], SE)
    assert tags == ["b"]
    tags.append("mutated")
    assert flags.get_object_value("checkout", {}, SE) == \
        {"enabled": True, "color": "green", "discount": 10, "ratio": 0.25, "tags": ["b"]}
    assert flags.get_string_value("checkout.color", "blue", SE) == "green"
    assert flags.get_integer_details("checkout.discount", 0, SE).value == 10
