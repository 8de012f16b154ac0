"""A small live web page served by the daemon itself: what it hears, now.

One push channel (server-sent events) carries what the daemon already produces: each window's
level and gate verdict, each scored window's label scores, and every published event. The page
draws level meters, probability bars, a timeline per model and the event list from it; no
widget polls. A try-it panel scores an uploaded file with whatever is loaded, off the live path:
YAMNet's top classes and groups, and CLAP's zero-shot probabilities for typed labels. Loopback only unless a token is set; static files ship in the package.

Each alert onset in the event list has "not this" / "yes, this" buttons (``POST /api/feedback``,
``monitord.teaching.feedback``): the window is taught to the rule's ``not_like`` bank at once.

A loopback dashboard answers only requests whose ``Host`` is a loopback name or one of
``http.allowed_hosts`` (a DNS-rebinding page cannot read it), and ``/healthz`` answers probes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
import tempfile
import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse  # the web extra: http.bind needs it

from monitord.net import host_allowed, host_name, is_loopback, split_host_port, url_for_bind

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


class JsonResponse(JSONResponse):
    """Starlette's JSONResponse, with text UTF-8 cannot hold escaped instead of a 500: a lone
    surrogate, as Python keeps a file name's undecodable bytes, in one event of the list kept
    /api/state failing until 200 more events pushed it out."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
        return text.encode("utf-8", "backslashreplace")  # inside a JSON string, \udcff is that character's escape
CLIENT_QUEUE = 256
RECENT_EVENTS = 200
TRY_MAX_WINDOWS = 30
TRY_MAX_LABELS = 32
TRY_TOP_CLASSES = 10
"""YAMNet classes the try-it panel lists (from the window heard)."""
TRY_MAX_IN_FLIGHT = 2
"""Try-it requests at once (the page sends one at a time); more are answered 429 before their body
is read: a client holding many open would hold their spooled bodies, memory and disk, together."""
TRY_BODY_TIMEOUT_S = 120.0
"""A try-it upload's whole body must come within this (20 MB at 170 KB/s): one trickled slowly
would hold one of the TRY_MAX_IN_FLIGHT places for as long as its client liked."""
FEEDBACK_BODY_TIMEOUT_S = 10.0
"""A feedback request (under 1 KB) must arrive within this."""
TEXT_CACHE = 8
"""Label sets whose embeddings the try-it panel keeps (a few KB each)."""
TRY_MAX_SAMPLES = TRY_MAX_WINDOWS * 2 * 48000
"""Samples (at the models' highest rate) all try-it windows may hold together: 30 default windows,
fewer where window.seconds is longer (11 MB of float32)."""
DECODE_BLOCK_SAMPLES = 1 << 18
"""Samples (all channels together) decoded per read: 1 MiB of float32, whatever the channel count."""
SPOOL_IN_MEMORY = 1 << 20
"""An upload body beyond this goes to a temporary file while it is read."""


def source_rate_bounds() -> tuple[int, int]:
    """The sample rates ``sources.sample_rate`` accepts (the try-it panel accepts the same)."""
    from monitord.config.schema import SourceConfig

    metadata = SourceConfig.model_fields["sample_rate"].metadata
    return (next(int(m.ge) for m in metadata if getattr(m, "ge", None) is not None),
            next(int(m.le) for m in metadata if getattr(m, "le", None) is not None))


