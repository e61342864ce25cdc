"""The review web app (Starlette): the queue, a sample view, keyboard decisions, undo.

Routes:

- ``GET /``: the page (queue filters in the query; ``sample=ID`` opens that sample);
- ``GET /api/queue``: the queue as JSON (ids, rule, dataset, status, reviewed) and its counts;
- ``GET /sample/{id}``, ``GET /panel``, ``GET /lessons``: HTML fragments (one sample; the
  counts per rule; what review teaches);
- ``GET /thumb/{id}/{k}``, ``GET /image/{id}/{k}``: a sample's k-th image, by sample id only;
- ``POST /api/decide``, ``POST /api/undo``: decisions, through ``curate.review.decisions``;
  ``GET /api/token``: the token POSTs carry (for a page older than a server restart).

Safety: every response carries a Content-Security-Policy (scripts, styles and images from
this origin only, no inline script or style, no frames) and ``Referrer-Policy: no-referrer``
(the URL may hold the token); requests must name an allowed host (DNS rebinding); with a
token (bound beyond loopback), every request carries it (the URL's ``?token=``, then a
same-site cookie); a POST needs the page's same-origin token in a header, JSON content, and
no cross-site Origin. Images are read only from inside the run's dataset roots. Templates
autoescape every value.
"""

from __future__ import annotations

import functools
import json
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from curate.core.errors import CurateError
from curate.core.folder import RunLockedError
from curate.review.data import BadFilter, Filters, ReviewData
from curate.review.decisions import record, rule_targets, sample_targets, withdraw
from curate.stages.report.html import CARD_CSS, image_jpeg, make_environment
from curate.stages.report.write import visible_controls

