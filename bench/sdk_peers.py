"""Twofold's SDK side by side with GrowthBook and flagd, on one flag written natively for each.

The flag: a country rule (`country == SE`) in front of a 33/33/34 split of three string values;
everyone else gets the default. Each system evaluates the same contexts (three units in four
from SE), each in its own process; flagd's provider pins a protobuf this project cannot
install, so it runs from its own virtual environment (created on first run under
`build/bench-venvs/`, with the same `openfeature-sdk` version as this environment). Before
any time counts, every system's values are checked: about 33/33/34 among the SE contexts and
the default for the others. Then rounds alternate the systems (a noisy neighbour hits all
alike) and ratios are taken within each round; the medians are printed. Within a round each
system's evaluations are timed in chunks and the fastest chunk counts (as `timeit` advises: on
a shared machine the slower ones measure the neighbours).

Cases:
- twofold-core: `twofold.resolver.Resolver.resolve` (the in-process resolver alone);
- twofold-sdk: `Client.resolve()` with local evaluation (state streamed from a real assignment
  server started here), plus the exposure bookkeeping of `apply()` (dedup + queue) on fresh
  results, on duplicates, and the protobuf building its later drain costs per exposure;
- growthbook: `GrowthBook.set_attributes` + `eval_feature` (the `growthbook` package);
- of-constant: the OpenFeature SDK's `get_string_details` over a provider returning a constant
  (the SDK's own cost), in both environments;
- of-twofold: the same over `TwofoldProvider` (local evaluation; each evaluation queues an
  exposure, every unit being new);
- of-resolver-core: the same over a provider that only calls the resolver core (no result
  object, no exposure): the floor for any provider over Twofold's resolver;
- of-flagd: the same over `openfeature-provider-flagd` in in-process file mode (no flagd server).

    python -m bench.sdk_peers [--evals 20000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from importlib import metadata
from pathlib import Path

from bench.common import ROOT, print_table, spawn, stop

SECRET = "bench-secret"
FLAGD_PROVIDER = "openfeature-provider-flagd==0.6.1"
VENVS = ROOT / "build" / "bench-venvs"
WORKER = Path(__file__).resolve().parent / "peer_worker.py"
SPLIT = {"red": 0.33, "green": 0.33, "blue": 0.34}

TWOFOLD_FLAG = """\
flag: checkout
variants:
  red: {color: red}
  green: {color: green}
  blue: {color: blue}
rules:
  - name: nordics
    when: {attribute: country, eq: SE}
    experiment: {allocation: 100%, arms: {red: 33, green: 33, blue: 34}}
---
client: bench
secrets:
  - secret: bench-secret
