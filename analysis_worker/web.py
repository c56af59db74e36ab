"""The results web UI of `serve-analysis`: what product managers and on-call engineers look at.

A read-only HTTP server (standard library, one thread per request, beside the gRPC server) over
the worker's latest results:

    /                                   every experiment: status, recommendation, SRM, units, last computed, errors
    /experiments/<name>                 the experiment's report (the same HTML as results/<name>.html)
    /experiments/<name>/looks           the history of its computations (looks) since the server started
    /experiments/<name>/looks/<n>       the report as it was at look n
    /experiments/<name>/results.json    the results document (contract 5)
    /healthz                            200 "ok"

Pages are plain HTML with inline CSS and SVG: no scripts, no external assets (works offline),
readable from a phone's width up. Every address is a plain path, so links survive a refresh and
can be shared. Access follows the gRPC API: the same TLS certificate, and with a client CA the
same mutual TLS; with the gRPC API's client secrets configured (`--client-secrets-file`, re-read
when the file changes), a request must carry one in the `Authorization` header, either
`Bearer <secret>` or HTTP Basic with the secret as the password (so a browser can prompt for it).
Secrets never travel in the URL.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import hmac
import html
import json
import logging
import ssl
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

from analysis_worker.charts import fmt_number, fmt_p, fmt_pct
from analysis_worker.report import page_head, render_html
from twofold.settings import TlsSettings

if TYPE_CHECKING:
    from analysis_worker.service import AnalysisWorker, ExperimentState

log = logging.getLogger("twofold.analysis.web")

MAX_LOOKS = 200  # per experiment, in memory: about 200 documents of a few tens of kB each
SECURITY_HEADERS = {
    # Inline CSS only: no scripts, no frames, nothing fetched from anywhere.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Look:
    """One published computation of an experiment."""

    computed_at: dt.datetime
    document: dict[str, Any]


class LookHistory:
    """The documents each experiment published, oldest first, bounded per experiment."""

    def __init__(self, limit: int = MAX_LOOKS) -> None:
        self._looks: dict[str, collections.deque[Look]] = {}
        self._lock = threading.Lock()
        self.limit = limit

    def record(self, state: ExperimentState) -> None:
        """Called by the worker after each successful computation."""
        if state.analysis is None or state.computed_at is None:
            return
        with self._lock:
            looks = self._looks.setdefault(state.name, collections.deque(maxlen=self.limit))
            if not looks or looks[-1].computed_at != state.computed_at:
                looks.append(Look(state.computed_at, state.analysis.document))

    def of(self, name: str) -> list[Look]:
        with self._lock:
            return list(self._looks.get(name, ()))


def _link(*parts: str) -> str:
    return "/" + "/".join(quote(p, safe="") for p in parts)


def _nav(name: str | None = None) -> str:
    items = ["<a href='/'>All experiments</a>"]
    if name is not None:
        items += [f"<a href='{_link('experiments', name)}'>Report</a>",
                  f"<a href='{_link('experiments', name, 'looks')}'>Looks</a>",
                  f"<a href='{_link('experiments', name, 'results.json')}'>JSON</a>"]
    return f"<nav>{''.join(items)}</nav>"


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _status(state: ExperimentState, now: dt.datetime) -> str:
    if state.analysis is None:
        return "error" if state.summary_error() else "not computed yet"
    config = state.config
    if config is not None and config.end is not None and config.end <= now:
        return "ended"
    if config is not None and config.start > now:
        return "scheduled"
    return "running"


def _srm(document: dict[str, Any]) -> str:
    srm = document.get("srm")
    if not srm:
        return "-"
    if srm.get("mismatch"):
        return f"<span class='bad'>MISMATCH</span> (p {fmt_p(srm.get('p_value'))})"
    return f"<span class='good'>ok</span> (p {fmt_p(srm.get('p_value'))})"


def _recommendation(document: dict[str, Any]) -> str:
    rec = str((document.get("decision") or {}).get("recommendation") or "-")
    cls = {"ship": "good", "no-ship": "bad", "keep-running": "warn"}.get(rec, "")
    return f"<span class='{cls}'>{html.escape(rec)}</span>"


class ResultsSite:
    """Renders the pages from the worker's state (safe to call from the HTTP threads)."""

    def __init__(self, worker: AnalysisWorker, history: LookHistory) -> None:
        self.worker = worker
        self.history = history

    def _states(self) -> list[ExperimentState]:
        # The worker's thread may add an experiment while a request reads: copy, retry on a race.
        for _ in range(5):
            try:
                return sorted(list(self.worker.experiments.values()), key=lambda s: s.name)
            except RuntimeError:
                continue
        return []

    def index(self) -> str:
        now = dt.datetime.now(dt.UTC)
        rows = []
        for state in self._states():
            doc = state.analysis.document if state.analysis else {}
            units = sum((doc.get("units") or {}).values()) if doc else None
            errors = html.escape(state.summary_error()) or "-"
            rows.append(
                f"<tr><td class='l'><a href='{_link('experiments', state.name)}'>{html.escape(state.name)}</a></td>"
                f"<td class='l opt'>{html.escape(state.config.flag if state.config else '-')}</td>"
                f"<td class='l'>{html.escape(_status(state, now))}</td><td class='l'>{_recommendation(doc)}</td>"
                f"<td class='l'>{_srm(doc)}</td><td class='opt'>{fmt_number(units) if units is not None else '-'}</td>"
                f"<td class='l'>{_when(state.computed_at)}</td>"
                f"<td class='l opt'><a href='{_link('experiments', state.name, 'looks')}'>"
                f"{len(self.history.of(state.name))}</a></td><td class='l bad'>{errors}</td></tr>")
        load_errors = "".join(f"<li class='warn'>{html.escape(e if e.startswith(f) else f'{f}: {e}')}</li>"
                              for f, e in sorted(self.worker.load_errors.items()))
        body = ("<table><tr><th class='l'>experiment</th><th class='l opt'>flag</th><th class='l'>status</th>"
                "<th class='l'>recommendation</th><th class='l'>sample ratio</th><th class='opt'>units</th>"
                "<th class='l'>last computed</th><th class='l opt'>looks</th><th class='l'>errors</th></tr>"
                + "".join(rows) + "</table>") if rows else "<p>No experiments configured yet.</p>"
        return (page_head("Experiments") + _nav() + "<h1>Experiments</h1>"
                f"<p class='meta'>recomputed every {fmt_number(self.worker.every_seconds)} s · "
                f"rounds so far: {self.worker.rounds} · page rendered {_when(now)}</p>"
                f"<div class='scroll'>{body}</div>"
                + (f"<h2>Definitions not loaded</h2><ul>{load_errors}</ul>" if load_errors else "")
                + "</body></html>\n")

    def state(self, name: str) -> ExperimentState | None:
        return next((s for s in self._states() if s.name == name), None)

    def report(self, state: ExperimentState) -> str | None:
        if state.analysis is None:
            return None
        note = ""
        if state.summary_error():
            note = (f"<div class='banner error'>The last computation failed; showing the results of "
                    f"{_when(state.computed_at)}: {html.escape(state.summary_error())}</div>")
        return render_html(state.analysis.document, nav=_nav(state.name) + note)

    def looks(self, state: ExperimentState) -> str:
        looks = self.history.of(state.name)
        rows = []
        for i, look in reversed(list(enumerate(looks, start=1))):
            doc = look.document
            rows.append(f"<tr><td><a href='{_link('experiments', state.name, 'looks', str(i))}'>{i}</a></td>"
                        f"<td class='l'>{_when(look.computed_at)}</td>"
                        f"<td>{fmt_number(sum((doc.get('units') or {}).values()))}</td>"
                        f"<td class='l'>{_recommendation(doc)}</td><td class='l'>{_srm(doc)}</td></tr>")
        table = ("<table><tr><th>look</th><th class='l'>computed</th><th>units</th><th class='l'>recommendation</th>"
                 "<th class='l'>sample ratio</th></tr>" + "".join(rows) + "</table>") if rows else \
            "<p>No computation has been published since this server started.</p>"
        return (page_head(f"{state.name}: looks") + _nav(state.name) + f"<h1>{html.escape(state.name)}: looks</h1>"
                + _sequential_looks(state) +
                "<h2>Computations</h2><p class='meta'>Every computation this server published, newest first (kept "
                f"in memory, at most {self.history.limit}).</p><div class='scroll'>{table}</div></body></html>\n")

    def look(self, state: ExperimentState, number: int) -> str | None:
        looks = self.history.of(state.name)
        if not 1 <= number <= len(looks):
            return None
        banner = (f"<div class='banner keep-running'>Look {number} of {len(looks)}, computed "
                  f"{_when(looks[number - 1].computed_at)}: an earlier state of the results.</div>")
        return render_html(looks[number - 1].document, nav=_nav(state.name) + banner)