HERE = Path(__file__).parent
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
TOKEN_COOKIE = "curate_review_token"
CSRF_HEADER = "x-curate-csrf"
THUMB_PX = 240
FULL_PX = 2048
MAX_BODY_BYTES = 64 * 1024
MAX_NOTE_CHARS = 2000
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class Guard:
    """Host check, token check and security headers around the whole app (pure ASGI)."""

    def __init__(self, app: ASGIApp, token: str | None, hosts: tuple[str, ...] | None) -> None:
        self.app, self.token, self.hosts = app, token, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        host = _hostname(request.headers.get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            await _plain(400, "unknown host: open the URL curate review printed")(
                scope, receive, send
            )
            return
        from_query = False
        if self.token is not None:
            given = request.cookies.get(TOKEN_COOKIE, "")
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                given = request.query_params.get("token", "")
                from_query = True
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                await _plain(403, "this review server needs the token in the URL it printed")(
                    scope, receive, send
                )
                return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                for k, v in SECURITY_HEADERS:
                    headers.append((k.encode(), v.encode()))
                if from_query:
                    cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                    headers.append((b"set-cookie", cookie.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


SECURITY_HEADERS = (
    ("content-security-policy", CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
)


def _hostname(host: str) -> str:
    """The host of a Host header, without its port (``[::1]:8765`` -> ``::1``)."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _plain(status: int, text: str) -> Response:
    return Response(text + "\n", status_code=status, media_type="text/plain")


def _error(status: int, message: str, **extra: object) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message, **extra}, status_code=status)


def guarded(endpoint: Callable[[ReviewApp, Request], Response]):
    """An endpoint that reads ``ReviewData`` (and its caches), one request at a time; Starlette
    runs it in its thread pool, so the event loop keeps serving static files meanwhile."""

    @functools.wraps(endpoint)
    def run(self: ReviewApp, request: Request) -> Response:
        with self.mutex:
            return endpoint(self, request)

    return run


class ReviewApp:
    """The routes over one run's ``ReviewData``; ``lock_wait_s``: how long a decision waits
    for a run lock another process holds before the page is told to retry."""

    def __init__(self, data: ReviewData, csrf: str, lock_wait_s: float) -> None:
        self.mutex = threading.Lock()
        self.data = data
        self.csrf = csrf
        self.lock_wait_s = lock_wait_s
        self.env = make_environment(HERE / "templates")

    def render(self, name: str, **context: object) -> str:
        return visible_controls(self.env.get_template(name).render(**context))

    def filters(self, request: Request) -> Filters:
        return Filters.parse(dict(request.query_params))

    # -- pages and fragments ------------------------------------------------------------------
    @guarded
    def page(self, request: Request) -> Response:
        try:
            f = self.filters(request)
        except BadFilter as e:
            return _plain(400, str(e))
        self.data.reload_if_changed()  # a stage may have run since
        q = self.data.queue(f)
        wanted = request.query_params.get("sample", "")
        ids = [it["id"] for it in q.items]
        if wanted in ids:
            index = ids.index(wanted)
        else:
            index = next((i for i, it in enumerate(q.items) if not it["reviewed"]), 0)
        current = q.items[index]["id"] if q.items else None
        state = {"items": q.items, "index": index, "filters": f.query(), "total": q.total}
        html = self.render(
            "page.html",
            run=self.data.run.path,
            f=f,
            options=self.data.options(),
            queue=q,
            state=state,
            csrf=self.csrf,
            sample=self._sample_context(current, q.items[index] if q.items else None),
            lessons=self.data.lessons(),
        )
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    def _sample_context(self, sample_id: str | None, item: dict | None) -> dict | None:
        if sample_id is None:
            return None
        card = self.data.card(sample_id)
        if card is None:
            return None
        failures = self.data.failures(sample_id)
        partner_id = self.data.partner_id(sample_id, failures)
        partner = self.data.card(partner_id) if partner_id else None
        return {"card": card, "item": item, "partner": partner}

    @guarded
    def sample(self, request: Request) -> Response:
        sid = request.path_params["sample_id"]
        ctx = self._sample_context(sid, None)
        if ctx is None:
            return _plain(404, "no such sample in this run")
        return HTMLResponse(
            self.render("sample.html", sample=ctx), headers={"cache-control": "no-store"}
        )

    @guarded
    def panel(self, request: Request) -> Response:
        try:
            f = self.filters(request)
        except BadFilter as e:
            return _plain(400, str(e))
        html = self.render("panel.html", queue=self.data.queue(f))
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    @guarded
    def lessons(self, request: Request) -> Response:
        html = self.render("teach.html", lessons=self.data.lessons())
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    @guarded
    def queue(self, request: Request) -> Response:
        try:
            f = self.filters(request)
        except BadFilter as e:
            return _error(400, str(e))
        self.data.reload_if_changed()
        q = self.data.queue(f)
        return JSONResponse(
            {
                "items": q.items,
                "total": q.total,
                "reviewed": q.reviewed,
                "per_rule": q.per_rule,
                "filters": f.query(),
            },
            headers={"cache-control": "no-store"},
        )

    def image(self, request: Request) -> Response:
        """A sample's k-th image, re-encoded as JPEG (RGB, as the trainer sees it); only from
        inside the dataset roots; 404 for anything else, never a hint of the path."""
        sid, k = request.path_params["sample_id"], request.path_params["index"]
        with self.mutex:
            path = self.data.image_path(sid, k)
        side = THUMB_PX if request.url.path.startswith("/thumb/") else FULL_PX
        data = image_jpeg(path, side, roots=self.data.roots, quality=85) if path else None
        if data is None:
            return _plain(404, "no such image (or not readable from inside the dataset roots)")
        return Response(
            data, media_type="image/jpeg", headers={"cache-control": "private, max-age=600"}
        )

    def token(self, request: Request) -> Response:
        """The same-origin token for POSTs (another origin cannot read this answer)."""
        return JSONResponse({"csrf": self.csrf}, headers={"cache-control": "no-store"})

    def favicon(self, request: Request) -> Response:
        return Response(status_code=204)

    def card_css(self, request: Request) -> Response:
        return Response(CARD_CSS, media_type="text/css")

    # -- decisions ----------------------------------------------------------------------------
    async def _post_body(self, request: Request) -> dict | Response:
        """The JSON body of a POST that passed the same-origin checks, or the refusal."""
        if not secrets.compare_digest(
            request.headers.get(CSRF_HEADER, "").encode(), self.csrf.encode()
        ):
            # The page may predate a restart of the server: it asks for the new token (a GET
            # another site cannot read) and sends the decision again.
            return _error(403, "missing or wrong page token", stale_token=True)
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers['host']}":
            return _error(403, "cross-origin request refused")
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return _error(403, "cross-site request refused")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, "send JSON")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return _error(413, "request too large")
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "not JSON")
        if not isinstance(body, dict):
            return _error(400, "send a JSON object")
        return body

    async def decide(self, request: Request) -> Response:
        body = await self._post_body(request)
        if isinstance(body, Response):
            return body
        return await run_in_threadpool(self._decide, body)

    def _decide(self, body: dict) -> Response:
        decision = body.get("decision")
        note = body.get("note") or ""
        if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
            return _error(400, f"a note is text of at most {MAX_NOTE_CHARS} characters")
        sid, dataset, rule = body.get("sample_id"), body.get("dataset"), body.get("rule")
        data = self.data
        try:
            with self.mutex:
                if sid and not (dataset or rule):
                    targets = sample_targets(data.run, [str(sid)], data.samples)
                elif dataset and rule and not sid:
                    targets = rule_targets(data.run, str(dataset), str(rule), data.ledger)
                else:
                    return _error(400, "name a sample_id, or a dataset and a rule")
            # Outside the mutex: this may wait for the run lock; the page stays usable.
            done = record(data.run, targets, str(decision), note, wait_s=self.lock_wait_s)
        except RunLockedError as e:
            return _error(409, str(e), retry=True)
        except CurateError as e:
            return _error(400, str(e))
        scope = "sample" if sid else "rule"
        out = {"ok": True, "scope": scope, "decided_at": done.decided_at, "decision": decision}
        if sid:
            with self.mutex:
                out.update(
                    sample_id=sid, status=data.current_status(str(sid), targets[0]["dataset"])
                )
        else:
            out.update(dataset=dataset, rule=rule)
        return JSONResponse(out)

    async def undo(self, request: Request) -> Response:
        body = await self._post_body(request)
        if isinstance(body, Response):
            return body
        return await run_in_threadpool(self._undo, body)

    def _undo(self, body: dict) -> Response:
        try:
            decided_at = float(body["decided_at"])
        except (KeyError, TypeError, ValueError):
            return _error(400, "an undo names the decided_at of the decision it withdraws")
        sid, dataset, rule = body.get("sample_id"), body.get("dataset"), body.get("rule")
        if not (sid or (dataset and rule)):
            return _error(400, "an undo names a sample_id, or a dataset and a rule")
        try:
            removed = withdraw(
                self.data.run,
                decided_at,
                sample_id=str(sid) if sid else None,
                dataset=None if sid else str(dataset),
                rule=None if sid else str(rule),
                wait_s=self.lock_wait_s,
            )
        except RunLockedError as e:
            return _error(409, str(e), retry=True)
        if not removed:
            return _error(409, "that decision is not in the decisions file (already undone?)")
        out = {"ok": True, "removed": removed}
        if sid:
            with self.mutex:
                sample = self.data.sample(str(sid))
                if sample is not None:
                    status = self.data.current_status(str(sid), sample["dataset"])
                    out.update(sample_id=sid, status=status)
        return JSONResponse(out)


def create_app(
    data: ReviewData,
    *,
    token: str | None = None,
    hosts: tuple[str, ...] | None = LOOPBACK_HOSTS,
    lock_wait_s: float = 2.0,
    csrf: str | None = None,
) -> ASGIApp:
    """The review app over ``data``. ``token``: required on every request (the server adds one
    when bound beyond loopback); ``hosts``: the Host names accepted (None: any)."""
    app = ReviewApp(data, csrf or secrets.token_urlsafe(24), lock_wait_s)
    routes = [
        Route("/", app.page),
        Route("/api/queue", app.queue),
        Route("/panel", app.panel),
        Route("/lessons", app.lessons),
        Route("/sample/{sample_id}", app.sample),
        Route("/thumb/{sample_id}/{index:int}", app.image),
        Route("/image/{sample_id}/{index:int}", app.image),
        Route("/api/token", app.token),
        Route("/api/decide", app.decide, methods=["POST"]),
        Route("/api/undo", app.undo, methods=["POST"]),
        Route("/favicon.ico", app.favicon),
        Route("/static/card.css", app.card_css),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    starlette = Starlette(routes=routes)
    starlette.state.review = app
    return Guard(starlette, token, hosts)


def state_of(asgi: ASGIApp) -> ReviewApp:
    """The ReviewApp inside ``create_app``'s result (tests read its csrf token and data)."""
    return asgi.app.state.review  # type: ignore[attr-defined]