"""

FLAGD_FLAGS = {"flags": {"checkout": {
    "state": "ENABLED",
    "variants": {"red": "red", "green": "green", "blue": "blue", "none": "none"},
    "defaultVariant": "none",
    "targeting": {"if": [{"==": [{"var": "country"}, "SE"]},
                         {"fractional": [["red", 33], ["green", 33], ["blue", 34]]},
                         "none"]},
}}}

GROWTHBOOK_FEATURES = {"checkout": {
    "defaultValue": "none",
    "rules": [{"condition": {"country": "SE"}, "key": "checkout", "hashAttribute": "id", "coverage": 1.0,
               "variations": ["red", "green", "blue"], "weights": [0.33, 0.33, 0.34]}],
}}


def venv_python(name: str, requirements: list[str], probe: str) -> str:
    """The python of `build/bench-venvs/<name>`, created and filled on first use."""
    folder = VENVS / name
    python = folder / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return str(python)
    print(f"(creating {folder} with {' '.join(requirements)})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
    subprocess.run([str(python), "-c", probe], check=True)
    return str(python)


class Worker:
    """One case in its own process (bench/peer_worker.py), driven line by line."""

    def __init__(self, label: str, case: str, python: str, spec: dict, project: bool) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)} if project else \
            {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.label = label
        self.proc = subprocess.Popen([python, str(WORKER), case, json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        ready = self._read()
        self.versions = ready["versions"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"{self.label}: worker exited ({self.proc.wait()})")
        return json.loads(line)

    def ask(self, **command: object) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask(cmd="quit")
            except (BrokenPipeError, RuntimeError, json.JSONDecodeError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def check_distribution(worker: Worker, n: int) -> str:
    """Refuse to time a system that does not serve the flag: ~33/33/34 on SE, the default elsewhere."""
    values = worker.ask(cmd="values", n=n)["values"]
    se = Counter(v for i, v in enumerate(values) if i % 4 != 3)
    other = Counter(v for i, v in enumerate(values) if i % 4 == 3)
    total = sum(se.values())
    shares = {k: se.get(k, 0) / total for k in SPLIT}
    if set(se) != set(SPLIT) or any(abs(shares[k] - SPLIT[k]) > 0.02 for k in SPLIT) or set(other) != {"none"}:
        raise SystemExit(f"{worker.label} does not serve the flag as written: SE {dict(se)}, others {dict(other)}")
    return "/".join(f"{shares[k] * 100:.1f}" for k in SPLIT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evals", type=int, default=20000, help="evaluations per case per round")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (after one warm-up round)")
    parser.add_argument("--chunks", type=int, default=5,
                        help="each round's evaluations are timed in this many chunks; the fastest counts")
    parser.add_argument("--check", type=int, default=12000, help="contexts in the distribution check")
    args = parser.parse_args()

    sdk_version = metadata.version("openfeature-sdk")
    flagd_python = venv_python("flagd", [f"openfeature-sdk=={sdk_version}", FLAGD_PROVIDER],
                               "import openfeature.contrib.provider.flagd, importlib.metadata as m; "
                               f"assert m.version('openfeature-sdk') == {sdk_version!r}")
    try:
        import growthbook  # noqa: F401  (in this project's [test] extra; no conflicting pins)
        growthbook_python = sys.executable
    except ImportError:
        growthbook_python = venv_python("growthbook", ["growthbook"], "import growthbook")

    from assignment_server.authoring.compiler import compile_folder

    folder = Path(tempfile.mkdtemp(prefix="twofold-bench-peers-"))
    (folder / "flags").mkdir()
    (folder / "flags" / "checkout.yaml").write_text(TWOFOLD_FLAG)
    (folder / "state.json").write_bytes(compile_folder(folder / "flags").state_json())
    (folder / "flagd.json").write_text(json.dumps(FLAGD_FLAGS))
    (folder / "growthbook.json").write_text(json.dumps(GROWTHBOOK_FEATURES))
    server, info = spawn(["serve-assignment", "--flags", str(folder / "flags"), "--lake", str(folder / "lake"),
                          "--materializations", "memory", "--log-level", "error", "--host", "127.0.0.1",
                          "--port", "0", "--metrics-port", "-1"])
    spec = {"state": str(folder / "state.json"), "secret": SECRET, "assignment": f"127.0.0.1:{info['port']}",
            "flagd_file": str(folder / "flagd.json"), "growthbook_file": str(folder / "growthbook.json")}
    plan = [("twofold-core", "twofold-core", sys.executable, True),
            ("twofold-sdk", "twofold-sdk", sys.executable, True),
            ("growthbook", "growthbook", growthbook_python, growthbook_python == sys.executable),
            ("of-constant", "of-constant", sys.executable, True),
            ("of-twofold", "of-twofold", sys.executable, True),
            ("of-resolver-core", "of-resolver-core", sys.executable, True),
            ("of-constant (flagd venv)", "of-constant", flagd_python, False),
            ("of-flagd", "of-flagd", flagd_python, False)]
    workers: dict[str, Worker] = {}
    try:
        for label, case, python, project in plan:
            workers[label] = Worker(label, case, python, spec, project)
        versions = {label: w.versions for label, w in workers.items()}
        print("versions:", json.dumps({k: versions[k] for k in ("of-twofold", "of-flagd", "growthbook")}))
        print(f"distribution check over {args.check} contexts (SE red/green/blue %, others all default):")
        for label, worker in workers.items():
            if "constant" not in label:
                print(f"  {label:>10}: {check_distribution(worker, args.check)}")
        times: dict[str, list[float]] = {label: [] for label in workers}
        extras: dict[str, list[float]] = {}
        labels = list(workers)
        for round_no in range(args.rounds + 1):
            order = labels[round_no % len(labels):] + labels[:round_no % len(labels)]  # rotate positions
            for label in order:
                answer = workers[label].ask(cmd="round", round=round_no, n=args.evals, chunks=args.chunks)
                if round_no == 0:
                    continue  # warm-up
                times[label].append(answer.pop("us"))
                for key, value in answer.items():
                    extras.setdefault(f"{label} {key}", []).append(value)
    finally:
        for worker in workers.values():
            worker.close()
        stop(server)
    report(times, extras, args)


def _paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's time / b's time in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def _paired_diff(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x - y for x, y in zip(times[a], times[b], strict=True))


def report(times: dict[str, list[float]], extras: dict[str, list[float]], args: argparse.Namespace) -> None:
    print(f"\n{args.rounds} rounds x {args.evals} evaluations per case, interleaved; µs per evaluation, "
          f"fastest of {args.chunks} chunks per round:")
    print_table([(label, statistics.median(ts), min(ts), max(ts)) for label, ts in times.items()],
                ("case", "median µs", "min", "max"))
    apply_us = statistics.median(extras["twofold-sdk apply_us"])
    rows = [
        ("SDK resolve() / GrowthBook eval_feature", f"{_paired(times, 'twofold-sdk', 'growthbook'):.2f}x", "<= 0.5x"),
        ("SDK resolve() / resolver core", f"{_paired(times, 'twofold-sdk', 'twofold-core'):.2f}x", "<= 2x"),
        ("exposure bookkeeping, apply() of a fresh result", f"{apply_us:.2f} µs", "<= 3 µs"),
        ("  apply() of a duplicate (deduplicated)",
         f"{statistics.median(extras['twofold-sdk apply_duplicate_us']):.2f} µs", ""),
        ("  protobuf building at drain (sender thread), per exposure",
         f"{statistics.median(extras['twofold-sdk drain_us_per_exposure']):.2f} µs", ""),
        ("OpenFeature get_string_details: Twofold / flagd in-process",
         f"{_paired(times, 'of-twofold', 'of-flagd'):.2f}x", "<= 0.8x"),
        ("OpenFeature: Twofold - constant provider (SDK's own cost)",
         f"{_paired_diff(times, 'of-twofold', 'of-constant'):+.1f} µs", "<= +10 µs"),
        ("  floor: a provider calling only the resolver core - constant",
         f"{_paired_diff(times, 'of-resolver-core', 'of-constant'):+.1f} µs", ""),
        ("  Twofold provider - that floor (result, exposure, metadata)",
         f"{_paired_diff(times, 'of-twofold', 'of-resolver-core'):+.1f} µs", ""),
        ("OpenFeature: flagd - constant provider (flagd venv)",
         f"{_paired_diff(times, 'of-flagd', 'of-constant (flagd venv)'):+.1f} µs", ""),
        ("GrowthBook / resolver core", f"{_paired(times, 'growthbook', 'twofold-core'):.2f}x", ""),
    ]
    print("\nratios within each round (median over rounds):")
    print_table(rows, ("measure", "figure", "goal"))
    print(f"\n(machine load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