def _sequential_looks(state: ExperimentState) -> str:
    """The sequential test's look log (kept beside the results, so it survives restarts)."""
    log_ = getattr(state, "looks", None)
    looks = getattr(log_, "looks", None)
    if not looks:
        return ""
    rows = "".join(f"<tr><td>{i}</td><td class='l'>{html.escape(str(look.get('at', '-')))}</td>"
                   f"<td>{fmt_number(look.get('units'))}</td>"
                   f"<td>{html.escape(fmt_pct(look.get('information'), 1, sign=False))}</td></tr>"
                   for i, look in reversed(list(enumerate(looks, start=1))))
    closed = " The test is closed: the plan is complete." if getattr(log_, "closed", None) else ""
    return ("<h2>Sequential looks</h2><p class='meta'>Every look the sequential test took, newest first; the "
            f"guarantee on false positives accounts for all of them.{closed}</p><div class='scroll'><table>"
            "<tr><th>look</th><th class='l'>taken</th><th>units</th><th>information</th></tr>"
            f"{rows}</table></div>")


def _page(title: str, message: str) -> str:
    return (page_head(title) + _nav() + f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
            "</body></html>\n")


def _handler(site: ResultsSite, secrets: Callable[[], Collection[str]] | None) -> type[BaseHTTPRequestHandler]:

    class Handler(BaseHTTPRequestHandler):
        server_version = "twofold-results"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http " + format, *args)

        def _authorized(self) -> bool:
            if secrets is None:
                return True
            encoded = [s.encode() for s in secrets()]
            header = self.headers.get("Authorization", "")
            scheme, _, value = header.partition(" ")
            if scheme.lower() == "bearer":
                given = value.strip().encode()
            elif scheme.lower() == "basic":
                try:
                    given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
                except ValueError:
                    return False
            else:
                return False
            return any(hmac.compare_digest(given, s) for s in encoded)

        def _send(self, status: HTTPStatus, body: str, content_type: str = "text/html; charset=utf-8",
                  extra: dict[str, str] | None = None) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for key, value in {**SECURITY_HEADERS, **(extra or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            try:
                self._get()
            except Exception:  # a bug renders one page as an error; the server keeps serving
                log.exception("results page failed", extra={"fields": {"path": self.path}})
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, _page("Error", "This page could not be rendered."))

        def _refuse(self) -> None:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, _page("Read-only", "This server only answers GET."),
                       extra={"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

        def _get(self) -> None:
            path = urlsplit(self.path).path
            if path == "/healthz":
                self._send(HTTPStatus.OK, "ok\n", "text/plain; charset=utf-8")
                return
            if not self._authorized():
                self._send(HTTPStatus.UNAUTHORIZED, _page("Sign in", "This server needs a client secret."),
                           extra={"WWW-Authenticate": 'Basic realm="twofold results", charset="UTF-8"'})
                return
            parts = [unquote(p) for p in path.strip("/").split("/") if p]
            if not parts:
                self._send(HTTPStatus.OK, site.index())
                return
            if parts[0] != "experiments" or len(parts) < 2 or len(parts) > 4:
                self._send(HTTPStatus.NOT_FOUND, _page("Not found", f"No page at {path}."))
                return
            state = site.state(parts[1])
            if state is None:
                self._send(HTTPStatus.NOT_FOUND, _page("Not found", f"No experiment named {parts[1]!r}."))
                return
            rest = parts[2:]
            if not rest:
                page = site.report(state)
                if page is None:
                    message = state.summary_error() or "It has not been computed yet; this page will show it."
                    self._send(HTTPStatus.SERVICE_UNAVAILABLE, _page(state.name, message),
                               extra={"Retry-After": "5"})
                else:
                    self._send(HTTPStatus.OK, page)
            elif rest == ["results.json"] and state.analysis is not None:
                self._send(HTTPStatus.OK, json.dumps(state.analysis.document, indent=1),
                           "application/json; charset=utf-8")
            elif rest == ["looks"]:
                self._send(HTTPStatus.OK, site.looks(state))
            elif len(rest) == 2 and rest[0] == "looks" and rest[1].isdigit() and \
                    (page := site.look(state, int(rest[1]))) is not None:
                self._send(HTTPStatus.OK, page)
            else:
                self._send(HTTPStatus.NOT_FOUND, _page("Not found", f"No page at {path}."))

    return Handler


class ResultsWebServer:
    """The HTTP server in a daemon thread; `port` is the bound port (0 picks a free one)."""

    def __init__(self, worker: AnalysisWorker, host: str, port: int, *, tls: TlsSettings | None = None,
                 secrets: Callable[[], Collection[str]] | None = None) -> None:
        self.history = LookHistory()
        worker.on_computed.append(self.history.record)
        self.site = ResultsSite(worker, self.history)
        self.httpd = ThreadingHTTPServer((host, port), _handler(self.site, secrets))
        self.httpd.daemon_threads = True
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
            if tls.client_ca_file is not None:
                context.load_verify_locations(str(tls.client_ca_file))
                context.verify_mode = ssl.CERT_REQUIRED
            # The handshake then happens in the request's thread, so a slow client never blocks accept().
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True,
                                                    do_handshake_on_connect=False)
        self.tls = tls is not None
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="results-web", daemon=True)

    def start(self) -> ResultsWebServer:
        self._thread.start()
        log.info("results web UI started", extra={"fields": {"port": self.port, "tls": self.tls}})
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
