"""One system under test of `bench.sdk_peers`, in its own process (and, for a peer, its own venv).

Run as a script by the driver (`python bench/peer_worker.py CASE SPEC_JSON`) so that it needs
nothing but the standard library and the system it measures: the flagd provider pins a
protobuf this project cannot install, so it runs from its own virtual environment. Reads one
JSON command per line on stdin and answers one JSON line on stdout:

- `{"cmd": "values", "n": N}`: the string value served to each of the N check contexts
  (distribution check; not timed);
- `{"cmd": "round", "round": R, "n": N, "chunks": C}`: time N evaluations of round R's
  contexts (built before the clock starts) in C consecutive chunks and answer the fastest
  chunk's µs per evaluation (and the mean), plus case-specific extras;
- `{"cmd": "quit"}`.

The contexts are the same for every case: unit `r<R>-user-<i>` (`check-user-<i>` for the
check), country `SE` for three units in four and `NO` for the fourth.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

FLAG = "checkout"
DEFAULT = "none"


def contexts(prefix: str, n: int) -> list[tuple[str, str]]:
    """(unit, country) pairs: three SE units in four (the rule matches), one NO (default)."""
    return [(f"{prefix}user-{i}", "NO" if i % 4 == 3 else "SE") for i in range(n)]


def _timed(fn: Callable[[Any], object], inputs: list[Any]) -> float:
    """µs per call of fn over inputs (one tight loop)."""
    t0 = time.perf_counter()
    for x in inputs:
        fn(x)
    return (time.perf_counter() - t0) / len(inputs) * 1e6


# ---- cases: each returns (evaluate(context) -> str value, prepare(pairs) -> inputs, extras(round) -> dict)


def twofold_core(spec: dict) -> tuple:
    from twofold.resolver import Resolver, ResolverState

    resolver = Resolver(ResolverState.from_json(open(spec["state"], "rb").read()))
    names = [f"flags/{FLAG}"]
    secret = spec["secret"]

    def evaluate(ctx: dict) -> str:
        flag = resolver.resolve(names, ctx, secret)[0]
        return flag.value["color"] if flag.value else DEFAULT

    return evaluate, lambda pairs: [{"targeting_key": u, "country": c} for u, c in pairs], None


def _twofold_client(spec: dict) -> Any:
    from client_sdk import Client, ClientOptions

    # Exposures held (no background sends while timing): the request path alone; the drain
    # cost is measured separately and reported next to it.
    options = ClientOptions(local_evaluation=True, flush_at_exit=False, flush_interval=3600, batch_size=10**6,
                            max_buffered=10**7)
    client = Client(spec["assignment"], client_secret=spec["secret"], options=options)
    if not client.wait_for_state(30):
        raise SystemExit("no state from the assignment server")
    return client


def twofold_sdk(spec: dict) -> tuple:
    client = _twofold_client(spec)

    def evaluate(x: tuple[str, dict]) -> str:
        result = client.resolve(FLAG, x[0], x[1], default=None)
        return result.value["color"] if result.value else DEFAULT

    def extras(round_no: int, n: int) -> dict:
        """Exposure bookkeeping: apply() of fresh results (queued), of the same again (deduplicated),
        and the protobuf building a drain does later on the sender thread, per exposure."""
        pairs = contexts(f"x{round_no}-", n)
        results = [client.resolve(FLAG, u, {"country": c}) for u, c in pairs]
        results = [r for r in results if r.should_apply]
        chunk = max(1, len(results) // 5)
        parts = [results[i:i + chunk] for i in range(0, len(results), chunk)]
        queued = min(_timed(client.apply, part) for part in parts)  # fastest of five chunks, as above
        again = min(_timed(client.apply, part) for part in parts)
        t0 = time.perf_counter()
        requests = client._core.exposures.drain(spec["secret"])
        drain = (time.perf_counter() - t0) / max(1, len(results)) * 1e6
        assert sum(len(r.local_assignments) for r in requests) == len(results), "every fresh exposure queued"
        return {"apply_us": queued, "apply_duplicate_us": again, "drain_us_per_exposure": drain}

    return evaluate, lambda pairs: [(u, {"country": c}) for u, c in pairs], extras


def _openfeature(provider: Any) -> tuple:
    from openfeature import api
    from openfeature.evaluation_context import EvaluationContext

    api.set_provider_and_wait(provider)
    client = api.get_client()
    key = f"{FLAG}.color" if "Twofold" in type(provider).__name__ else FLAG

    def evaluate(ctx: Any) -> str:
        return client.get_string_details(key, DEFAULT, ctx).value

    return evaluate, lambda pairs: [EvaluationContext(targeting_key=u, attributes={"country": c}) for u, c in pairs]


def of_constant(spec: dict) -> tuple:
    from openfeature.flag_evaluation import FlagResolutionDetails, Reason
    from openfeature.provider import AbstractProvider, Metadata

    class ConstantProvider(AbstractProvider):
        """Returns one value without looking at anything: what the OpenFeature SDK alone costs."""

        def get_metadata(self) -> Metadata:
            return Metadata(name="constant")

        def resolve_boolean_details(self, flag_key, default_value, evaluation_context=None):
            return FlagResolutionDetails(value=default_value, reason=Reason.STATIC)

        def resolve_string_details(self, flag_key, default_value, evaluation_context=None):
            return FlagResolutionDetails(value="red", reason=Reason.STATIC, variant="red")

        resolve_integer_details = resolve_float_details = resolve_object_details = resolve_boolean_details

    evaluate, prepare = _openfeature(ConstantProvider())
    return evaluate, prepare, None


def of_resolver_core(spec: dict) -> tuple:
    """The floor for any provider over Twofold's resolver: one `resolve_flag` on a flag and client
    looked up once, the value at `color` returned; no result object, no exposure, no copy."""
    from openfeature.flag_evaluation import FlagResolutionDetails, Reason
    from openfeature.provider import AbstractProvider, Metadata

    from twofold.resolver import Resolver, ResolverState

    resolver = Resolver(ResolverState.from_json(open(spec["state"], "rb").read()))
    flag, client = resolver.state.flags[f"flags/{FLAG}"], resolver.state.clients[spec["secret"]]

    class ResolverCoreProvider(AbstractProvider):
        def get_metadata(self) -> Metadata:
            return Metadata(name="resolver-core")

        def resolve_boolean_details(self, flag_key, default_value, evaluation_context=None):
            return FlagResolutionDetails(value=default_value, reason=Reason.STATIC)

        def resolve_string_details(self, flag_key, default_value, evaluation_context=None):
            ctx = dict(evaluation_context.attributes)
            ctx["targeting_key"] = evaluation_context.targeting_key
            rf = resolver.resolve_flag(flag, ctx, client)
            if rf.value is None:
                return FlagResolutionDetails(value=default_value, reason=Reason.DEFAULT)
            return FlagResolutionDetails(value=rf.value["color"], reason=Reason.TARGETING_MATCH,
                                         variant=rf.variant)

        resolve_integer_details = resolve_float_details = resolve_object_details = resolve_boolean_details

    evaluate, prepare = _openfeature(ResolverCoreProvider())
    return evaluate, prepare, None


def of_twofold(spec: dict) -> tuple:
    from client_sdk.provider import TwofoldProvider

    client = _twofold_client(spec)
    evaluate, prepare = _openfeature(TwofoldProvider(client))

    def extras(round_no: int, n: int) -> dict:
        client._core.exposures.drain(spec["secret"])  # the round's exposures, built outside the clock
        return {}

    return evaluate, prepare, extras


def of_flagd(spec: dict) -> tuple:
    from openfeature.contrib.provider.flagd import FlagdProvider
    from openfeature.contrib.provider.flagd.config import ResolverType

    provider = FlagdProvider(resolver_type=ResolverType.FILE, offline_flag_source_path=spec["flagd_file"])
    evaluate, prepare = _openfeature(provider)
    return evaluate, prepare, None


def growthbook(spec: dict) -> tuple:
    from growthbook import GrowthBook

    gb = GrowthBook(features=json.loads(open(spec["growthbook_file"]).read()))

    def evaluate(attributes: dict) -> str:
        gb.set_attributes(attributes)
        return gb.eval_feature(FLAG).value

    return evaluate, lambda pairs: [{"id": u, "country": c} for u, c in pairs], None


CASES = {"twofold-core": twofold_core, "twofold-sdk": twofold_sdk, "of-constant": of_constant,
         "of-twofold": of_twofold, "of-resolver-core": of_resolver_core, "of-flagd": of_flagd,
         "growthbook": growthbook}


def _versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("openfeature-sdk", "openfeature-provider-flagd", "growthbook", "protobuf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def main() -> None:
    case, spec = sys.argv[1], json.loads(sys.argv[2])
    evaluate, prepare, extras = CASES[case](spec)
    print(json.dumps({"ready": case, "versions": _versions()}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "quit":
            break
        if command["cmd"] == "values":
            answer: dict = {"values": [evaluate(x) for x in prepare(contexts("check-", command["n"]))]}
        else:
            inputs = prepare(contexts(f"r{command['round']}-", command["n"]))
            chunk = max(1, len(inputs) // command["chunks"])
            per_chunk = [_timed(evaluate, inputs[i:i + chunk]) for i in range(0, len(inputs) - chunk + 1, chunk)]
            # The least disturbed chunk: on a shared machine the others mostly measure the neighbours.
            answer = {"us": min(per_chunk), "mean_us": sum(per_chunk) / len(per_chunk)}
            if extras is not None:
                answer.update(extras(command["round"], command["n"]))
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
