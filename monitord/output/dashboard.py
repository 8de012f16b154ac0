"""A small live web page served by the daemon itself: what it hears, now.

One push channel (server-sent events) carries what the daemon already produces: each window's
level and gate verdict, each scored window's label scores, and every published event. The page
draws level meters, probability bars, a timeline per model and the event list from it; no
widget polls. A try-it panel scores an uploaded file with whatever is loaded, off the live path:
YAMNet's top classes and groups, and CLAP's zero-shot probabilities for typed labels. Loopback only unless a token is set; static files ship in the package.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
from collections import deque
from pathlib import Path
from typing import Any


from monitord.net import split_host_port, url_for_bind

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
CLIENT_QUEUE = 256
RECENT_EVENTS = 200
TRY_MAX_WINDOWS = 30
TRY_MAX_LABELS = 32
TRY_TOP_CLASSES = 10
"""YAMNet classes the try-it panel lists (by their best window)."""
TEXT_CACHE = 8
"""Label sets whose embeddings the try-it panel keeps (a few KB each)."""


def same_origin(request) -> bool:
    """A browser's cross-site POST (a form on another page, even to loopback) is refused: its
    Origin (or Sec-Fetch-Site) says where it came from. Clients that send neither (curl) are no
    browser a page could steer."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


async def read_capped(request, limit: int) -> bytes | None:
    """The request body, or None as soon as it exceeds ``limit`` bytes (never read whole first)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class Broadcaster:
    """Fan-out from daemon threads to the event loop's SSE clients; a slow client loses its oldest messages."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clients: set[asyncio.Queue] = set()
        self.recent_events: deque[dict] = deque(maxlen=RECENT_EVENTS)
        self.latest: dict[str, dict] = {}  # last message per (kind, source[, model]) for new clients

    def push(self, kind: str, data: dict) -> None:
        """Called from any thread."""
        if kind == "event":
            self.recent_events.append(data)
        else:
            self.latest[f"{kind}:{data.get('source')}:{data.get('model_name', '')}"] = data
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._fan_out, kind, data)

    def _fan_out(self, kind: str, data: dict) -> None:
        message = f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
        for queue in list(self.clients):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(message)


class Dashboard:

    @property
    def alive(self) -> bool:
        """Its thread runs (started and not dead): the supervisor's health reads it."""
        return self._thread is not None and self._thread.is_alive()
    def __init__(self, daemon, bind: str, token: str | None, max_upload_mb: float = 20.0) -> None:
        self.daemon = daemon
        self.max_upload_mb = max_upload_mb
        self._text_cache: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._text_lock = threading.Lock()
        self.host, self.port = split_host_port(bind)
        self.token = token
        self.broadcaster = Broadcaster()
        self._server = None
        self._thread: threading.Thread | None = None

    # the daemon's side

    def on_window(self, scored) -> None:
        window = scored.window
        self.broadcaster.push("window", {
            "source": window.source, "stream_start": round(window.stream_start, 3), "stream_end": round(window.stream_end, 3),
            "passed": window.passed, "rms_dbfs": round(max(window.facts.rms_dbfs, -120.0), 1),
            "peak_dbfs": round(max(window.facts.peak_frame_dbfs, -120.0), 1), "speech_ratio": window.facts.speech_ratio,
        })

    def on_event(self, event) -> None:
        data = event.to_dict()
        self.broadcaster.push("scores" if event.kind == "scores" else "event", data)

    # the web side

    def app(self):
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        async def index(request):
            return FileResponse(STATIC / "index.html")

        async def state(request):
            return JSONResponse({
                "sources": [s.id for s in self.daemon.config.sources],
                "source_states": self.source_states(),
                "models": self.model_states(),
                "rules": self.rule_states(),
                "events": list(self.broadcaster.recent_events)[::-1],
                "latest": list(self.broadcaster.latest.values()),
                "try_it": self.try_models(),
            })

        async def events(request):
            queue: asyncio.Queue = asyncio.Queue(CLIENT_QUEUE)
            self.broadcaster.clients.add(queue)

            async def stream():
                try:
                    yield ": connected\n\n"
                    while True:
                        try:
                            yield await asyncio.wait_for(queue.get(), timeout=15)
                        except asyncio.TimeoutError:
                            yield ": keep-alive\n\n"
                finally:
                    self.broadcaster.clients.discard(queue)

            return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

        async def try_it(request):
            if not same_origin(request):
                return JSONResponse({"error": "cross-site request refused"}, status_code=403)
            limit = int(self.max_upload_mb * 2**20)
            body = await read_capped(request, limit)
            if body is None:
                return JSONResponse({"error": f"upload larger than http.max_upload_mb ({self.max_upload_mb:g} MB)"}, status_code=413)

            async def replay():
                return {"type": "http.request", "body": body, "more_body": False}

            from starlette.requests import Request

            form = await Request(request.scope, replay).form()
            upload, labels_text = form.get("file"), str(form.get("labels") or "")
            labels = [x.strip() for x in labels_text.split(",") if x.strip()]
            if upload is None or not hasattr(upload, "read"):
                return JSONResponse({"error": "attach an audio file"}, status_code=400)
            usable = self.try_models()
            if not usable:
                return JSONResponse({"error": "no model that can score an upload is loaded"}, status_code=400)
            has_clap = "clap" in usable.values()
            if labels and has_clap and (len(labels) < 2 or len(set(labels)) != len(labels)):
                return JSONResponse({"error": "type at least two different labels, comma-separated"}, status_code=400)
            if not labels and set(usable.values()) == {"clap"}:
                return JSONResponse({"error": "type at least two different labels, comma-separated"}, status_code=400)
            if len(labels) > TRY_MAX_LABELS:
                return JSONResponse({"error": f"at most {TRY_MAX_LABELS} labels"}, status_code=400)
            data = await upload.read()
            try:
                result = await self.classify_upload(data, labels)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            return JSONResponse(result)

        async def clip(request):
            clips = self.daemon.clips
            name = request.path_params["name"]
            if clips is None or "/" in name or name.startswith("."):
                return Response(status_code=404)
            path = clips.folder / name
            if not path.is_file():
                return Response(status_code=404)
            return FileResponse(path)

        routes = [
            Route("/", index),
            Route("/api/state", state),
            Route("/api/events", events),
            Route("/api/try", try_it, methods=["POST"]),
            Route("/clips/{name}", clip),
            Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
        ]
        middleware = [Middleware(TokenGate, token=self.token)] if self.token else []
        return Starlette(routes=routes, middleware=middleware)

    # what the page shows besides the stream: which models and rules work, and each source's state

    def model_states(self) -> dict[str, dict[str, Any]]:
        """Per configured model: ``active`` (loaded, scoring here), ``remote`` (loaded, scoring on a
        remote backend) or ``inactive`` (not loaded, or built on one that is not), and why."""
        daemon = self.daemon
        inactive = getattr(daemon, "inactive_models", {})
        unavailable = getattr(daemon, "unavailable", {})
        out = {}
        for name, m in daemon.config.models.items():
            model = daemon.models.get(name)
            if name in inactive or model is None:
                reason = unavailable.get(name)
                why = inactive.get(name, "not loaded")
                if reason is not None:
                    why = f"not loaded: {reason.missing or reason}" + (f". Fix: {reason.fix}" if reason.fix else "")
                out[name] = {"kind": m.kind, "state": "inactive", "detail": why, "labels": []}
            else:
                remote = getattr(model, "device", "cpu") == "remote"
                out[name] = {"kind": m.kind, "state": "remote" if remote else "active",
                             "detail": getattr(model, "model_id", ""), "labels": list(getattr(model, "labels", ()))[:64]}
        return out

    def rule_states(self) -> list[dict[str, Any]]:
        inactive = getattr(self.daemon, "inactive_rules", {})
        return [{"id": r.id, "model": r.model, "label": r.label, "threshold": r.threshold,
                 "sources": list(r.sources) if r.sources else None,
                 "active": r.id not in inactive, "detail": inactive.get(r.id, "")} for r in self.daemon.config.rules]

    def source_states(self) -> dict[str, dict[str, str]]:
        """Per source: up / down / ended / starting, and the detail (``waiting for a microphone ...``)."""
        out = {s.id: {"state": "starting", "detail": ""} for s in self.daemon.config.sources}
        for source in getattr(self.daemon, "sources", []):
            state = getattr(source, "state", None)
            value = getattr(state, "value", "")
            connected = getattr(source, "connected", value == "running")
            if getattr(source, "finished", False):
                out[source.id] = {"state": "ended", "detail": "end of stream"}
            elif value in ("running", "degraded") and connected:
                out[source.id] = {"state": "up", "detail": ""}
            elif value in ("running", "degraded", "failed", "stopped"):
                out[source.id] = {"state": "down", "detail": getattr(source, "detail", "") or value}
        return out

    def try_models(self) -> dict[str, str]:
        """What the try-it panel can use: {model name: kind} for loaded local CLAP and YAMNet models."""
        return {name: m.kind for name, m in self.daemon.config.models.items()
                if m.kind in ("clap", "yamnet") and name in self.daemon.models
                and getattr(self.daemon.models[name], "device", "cpu") != "remote"}

    async def classify_upload(self, data: bytes, labels: list[str]) -> dict[str, Any]:
        """What the loaded models make of an uploaded file: YAMNet's top classes and groups (the best
        window's score for each), and CLAP's zero-shot probabilities for typed labels (mean over the
        windows) where a CLAP model is loaded and labels were typed.

        CLAP's label prompts are embedded off the inference thread (the text tower is loaded for it
        and dropped again: only the audio tower stays resident); the audio is scored on the inference
        thread at low priority, when no window is waiting. The live labels are untouched."""
        from monitord.audio import AudioFileError, read_mono
        from monitord.config import GateConfig
        from monitord.windowing.tiling import ModelInput, WindowCutter, window_starts

        usable = self.try_models()
        names = [n for n, kind in usable.items() if kind == "yamnet" or (kind == "clap" and labels)]
        if not names:
            raise ValueError("no loaded model can score this upload (CLAP needs labels)")
        models = {name: self.daemon.models[name] for name in names}
        window = self.daemon.config.window  # only what the first TRY_MAX_WINDOWS windows need (a second to spare)
        seconds = window.seconds + window.hop_s * (TRY_MAX_WINDOWS - 1) + 1.0
        try:
            mono, rate = read_mono(data, max_seconds=seconds)
        except AudioFileError as exc:
            raise ValueError(str(exc).replace("the upload", "upload")) from None
        loop = asyncio.get_running_loop()
        texts = {name: await loop.run_in_executor(None, self._label_embeddings, model, tuple(labels))
                 for name, model in models.items() if usable[name] == "clap"}
        cutter = WindowCutter("try-it", rate, self.daemon.config.window, GateConfig(mode="always"),
                              {name: ModelInput(model.sample_rate) for name, model in models.items()})
        starts = window_starts(len(mono), cutter.length, cutter.hop)[:TRY_MAX_WINDOWS]
        windows = [cutter.cut(mono[s : s + cutter.length], s, 0.0, 0.0) for s in starts]

        def score() -> dict[str, Any]:  # on the inference thread
            return {name: (model.probabilities_with(windows, texts[name]) if name in texts else model.score(windows))
                    for name, model in models.items()}

        scored = await asyncio.wrap_future(self.daemon.score_upload(score))
        spans = [{"stream_start": round(w.stream_start, 3), "stream_end": round(w.stream_end, 3)} for w in windows]
        out: dict[str, Any] = {}
        for name, result in scored.items():
            if name in texts:
                mean = result.mean(axis=0)
                out[name] = {
                    "kind": "clap", "labels": labels,
                    "probabilities": {label: round(float(p), 6) for label, p in zip(labels, mean)},
                    "windows": [{**span, "probabilities": {label: round(float(p), 6) for label, p in zip(labels, row)}}
                                for span, row in zip(spans, result)],
                }
            else:
                model = models[name]
                groups = set(getattr(model, "groups", {}))
                best: dict[str, float] = {}
                for scores in result:
                    for label, p in scores.probabilities.items():
                        best[label] = max(best.get(label, 0.0), float(p))
                classes = sorted((c for c in best if c not in groups), key=best.get, reverse=True)[:TRY_TOP_CLASSES]
                out[name] = {
                    "kind": "yamnet",
                    "top": {c: round(best[c], 6) for c in classes},
                    "groups": {g: round(best[g], 6) for g in sorted(groups, key=best.get, reverse=True)},
                    "windows": [{**span, "top": [label for label, _ in scores.top(3) if label not in groups]}
                                for span, scores in zip(spans, result)],
                }
        note = "" if labels or "clap" not in usable.values() else "type labels to see CLAP's zero-shot probabilities too"
        if labels and "clap" not in usable.values():
            note = "no CLAP model is loaded: the labels were not used"
        return {"models": out, "windows": len(windows), "note": note}

    def _label_embeddings(self, model, labels: tuple[str, ...]):
        key = (model.name, labels)
        with self._text_lock:
            if key not in self._text_cache:
                _, _, embeddings = model.prepare_labels(labels, model.prompt)
                self._text_cache[key] = embeddings
                while len(self._text_cache) > TEXT_CACHE:
                    self._text_cache.pop(next(iter(self._text_cache)))
            return self._text_cache[key]

    @property
    def url(self) -> str:
        """Where a browser finds the page (a wildcard bind: this host's name)."""
        return url_for_bind(f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}")

    def start(self) -> None:
        """Serve in a thread of its own; OSError when the address cannot be bound."""
        import socket

        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        config = uvicorn.Config(self.app(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._socket = sock
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self.broadcaster.loop = loop
            ready.set()
            loop.run_until_complete(self._server.serve(sockets=[self._socket]))
            loop.close()

        self._thread = threading.Thread(target=run, name="dashboard", daemon=True)
        self._thread.start()
        ready.wait(5)
        log.info("dashboard on %s", self.url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(5)
            self._server = None
            self._socket.close()


class TokenGate:
    """Every request needs the token: ``?token=...`` or ``Authorization: Bearer ...``."""

    def __init__(self, app, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            from starlette.requests import Request
            from starlette.responses import PlainTextResponse

            request = Request(scope)
            given = request.query_params.get("token") or request.headers.get("authorization", "").removeprefix("Bearer ")
            if not secrets.compare_digest((given or "").encode("utf-8", "surrogateescape"), self.token.encode("utf-8")):
                await PlainTextResponse("a token is required", status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)

