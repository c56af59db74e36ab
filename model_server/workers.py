"""`--workers N`: N processes, each its own `grpc.aio` server on one shared port.

Python serves one core per process, so throughput scales by processes. The parent forks the
workers before any gRPC server, ONNX Runtime session or thread exists (forking after those
start is unsafe), and every worker binds the same port: the runtime sets SO_REUSEPORT, and the
kernel spreads new connections across the workers. For port 0, the parent reserves a free port
first and passes it on.

Metrics use prometheus_client's multiprocess mode rather than one port per worker: workers
write their samples to files in a private directory and the parent serves the merged view on
the one `--metrics-port`, so Prometheus scrapes a pod as one target and counters survive a
worker restart. A worker that dies unexpectedly is replaced; SIGTERM or SIGINT to the parent is
forwarded to every worker, which drain in-flight calls and exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("twofold.model.workers")


def _reserve_port(host: str) -> tuple[socket.socket, int]:
    """Bind (not listen) a SO_REUSEPORT socket on a free port, so the workers can share it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host if host not in ("", "0.0.0.0") else "0.0.0.0", 0))
    return sock, int(sock.getsockname()[1])


def run_workers(args: argparse.Namespace, serve_one: Callable[[argparse.Namespace], int]) -> int:
    """Fork `args.workers` processes running `serve_one(args)`; supervise them until a signal."""
    from twofold.lakestore import default_writer_id
    from twofold.logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    if "prometheus_client" in sys.modules:
        # Metrics created before the environment variable below would not be shared.
        raise RuntimeError("prometheus_client was imported before the workers were forked; "
                           "model metrics would not be merged across workers")
    from twofold.ports import PortInUseError, check_port_free
    from twofold.settings import metrics_port_for

    args.metrics_port = -1 if (port := metrics_port_for(args.port, args.metrics_port)) is None else port
    reserved = None
    if args.port == 0:
        reserved, args.port = _reserve_port(args.host)
    else:
        try:  # the workers share the port with each other (SO_REUSEPORT), never with another server
            check_port_free(args.host, args.port, "gRPC")
        except PortInUseError as exc:
            print(f"twofold: {exc}", file=sys.stderr)
            return 1
    metrics_dir = tempfile.mkdtemp(prefix="twofold-model-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ready_file = getattr(args, "ready_file", None)
    state_dir = Path(tempfile.mkdtemp(prefix="twofold-model-workers-"))
    stopping = False
    children: dict[int, int] = {}  # pid -> worker index

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                child_args = argparse.Namespace(**vars(args))
                child_args.metrics_port = -1
                child_args.ready_file = str(state_dir / f"worker-{index}.json")
                child_args.workers = 1
                child_args.reuse_port = True
                # Each worker owns its own decision log, the same one after a restart (twofold.lake).
                child_args.writer_id = f"{getattr(args, 'writer_id', None) or default_writer_id()}-w{index}"
                code = serve_one(child_args)
            except BaseException:
                logging.getLogger("twofold.model.workers").exception("worker failed")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = index

    signalled: set[int] = set()
    ever_ready: set[int] = set()

    def ready(index: int) -> bool:
        return (state_dir / f"worker-{index}.json").exists()

    def forward_stop() -> None:
        """SIGTERM every worker that is serving. One still starting (a replacement) is signalled once
        ready: before that its SIGTERM would be the default action, killing it before it recovered
        its predecessor's write-ahead log or drained anything."""
        for pid, index in list(children.items()):
            if pid not in signalled and ready(index):
                signalled.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        forward_stop()

    for index in range(args.workers):
        spawn(index)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    from prometheus_client import CollectorRegistry, multiprocess

    from twofold.metrics import serve_metrics

    httpd = None
    metrics_port = None
    if args.metrics_port >= 0:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)
        httpd, metrics_port = serve_metrics(args.metrics_host, args.metrics_port, registry)

    published = False
    exit_code = 0
    try:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                index = children.pop(pid)
                multiprocess.mark_process_dead(pid, metrics_dir)
                code = os.waitstatus_to_exitcode(status)
                started = ready(index) or index in ever_ready
                if not stopping and not started:
                    log.error("worker failed before it was ready; stopping", extra={"fields": {
                        "worker": index, "pid": pid, "exit_code": code}})
                    on_signal(signal.SIGTERM, None)
                    exit_code = 1
                elif not stopping:
                    log.error("worker exited; starting a replacement", extra={"fields": {
                        "worker": index, "pid": pid, "exit_code": code}})
                    time.sleep(0.5)
                    ever_ready.add(index)  # a replacement that fails is replaced again, as before
                    (state_dir / f"worker-{index}.json").unlink(missing_ok=True)  # ready again when it says so
                    spawn(index)
                elif code not in (0, -signal.SIGTERM):
                    # A worker still starting when our SIGTERM came dies by it (its handler is not
                    # installed yet, and its lake log is recovered by its next start): not a failure.
                    exit_code = code if code > 0 else 1
                continue
            if stopping:
                forward_stop()
            if not published and len(list(state_dir.glob("worker-*.json"))) >= args.workers:
                published = True
                if reserved is not None:
                    reserved.close()
                    reserved = None
                workers = [json.loads(p.read_text())["pid"] for p in sorted(state_dir.glob("worker-*.json"))]
                log.info("model server workers ready", extra={"fields": {
                    "port": args.port, "metrics_port": metrics_port, "workers": workers}})
                if ready_file:
                    target = Path(ready_file)
                    tmp = target.with_name(target.name + ".tmp")
                    tmp.write_text(json.dumps({"pid": os.getpid(), "port": args.port, "metrics_port": metrics_port,
                                               "workers": workers}))
                    os.replace(tmp, target)
            time.sleep(0.05)
    finally:
        if reserved is not None:
            reserved.close()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    return exit_code