def decode_upload(file: IO[bytes], max_seconds: float, max_rate: int) -> tuple[np.ndarray, int]:
    """The first ``max_seconds`` of an uploaded file as mono float32 at ``min(its rate, max_rate)``.

    Read a block at a time, mixed down and resampled as it comes, so what it costs depends on
    ``max_seconds`` and ``max_rate``, not on what the header claims (rate, channels, length).
    ValueError (a message for the user) where it cannot be read or its rate is out of range."""
    import soundfile as sf
    import soxr

    from monitord.audio import to_mono

    low, high = source_rate_bounds()
    parts: list[np.ndarray] = []
    try:
        with sf.SoundFile(file) as f:
            rate, channels = int(f.samplerate), int(f.channels)
            if not low <= rate <= high:
                raise ValueError(f"the upload's sample rate, {rate} Hz, is outside {low}-{high} Hz")
            out_rate = min(rate, max_rate)
            stream = soxr.ResampleStream(rate, out_rate, 1, dtype="float32", quality="HQ") if out_rate != rate else None
            block, left = max(1, DECODE_BLOCK_SAMPLES // channels), math.ceil(max_seconds * rate)
            while left > 0:
                frames = f.read(min(block, left), dtype="float32", always_2d=True)
                if not len(frames):
                    break
                left -= len(frames)
                mono = np.array(to_mono(frames), dtype=np.float32)  # its own copy: the block goes
                parts.append(stream.resample_chunk(mono) if stream is not None else mono)
            if stream is not None and parts:
                parts.append(stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    except (RuntimeError, sf.LibsndfileError, TypeError) as exc:
        reason = re.sub(r"^Error opening <[^>]*>: ", "", str(exc))  # not the temporary file's repr
        raise ValueError(f"cannot read the upload as audio: {reason}") from None
    samples = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    if not len(samples):
        raise ValueError("the upload holds no samples")
    return samples, out_rate


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


async def body_or_refusal(request, limit: int, timeout_s: float, late: str, too_large: str):
    """(the body, spooled, None) or (None, the 408 or 413 answer): ``late`` names what did not arrive
    in time, ``too_large`` says what the limit is."""
    try:
        body = await read_capped(request, limit, timeout_s)
    except asyncio.TimeoutError:
        return None, JsonResponse({"error": f"{late} did not arrive within {timeout_s:g} s"}, status_code=408)
    if body is None:
        return None, JsonResponse({"error": too_large}, status_code=413)
    return body, None


async def read_capped(request, limit: int, timeout_s: float | None = None) -> IO[bytes] | None:
    """The request body in a temporary file (memory up to SPOOL_IN_MEMORY), or None as soon as it
    exceeds ``limit`` bytes (never read whole first). asyncio.TimeoutError where ``timeout_s`` is
    given and the whole body has not come by then (a client trickling it holds its place)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and (len(declared.lstrip("0")) > 18 or int(declared) > limit):
        return None
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)

    async def fill() -> bool:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return False
            spool.write(chunk)
        return True

    try:
        complete = await asyncio.wait_for(fill(), timeout_s)
    except BaseException:
        spool.close()
        raise
    if not complete:
        spool.close()
        return None
    spool.seek(0)
    return spool


def parse_form(scope, body: IO[bytes]):
    """The multipart form in ``body``, parsed as if it came from the client (files spooled to disk).
    Called in a worker thread (an event loop of its own): parsing 20 MB takes the dashboard's loop
    long enough to delay every other request."""
    from starlette.requests import Request

    async def replay():
        chunk = body.read(1 << 16)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunk)}

    async def parse():
        return await Request(scope, replay).form(max_files=1, max_fields=4)

    return asyncio.run(parse())


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

    def close(self) -> None:
        """End every client's stream (an open page would hold the server's graceful stop for ever)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._put_all, None)

    def _put_all(self, message: str | None) -> None:
        for queue in list(self.clients):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(message)

    def _fan_out(self, kind: str, data: dict) -> None:
        self._put_all(f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n")


class Handlers:
    """The dashboard's HTTP handlers, one method a route (``Dashboard.app`` lists them)."""

    def __init__(self, dashboard: "Dashboard") -> None:
        self.dashboard = dashboard

    async def index(self, request):
        return FileResponse(STATIC / "index.html")

    async def favicon(self, request):  # what a browser asks for before it reads the page's <link rel=icon>
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    async def state(self, request):
        availability = self.dashboard.daemon.availability  # read once: the models and the rules of one state
        return JsonResponse({
            "sources": [s.id for s in self.dashboard.daemon.config.sources],
            "source_states": self.dashboard.source_states(),
            "models": self.dashboard.model_states(availability),
            "rules": self.dashboard.rule_states(availability),
            "events": list(self.dashboard.broadcaster.recent_events)[::-1],
            "latest": list(self.dashboard.broadcaster.latest.values()),
            "try_it": self.dashboard.try_models(availability),
        })

    async def events(self, request):
        queue: asyncio.Queue = asyncio.Queue(CLIENT_QUEUE)
        self.dashboard.broadcaster.clients.add(queue)

        async def stream():
            try:
                yield ": connected\n\n"
                while True:
                    try:
                        message = await asyncio.wait_for(queue.get(), timeout=15)
                    except asyncio.TimeoutError:
                        message = ": keep-alive\n\n"
                    if message is None:  # the dashboard stops: the response ends, and the server with it
                        return
                    yield message
            finally:
                self.dashboard.broadcaster.clients.discard(queue)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    async def healthz(self, request):
        report = self.dashboard.health_report()
        return JsonResponse(report, status_code=200 if report["healthy"] else 503, headers={"Cache-Control": "no-store"})

    async def try_it(self, request):
        if not same_origin(request):
            return JsonResponse({"error": "cross-site request refused"}, status_code=403)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return JsonResponse({"error": "send the file as multipart/form-data"}, status_code=415)
        if self.dashboard._uploads >= TRY_MAX_IN_FLIGHT:  # each holds memory and a temporary file while it waits its turn
            return JsonResponse({"error": "other uploads are being scored: try again in a moment"}, status_code=429,
                                headers={"Retry-After": "5"})
        self.dashboard._uploads += 1
        try:
            return await self.spool_and_answer(request)
        finally:
            self.dashboard._uploads -= 1

    async def spool_and_answer(self, request):
        body, refusal = await body_or_refusal(request, int(self.dashboard.max_upload_mb * 2**20), TRY_BODY_TIMEOUT_S, "the upload",
                                              f"upload larger than http.max_upload_mb ({self.dashboard.max_upload_mb:g} MB)")
        if refusal is not None:
            return refusal
        with body:
            form = await asyncio.get_running_loop().run_in_executor(self.dashboard._upload_thread, parse_form, request.scope, body)
        try:
            return await self.answer_upload(form)
        finally:
            await form.close()

    async def answer_upload(self, form):
        upload, labels_text = form.get("file"), str(form.get("labels") or "")
        labels = [x.strip() for x in labels_text.split(",") if x.strip()]
        if upload is None or not hasattr(upload, "read"):
            return JsonResponse({"error": "attach an audio file"}, status_code=400)
        state = self.dashboard.daemon.availability  # the models checked here are the models that score
        usable = self.dashboard.try_models(state)
        if not usable:
            return JsonResponse({"error": "no model that can score an upload is loaded"}, status_code=400)
        has_clap = "clap" in usable.values()
        if labels and has_clap and (len(labels) < 2 or len(set(labels)) != len(labels)):
            return JsonResponse({"error": "type at least two different labels, comma-separated"}, status_code=400)
        if not labels and set(usable.values()) == {"clap"}:
            return JsonResponse({"error": "type at least two different labels, comma-separated"}, status_code=400)
        if len(labels) > TRY_MAX_LABELS:
            return JsonResponse({"error": f"at most {TRY_MAX_LABELS} labels"}, status_code=400)
        try:
            async with self.dashboard._try_lock:
                result = await self.dashboard.classify_upload(upload.file, labels, state)
        except ValueError as exc:
            return JsonResponse({"error": str(exc)}, status_code=400)
        return JsonResponse(result)

    async def feedback(self, request):
        from monitord.teaching.feedback import MAX_REQUEST_BYTES, FeedbackError, parse_request

        if not same_origin(request):
            return JsonResponse({"error": "cross-site request refused"}, status_code=403)
        body, refusal = await body_or_refusal(request, MAX_REQUEST_BYTES, FEEDBACK_BODY_TIMEOUT_S, "the request",
                                              f"a feedback request is at most {MAX_REQUEST_BYTES} bytes")
        if refusal is not None:
            return refusal
        with body:
            data = body.read()
        try:
            seq, verdict = parse_request(data)
            async with self.dashboard._feedback_lock:  # one at a time: each waits for the inference thread once
                result = await asyncio.get_running_loop().run_in_executor(None, self.dashboard.daemon.feedback, seq, verdict, "dashboard")
        except FeedbackError as exc:
            return JsonResponse({"error": str(exc)}, status_code=exc.status)
        return JsonResponse(result)

    async def clip(self, request):
        clips = self.dashboard.daemon.clips
        name = request.path_params["name"]
        if clips is None or "/" in name or name.startswith("."):
            return Response(status_code=404)
        path = clips.folder / name
        if not path.is_file():
            return Response(status_code=404)
        return FileResponse(path)


class Dashboard:

    @property
    def alive(self) -> bool:
        """Its thread runs (started and not dead): the supervisor's health reads it."""
        return self._thread is not None and self._thread.is_alive()
    def __init__(self, daemon, bind: str, token: str | None, max_upload_mb: float = 20.0,
                 allowed_hosts: Iterable[str] = ()) -> None:
        self.daemon = daemon
        self.max_upload_mb = max_upload_mb
        self._feedback_lock = asyncio.Lock()
        self._uploads = 0
        """Try-it requests being read, parsed or scored (on the event loop's thread only)."""
        self._try_lock = asyncio.Lock()  # one upload decoded and scored at a time: one request's memory bound holds
        self._upload_thread = ThreadPoolExecutor(1, thread_name_prefix="try-it")
        """Parses and decodes uploads: always the same thread, so the memory one upload freed (its
        allocator arena) is what the next one reuses, instead of a new arena per pool thread."""
        self._text_cache: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._text_lock = threading.Lock()
        self.host, self.port = split_host_port(bind)
        self.token = token
        allowed_hosts = tuple(allowed_hosts)
        names = {host_name(h) for h in allowed_hosts}
        if self.host not in ("0.0.0.0", "::", ""):
            names.add(host_name(f"[{self.host}]" if ":" in self.host else self.host))
        self.allowed_hosts = frozenset(n for n in names if n is not None)
        self.check_host = is_loopback(self.host) or bool(allowed_hosts)
        """A loopback dashboard always checks Host; another one where allowed_hosts is set (its token guards it)."""
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
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        handlers = Handlers(self)
        routes = [
            Route("/", handlers.index),
            Route("/favicon.ico", handlers.favicon),
            Route("/api/state", handlers.state),
            Route("/api/events", handlers.events),
            Route("/api/try", handlers.try_it, methods=["POST"]),
            Route("/api/feedback", handlers.feedback, methods=["POST"]),
            Route("/clips/{name}", handlers.clip),
            Route("/healthz", handlers.healthz),
            Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
        ]
        middleware = [Middleware(TokenGate, token=self.token)] if self.token else []
        if self.check_host:
            middleware.append(Middleware(HostGate, allowed=self.allowed_hosts))
        return Starlette(routes=routes, middleware=middleware)

    def health_report(self) -> dict[str, Any]:
        """The daemon's own health, per stage (and the threads the output stage relies on):
        ``healthy`` only while every one is, ``unhealthy`` naming those that are not."""
        daemon = self.daemon
        health = daemon.health()
        states = {stage.name: stage.state.value for stage in getattr(daemon, "stages", [])}
        stages = {name: {"ok": h.ok, "state": states.get(name, "running" if h.ok else "not running"), "detail": h.reason}
                  for name, h in health.items()}
        unhealthy = sorted(name for name, h in health.items() if not h.ok)
        fatal = getattr(daemon, "fatal", None)
        return {"healthy": not unhealthy and fatal is None, "unhealthy": unhealthy, "fatal": fatal, "stages": stages}

    # what the page shows besides the stream: which models and rules work, and each source's state

    def model_states(self, availability: Any = None) -> dict[str, dict[str, Any]]:
        """Per configured model: ``active`` (loaded, scoring here), ``remote`` (loaded, scoring on a
        remote backend), ``loading`` (an optional model loading in the background after the start, or
        built on one) or ``inactive`` (not loaded, or built on one that is not), and why."""
        state = availability or self.daemon.availability
        out = {}
        for name, m in state.config.models.items():
            model = state.models.get(name)
            if name in state.inactive_models or model is None:
                reason = state.unavailable.get(name)
                why = state.inactive_models.get(name, "not loaded")
                if reason is not None:
                    why = f"not loaded: {reason.missing or reason}" + (f". Fix: {reason.fix}" if reason.fix else "")
                out[name] = {"kind": m.kind, "state": "loading" if name in state.loading_models else "inactive",
                             "detail": why, "labels": []}
            else:
                remote = getattr(model, "device", "cpu") == "remote"
                out[name] = {"kind": m.kind, "state": "remote" if remote else "active",
                             "detail": getattr(model, "model_id", ""), "labels": list(getattr(model, "labels", ()))[:64]}
        return out

    def rule_states(self, availability: Any = None) -> list[dict[str, Any]]:
        """Per rule: ``active``, and ``state``: active, loading (its model loads in the background) or inactive."""
        state = availability or self.daemon.availability
        inactive = state.inactive_rules
        return [{"id": r.id, "model": r.model, "label": r.label, "threshold": r.threshold,
                 "sources": list(r.sources) if r.sources else None, "active": r.id not in inactive,
                 "state": "active" if r.id not in inactive else "loading" if r.id in state.loading_rules else "inactive",
                 "detail": inactive.get(r.id, "")} for r in state.config.rules]

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

    def try_models(self, availability: Any = None) -> dict[str, str]:
        """What the try-it panel can use: {model name: kind} for loaded local CLAP and YAMNet models."""
        state = availability or self.daemon.availability
        return {name: m.kind for name, m in state.config.models.items()
                if m.kind in ("clap", "yamnet") and name in state.models
                and getattr(state.models[name], "device", "cpu") != "remote"}

    async def classify_upload(self, data: bytes | IO[bytes], labels: list[str], availability: Any = None) -> dict[str, Any]:
        """What the loaded models make of an uploaded file: YAMNet's top classes and groups and,
        where a CLAP model is loaded and labels were typed, CLAP's zero-shot probabilities, all from
        the window the recording is heard in (the loudest; see ``heard_window``), with every
        window's own figures beside them.

        Decoding and cutting run off the event loop, and cost what TRY_MAX_SAMPLES allows whatever
        the file's header claims. CLAP's label prompts are embedded off the inference thread (the
        text tower is loaded for it and dropped again: only the audio tower stays resident); the
        audio is scored on the inference thread at low priority, when no window is waiting. The
        live labels are untouched."""
        import io

        state = availability or self.daemon.availability  # read once: the models offered are the models used
        usable = self.try_models(state)
        names = [n for n, kind in usable.items() if kind == "yamnet" or (kind == "clap" and labels)]
        if not names:
            raise ValueError("no loaded model can score this upload (CLAP needs labels)")
        models = {name: state.models[name] for name in names}
        file = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        loop = asyncio.get_running_loop()
        windows = await loop.run_in_executor(self._upload_thread, self._cut_upload, file, models)
        texts = {name: await loop.run_in_executor(None, self._label_embeddings, model, tuple(labels))
                 for name, model in models.items() if usable[name] == "clap"}

        def score() -> dict[str, Any]:  # on the inference thread, in the live path's batch sizes (and memory)
            return {name: in_batches(partial(clap_probabilities, model, texts[name]) if name in texts else model.score,
                                     windows, self._batch_max(name))
                    for name, model in models.items()}

        scored = await asyncio.wrap_future(self.daemon.score_upload(score))
        heard = heard_window(windows)
        spans = [{"stream_start": round(w.stream_start, 3), "stream_end": round(w.stream_end, 3)} for w in windows]
        out = {name: (clap_result(labels, result, spans, heard) if name in texts
                      else yamnet_result(models[name], result, spans, heard)) for name, result in scored.items()}
        note = "" if labels or "clap" not in usable.values() else "type labels to see CLAP's zero-shot probabilities too"
        if labels and "clap" not in usable.values():
            note = "no CLAP model is loaded: the labels were not used"
        return {"models": out, "windows": len(windows), "heard": heard, "note": note}

    def _batch_max(self, name: str) -> int:
        config = getattr(self.daemon.config, "models", {}).get(name)
        return max(1, int(getattr(config, "batch_max", TRY_MAX_WINDOWS)))

    def _cut_upload(self, file: IO[bytes], models: dict[str, Any]) -> list:
        """The upload's first windows (at most TRY_MAX_WINDOWS, and TRY_MAX_SAMPLES together), cut
        as the live path cuts them; in a worker thread."""
        from monitord.config import GateConfig
        from monitord.windowing.tiling import ModelInput, WindowCutter, window_starts

        window = self.daemon.config.window
        max_rate = max(int(model.sample_rate) for model in models.values())
        count = max(1, min(TRY_MAX_WINDOWS, TRY_MAX_SAMPLES // max(1, round(window.seconds * max_rate))))
        seconds = window.seconds + window.hop_s * (count - 1) + 1.0  # a second to spare
        mono, rate = decode_upload(file, seconds, max_rate)
        cutter = WindowCutter("try-it", rate, window, GateConfig(mode="always"),
                              {name: ModelInput(model.sample_rate) for name, model in models.items()})
        starts = window_starts(len(mono), cutter.length, cutter.hop)[:count]
        return [cutter.cut(mono[s : s + cutter.length], s, 0.0, 0.0) for s in starts]

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
        config = uvicorn.Config(self.app(), http=guarded_h11(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._socket = sock
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self.broadcaster.loop = loop
            ready.set()
            try:
                loop.run_until_complete(self._server.serve(sockets=[self._socket]))
            except BaseException:  # noqa: BLE001 - uvicorn exits with SystemExit too; /healthz names the dead thread
                log.exception("dashboard: its server stopped")
            finally:  # a server that raised (or exited) too: pushes must not pile up on a loop nobody runs
                self.broadcaster.loop = None
                loop.close()

        self._thread = threading.Thread(target=run, name="dashboard", daemon=True)
        self._thread.start()
        ready.wait(5)
        log.info("dashboard on %s", self.url)

    def stop(self) -> None:
        if self._server is not None:
            self.broadcaster.close()
            self._server.should_exit = True
            self._thread.join(5)
            if self._thread.is_alive():
                log.warning("dashboard: its server did not stop within 5 s")
            self._server = None
            self._socket.close()
        self._upload_thread.shutdown(wait=False)


def clap_probabilities(model, text_embeddings, windows: list):
    return model.probabilities_with(windows, text_embeddings)


def in_batches(score, windows: list, size: int):
    """``score(windows)`` a batch of at most ``size`` at a time (the sizes, and so the memory, the live
    path uses), joined: one array (CLAP's probabilities) or one list (Scores)."""
    parts = [score(windows[i : i + size]) for i in range(0, len(windows), size)]
    return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else [x for part in parts for x in part]


def heard_window(windows: list) -> dict[str, Any]:
    """The window the panel ranks classes by: the loudest (highest RMS). A class's best score over
    all windows would rank "Silence" first for speech with pauses around it; the loudest window
    is the one a listener would say the recording is about."""
    index = max(range(len(windows)), key=lambda i: windows[i].facts.rms_dbfs)
    w = windows[index]
    return {"index": index, "stream_start": round(w.stream_start, 3), "stream_end": round(w.stream_end, 3),
            "rms_dbfs": round(max(w.facts.rms_dbfs, -120.0), 1), "why": "loudest"}


def clap_result(labels: list[str], result, spans: list[dict], heard: dict[str, Any]) -> dict[str, Any]:
    def probabilities(row) -> dict[str, float]:
        return {label: round(float(p), 6) for label, p in zip(labels, row)}

    return {"kind": "clap", "labels": labels, "heard": heard, "probabilities": probabilities(result[heard["index"]]),
            "windows": [{**span, "probabilities": probabilities(row)} for span, row in zip(spans, result)]}


def yamnet_result(model, result, spans: list[dict], heard: dict[str, Any]) -> dict[str, Any]:
    groups = set(getattr(model, "groups", {}))
    scores = {label: float(p) for label, p in result[heard["index"]].probabilities.items()}
    classes = sorted((c for c in scores if c not in groups), key=scores.get, reverse=True)[:TRY_TOP_CLASSES]
    return {"kind": "yamnet", "heard": heard,
            "top": {c: round(scores[c], 6) for c in classes},
            "groups": {g: round(scores.get(g, 0.0), 6) for g in sorted(groups, key=lambda g: scores.get(g, 0.0), reverse=True)},
            "windows": [{**span, "top": [label for label, _ in window.top(3) if label not in groups]}
                        for span, window in zip(spans, result)]}


class HostGate:
    """Only requests whose ``Host`` names this machine's loopback interface, or a name in
    http.allowed_hosts, get through: a page whose own name an attacker re-points at 127.0.0.1 (DNS
    rebinding) sends its own name as Host, and gets 421 on every route."""

    def __init__(self, app, allowed: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            hosts = [value for key, value in scope["headers"] if key == b"host"]
            if len(hosts) != 1 or not host_allowed(hosts[0].decode("latin-1"), self.allowed):
                from starlette.responses import PlainTextResponse

                log.debug("refused Host %r on %s", hosts, scope.get("path"))
                await PlainTextResponse("this dashboard answers only to loopback host names and http.allowed_hosts",
                                        status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class TokenGate:
    """Every request needs the token: ``?token=...`` or ``Authorization: Bearer ...``; except the
    page's own script, stylesheet and icon, which the browser fetches without it and which hold
    nothing but what ships in the package."""

    def __init__(self, app, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not (scope["method"] in ("GET", "HEAD") and (scope["path"].startswith("/static/")
                                                                                or scope["path"] == "/favicon.ico")):
            from starlette.requests import Request
            from starlette.responses import PlainTextResponse

            request = Request(scope)
            given = request.query_params.get("token") or request.headers.get("authorization", "").removeprefix("Bearer ")
            if not secrets.compare_digest((given or "").encode("utf-8", "surrogateescape"), self.token.encode("utf-8")):
                await PlainTextResponse("a token is required", status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def guarded_h11() -> type:
    """uvicorn's h11 protocol, whose request head is capped at 16 KB (httptools, uvicorn's default,
    kept every header line: 382 MB of them took the process to 441 MB, before any token was
    checked), with two guards: a connection that has not sent a whole request head within
    REQUEST_HEAD_S of its start or of its last answer (nor, within TRY_BODY_TIMEOUT_S of the answer,
    the rest of a body the answer did not wait for) is closed, and one past MAX_HTTP_CONNECTIONS is
    closed as it comes."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from monitord import net

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > net.MAX_HTTP_CONNECTIONS:
                log.warning("dashboard: %d connections open; one more closed", net.MAX_HTTP_CONNECTIONS)
                transport.close()
                return
            self._wait_for_head()

        def _wait_for_head(self, seconds: float | None = None) -> None:
            # uvicorn's own keep-alive timer is cancelled by any byte received: no bound on a slow head
            self._head_timer = self.loop.call_later(net.REQUEST_HEAD_S if seconds is None else seconds, self._head_late)

        def _head_late(self) -> None:
            no_head = self.conn.their_state is h11.IDLE
            # answered (a 401, a 405) without reading a body that is still coming: nothing waits for it
            unread_body = self.conn.our_state in (h11.DONE, h11.MUST_CLOSE) and self.conn.their_state is not h11.DONE
            if (no_head or unread_body) and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._head_timer is not None:
                self._head_timer.cancel()
            if not self.transport.is_closing():
                # a body still coming after an early answer (a 413, 429, 401) gets the time an
                # upload's body gets: a client on a slow link sends it all before it reads the answer
                unread_body = self.conn.their_state is h11.SEND_BODY
                self._wait_for_head(TRY_BODY_TIMEOUT_S if unread_body else None)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol
