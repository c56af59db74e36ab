"""`twofold serve-assignment`, `twofold flags` and `twofold conformance`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from twofold.cli import Command
from twofold.lakestore import add_writer_arguments
from twofold.settings import add_server_arguments, env_default

if TYPE_CHECKING:
    from assignment_server.authoring.compiler import CompileResult

log = logging.getLogger("twofold.assignment")
DEFAULT_PORT = 50051


# -- serve-assignment ---------------------------------------------------------------------------

def _store_spec(value: str) -> str:
    """A SQLite path, `memory`, or a redis:// / rediss:// URL; another scheme is refused at parse time."""
    scheme, sep, _ = value.partition("://")
    if sep and scheme not in ("redis", "rediss", "unix"):
        raise argparse.ArgumentTypeError(f"unsupported store {scheme}://; use a SQLite path, 'memory', "
                                         "redis://host:port/db or rediss://")
    return value


def _float_or_none(value: str | None) -> float | None:
    return None if value in (None, "") else float(value)


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("assignment server")
    g.add_argument("--flags", default=env_default("flags", None), required=env_default("flags", None) is None,
                   help="folder of flag YAML files, or a Confidence JSON state file [TWOFOLD_FLAGS]")
    g.add_argument("--lake", default=env_default("lake", "data/lake"),
                   help="lake root for exposures and events: a folder or a URL (s3://bucket/prefix, "
                        "gs://...) [TWOFOLD_LAKE]")
    add_writer_arguments(g)
    g.add_argument("--materializations", default=env_default("materializations", None), type=_store_spec,
                   help="store for sticky assignments: a SQLite file (default <lake>/../materializations.sqlite), "
                        "redis://host:port/db or rediss:// (shared by all replicas; password in "
                        "TWOFOLD_MATERIALIZATIONS_PASSWORD), or 'memory' [TWOFOLD_MATERIALIZATIONS]")
    g.add_argument("--materializations-timeout", type=float,
                   default=_float_or_none(env_default("materializations_timeout", None)),
                   help="seconds one store call may take before the resolve is served without the store "
                        "(default 0.25 for Redis, 5 for SQLite) [TWOFOLD_MATERIALIZATIONS_TIMEOUT]")
    g.add_argument("--materializations-cache", type=int,
                   default=int(env_default("materializations_cache", "100000") or 100000),
                   help="stored assignments cached per process (LRU; 0 disables) [TWOFOLD_MATERIALIZATIONS_CACHE]")
    g.add_argument("--served-allocations", default=env_default("served_allocations", None),
                   help="file where the server records the allocation it serves, so that no flag change, "
                        "before or after a restart, moves units of running experiments (default "
                        "<lake>/../served-allocations.json) [TWOFOLD_SERVED_ALLOCATIONS]")
    g.add_argument("--token-key", default=None,
                   help="base64 of 32 random bytes sealing resolve tokens [TWOFOLD_TOKEN_KEY]; "
                        "generated at startup when absent (tokens then die with the process)")
    g.add_argument("--token-key-file", default=env_default("token_key_file", None),
                   help="file holding the token key [TWOFOLD_TOKEN_KEY_FILE]")
    g.add_argument("--token-max-age-seconds", type=float,
                   default=float(env_default("token_max_age_seconds", "3600") or 3600),
                   help="ApplyFlags refuses resolve tokens older than this (FAILED_PRECONDITION) "
                        "[TWOFOLD_TOKEN_MAX_AGE_SECONDS]")
    g.add_argument("--reload-interval", type=float, default=float(env_default("reload_interval", "1.0") or 1.0),
                   help="seconds between checks of the flag source, 0 disables hot reload "
                        "[TWOFOLD_RELOAD_INTERVAL]")
    # Client secrets travel in the requests and are checked by the servicer, per environment.
    add_server_arguments(parser, DEFAULT_PORT, metadata_auth=False)


def _run_serve(args: argparse.Namespace) -> int:
    from assignment_server.app import build_setup
    from assignment_server.authoring.errors import FlagFileError
    from twofold.lakestore import LakeStoreError, apply_storage_arguments
    from twofold.resolver import StateError
    from twofold.server import run_service

    if args.token_max_age_seconds <= 0:
        print("twofold serve-assignment: --token-max-age-seconds must be positive", file=sys.stderr)
        return 2
    apply_storage_arguments(args)
    try:
        return run_service(args, build_setup(args))
    except (FlagFileError, StateError) as exc:
        # No last good state to fall back to at startup: refuse to start, saying why.
        problems = [str(p) for p in getattr(exc, "problems", [])] or [str(exc)]
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"twofold serve-assignment: cannot load the flag source {args.flags}", file=sys.stderr)
        return 2
    except (LakeStoreError, OSError, ValueError, RuntimeError) as exc:
        # A lake it cannot write to, a bad writer id or one in use, a file that cannot be read:
        # refuse before acknowledging anything, saying which (not a traceback or another cause).
        print(f"twofold serve-assignment: {exc}", file=sys.stderr)
        return 2


SERVE = Command(_configure_serve, _run_serve)


# -- flags ----------------------------------------------------------------------------------------

def _configure_flags(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = sub.add_parser("validate", help="check a flags folder; errors name the file and line")
    v.add_argument("dir")
    v.add_argument("--strict", action="store_true", help="also fail on warnings (e.g. an unset secret_env)")
    c = sub.add_parser("compile", help="write the resolver state JSON a folder compiles to")
    c.add_argument("dir")
    c.add_argument("-o", "--output", default="-", help="output file, - for stdout")
    lk = sub.add_parser("lock", help="update allocations.lock.json (commit it with the flag change); refuses a "
                                     "change that would move units of running experiments")
    lk.add_argument("dir")


def _run_flags(args: argparse.Namespace) -> int:
    from assignment_server.authoring.compiler import LOCK_FILE, compile_folder, write_lock
    from assignment_server.authoring.errors import FlagFileError
    from twofold.resolver import ResolverState, StateError

    if not Path(args.dir).is_dir():
        what = "is a file, not a folder" if Path(args.dir).exists() else "does not exist"
        print(f"error: {args.dir} {what}: give the folder holding the flag YAML files (e.g. examples/flags)",
              file=sys.stderr)
        return 1
    try:
        result = compile_folder(args.dir)
        ResolverState.from_json(result.state_json())
    except FlagFileError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(exc.problems)} error(s)", file=sys.stderr)
        return 1
    except StateError as exc:
        print(f"error: compiled state does not load: {exc}", file=sys.stderr)
        return 1
    if args.action == "lock":
        path = Path(args.dir) / LOCK_FILE
        write_lock(path, result.lock)
        for seg, entry in result.lock["segments"].items():
            print(f"{seg}: {entry['buckets']} buckets ({entry['permutation']})")
        print(f"wrote {path}")
        return 0
    warnings = list(result.warnings)
    lock_problem = _lock_problem(Path(args.dir), result)
    if args.action == "compile":
        for w in warnings + ([lock_problem] if lock_problem else []):
            print(f"warning: {w}", file=sys.stderr)
        data = result.state_json()
        if args.output == "-":
            sys.stdout.buffer.write(data + b"\n")
        else:
            Path(args.output).write_bytes(data)
        return 0
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if lock_problem:
        # Without an up-to-date lock this check could not tell what the change moves, and replicas
        # without a record of what they served would start from a different allocation.
        print(f"error: {lock_problem}", file=sys.stderr)
        return 1
    flags = len(result.state["flags"])
    if args.strict and warnings:
        print(f"{len(warnings)} warning(s), which --strict counts as errors", file=sys.stderr)
        return 1
    print(f"ok: {flags} flag(s), {len(result.files)} file(s)")
    return 0


def _lock_problem(folder: Path, result: CompileResult) -> str | None:
    """Why the folder's allocation lock is not the one its files compile to (None when it is)."""
    from assignment_server.authoring.compiler import LOCK_FILE

    if not result.lock_changed or not result.lock.get("segments"):
        return None
    path = folder / LOCK_FILE
    state = "is out of date" if path.exists() else "is missing"
    return (f"{path}:1: {state}; run `twofold flags lock {folder}` and commit it with the change "
            "(it records who holds which allocation buckets, so no later change can move running units)")


FLAGS = Command(_configure_flags, _run_flags)


# -- conformance ----------------------------------------------------------------------------------

def _configure_conformance(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    c = sub.add_parser("confidence", help="Confidence resolver specification (state.json + tests.json)")
    c.add_argument("--state", required=True, help="resolver state JSON (or a flags folder)")
    c.add_argument("--tests", required=True, help="tests.json")
    c.add_argument("-q", "--quiet", action="store_true", help="print failures and the summary only")


def _run_conformance(args: argparse.Namespace) -> int:
    from assignment_server.authoring.compiler import load_flag_source
    from assignment_server.conformance import load_cases, run_case
    from twofold.resolver import ResolverState

    try:
        state_bytes, _ = load_flag_source(args.state)
        state = ResolverState.from_json(state_bytes)
        cases = load_cases(args.tests)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    passed = failed = 0
    for case in cases:
        result = run_case(state, case)
        if result.passed:
            passed += 1
            if not args.quiet:
                print(f"PASS {result.name}")
        else:
            failed += 1
            print(f"FAIL {result.name}: {'; '.join(result.problems)}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


CONFORMANCE = Command(_configure_conformance, _run_conformance)
