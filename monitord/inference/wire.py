"""The wire format between capture nodes and the inference application: versioned, bounded, no pickle.

Every body, request or response, is one frame::

    offset  size  field
    0       4     magic b"MNTD"
    4       2     version, u16 little-endian (1)
    6       2     kind, u16 LE: 1 = score request, 2 = scores response
    8       4     header length H, u32 LE, at most 1 MiB
    12      H     header: one UTF-8 JSON object (no NaN/Infinity)
    12+H    ...   payload: the little-endian arrays the header describes, and nothing after them

Request, ``POST {route}/v1/score`` (``Content-Type: application/x-monitord``, ``Authorization: Bearer TOKEN``)::

    {"request_id": "node-1-4242-a1b2c3:clap:kitchen@96000+8:5f0c9e21",   # made of the window ids
     "attempt": 1, "model": "clap", "fingerprint": "sha256:...", "pcm": "float32" | "int16",
     "sample_rate": 48000,            # the model's rate: the capture node resamples, as it does locally
     "windows": [{"source": "kitchen", "start_index": 96000, "source_rate": 48000,
                  "samples": 96000, "valid": 96000,  # samples in the payload; of them real sound (rest: padding)
                  "wall_start": 1764000000.25, "ready_at": 1764000002.31}, ...]}

    payload: each window's PCM in header order, ``samples`` values each: float32, or int16
             (``round(x * 32767)``, clipped to [-1, 1] first).

Response, 200::

    {"request_id": "...", "model": "clap", "labels": ["glass breaking", ...],
     "windows": [["kitchen", 96000], ...],      # the request's window ids, in its order
     "embedding_dim": 512,                      # 0 when the model gives no embeddings
     "batch_sizes": [8, 8, ...],                # per window: windows in the forward pass that scored it
     "replica": "...", "replayed": false,       # replayed: a retry answered from the replica's memory
     "server_ms": 41.2, "forward_ms": 35.0}     # time in the replica's service; its longest forward pass

    payload: float64 probabilities (windows x labels, row-major), then float32 embeddings
             (windows x embedding_dim).

Probabilities travel as float64, so a remote score is bit-for-bit the Python float the model
returned. Errors are a JSON object ``{"error": "..."}``: 400 malformed (wrong version, truncated,
bad sample rate...), 401 token, 404 model not served here, 409 fingerprint mismatch, 413
length, and 500 with the header ``X-Monitord-Error: model`` when the model failed on the batch.
Any other 5xx, or a dropped connection, is the cluster's (a replica died, the proxy is
restarting) and is retried by the capture node with the same request id.

A model's *fingerprint* is a digest of the part of its config entry that changes scores (kind,
model name, labels, prompt, label_map, groups, pool, class names...); the server refuses a
request whose fingerprint is not its own, so a capture node never gets scores for other labels.
The model is compared by name (the last part of its hub id or path), not by its weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import numpy as np

from monitord.classmap import yamnet_class_names
from monitord.secrets import MIN_TOKEN_CHARS, TokenFileError, read_token  # noqa: F401 (re-exported: wire.read_token)

MAGIC = b"MNTD"
VERSION = 1
KIND_REQUEST = 1
KIND_RESPONSE = 2
CONTENT_TYPE = "application/x-monitord"
ERROR_HEADER = "X-Monitord-Error"
"""Set to ``model`` on a 500 the model caused (not retried); any other 5xx is the cluster's."""

_PREAMBLE = struct.Struct("<4sHHI")
MAX_HEADER_BYTES = 1 << 20
MAX_WINDOWS = 4096
MAX_WINDOW_SECONDS = 60.0
MAX_SOURCE_CHARS = 64
MAX_ID_CHARS = 512
MAX_LABELS = 100_000
MAX_EMBEDDING_DIM = 65_536
SAMPLE_RATES = range(1000, 384_001)
PCM_TYPES = {"float32": np.dtype("<f4"), "int16": np.dtype("<i2")}
INT16_SCALE = 32767.0

DEFAULT_SAMPLE_RATES = {"clap": 48000, "emotion": 16000, "yamnet": 16000}
"""The rate of each kind's usual checkpoints: used by a capture node that cannot ask the server at start."""

NOT_SCORE_AFFECTING = frozenset({"batch_max", "batch_wait_ms", "gated_by", "gate", "device", "dtype", "engine", "threads"})


class WireError(ValueError):
    """A body that is not a valid frame; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class WindowMeta:
    """What the server needs to know of a window besides its samples."""

    source: str
    start_index: int
    """First sample's index in the source's stream, at ``source_rate``: with ``source``, the window's id."""
    source_rate: int
    valid: int
    """Samples of real sound at the request's sample rate (the rest is end-of-file padding)."""
    wall_start: float
    ready_at: float

    @property
    def id(self) -> tuple[str, int]:
        return (self.source, self.start_index)


@dataclass(frozen=True, eq=False)
class ScoreRequest:
    request_id: str
    model: str
    fingerprint: str
    sample_rate: int
    windows: tuple[WindowMeta, ...]
    audio: tuple[np.ndarray, ...]
    """Mono float32 per window, at ``sample_rate``."""
    pcm: str = "float32"
    attempt: int = 1


@dataclass(frozen=True, eq=False)
class ScoreResponse:
    request_id: str
    model: str
    labels: tuple[str, ...]
    windows: tuple[tuple[str, int], ...]
    probabilities: np.ndarray
    """(windows, labels) float64."""
    embeddings: np.ndarray | None
    """(windows, dim) float32, or None."""
    batch_sizes: tuple[int, ...]
    replica: str = ""
    replayed: bool = False
    server_ms: float = 0.0
    """Time the request spent in the replica's service, from parsing to the answer (queueing included)."""
    forward_ms: float = 0.0
    """The longest forward pass this request's windows were in."""


# frames


def _frame(kind: int, header: dict[str, Any], payload: Sequence[bytes]) -> bytes:
    head = json.dumps(header, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode("utf-8")
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    return b"".join([_PREAMBLE.pack(MAGIC, VERSION, kind, len(head)), head, *payload])


def _reject_constant(name: str) -> float:
    raise WireError(f"header holds {name}: numbers must be finite")


def _unframe(body: bytes, kind: int, max_bytes: int | None = None) -> tuple[dict[str, Any], memoryview]:
    if max_bytes is not None and len(body) > max_bytes:
        raise WireError(f"body of {len(body)} bytes exceeds the limit of {max_bytes}", 413)
    if len(body) < _PREAMBLE.size:
        raise WireError(f"truncated body: {len(body)} bytes, a frame starts with {_PREAMBLE.size}")
    magic, version, got_kind, head_len = _PREAMBLE.unpack_from(body)
    if magic != MAGIC:
        raise WireError("not a monitord frame (bad magic)")
    if version != VERSION:
        raise WireError(f"wire version {version} is not supported (this side speaks version {VERSION})")
    if got_kind != kind:
        raise WireError(f"frame kind {got_kind} where {kind} was expected")
    if head_len > MAX_HEADER_BYTES:
        raise WireError(f"header length {head_len} exceeds {MAX_HEADER_BYTES}")
    end = _PREAMBLE.size + head_len
    if len(body) < end:
        raise WireError(f"truncated body: the header needs {head_len} bytes, {len(body) - _PREAMBLE.size} follow")
    try:
        header = json.loads(bytes(body[_PREAMBLE.size:end]).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header must be a JSON object")
    return header, memoryview(body)[end:]


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise WireError(f"{where}.{key} is missing")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise WireError(f"{where}.{key} must be {names}, not {type(value).__name__}")
    return value


def _int(obj: dict[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = _get(obj, key, int, where)
    if not low <= value <= high:
        raise WireError(f"{where}.{key} = {value} is outside [{low}, {high}]")
    return value


def _text(obj: dict[str, Any], key: str, where: str, max_chars: int) -> str:
    value = _get(obj, key, str, where)
    if not value or len(value) > max_chars:
        raise WireError(f"{where}.{key} must be 1 to {max_chars} characters")
    return value


def _time(obj: dict[str, Any], key: str, where: str) -> float:
    value = float(_get(obj, key, (int, float), where))
    if not math.isfinite(value):
        raise WireError(f"{where}.{key} must be finite")
    return value


def max_samples(sample_rate: int) -> int:
    return math.ceil(MAX_WINDOW_SECONDS * sample_rate) + 1


# requests


def encode_request(request: ScoreRequest) -> bytes:
    dtype = PCM_TYPES[request.pcm]
    chunks = []
    metas = []
    for meta, samples in zip(request.windows, request.audio, strict=True):
        samples = np.asarray(samples, dtype=np.float32)
        if request.pcm == "int16":
            chunks.append(np.round(np.clip(samples, -1.0, 1.0) * INT16_SCALE).astype(dtype).tobytes())
        else:
            chunks.append(samples.astype(dtype, copy=False).tobytes())
        metas.append({"source": meta.source, "start_index": meta.start_index, "source_rate": meta.source_rate,
                      "samples": len(samples), "valid": meta.valid, "wall_start": meta.wall_start, "ready_at": meta.ready_at})
    header = {"request_id": request.request_id, "attempt": request.attempt, "model": request.model,
              "fingerprint": request.fingerprint, "pcm": request.pcm, "sample_rate": request.sample_rate, "windows": metas}
    return _frame(KIND_REQUEST, header, chunks)


def decode_request(body: bytes, max_bytes: int) -> ScoreRequest:
    """Strict: every field typed and bounded, the payload exactly the size the header says."""
    header, payload = _unframe(body, KIND_REQUEST, max_bytes)
    request_id = _text(header, "request_id", "header", MAX_ID_CHARS)
    attempt = _int(header, "attempt", "header", 1, 1000)
    model = _text(header, "model", "header", 64)
    fingerprint = _text(header, "fingerprint", "header", 128)
    pcm = _get(header, "pcm", str, "header")
    if pcm not in PCM_TYPES:
        raise WireError(f"header.pcm {pcm!r} is not one of {', '.join(PCM_TYPES)}")
    dtype = PCM_TYPES[pcm]
    rate = _get(header, "sample_rate", int, "header")
    if rate not in SAMPLE_RATES:
        raise WireError(f"header.sample_rate {rate} Hz is not a usable sample rate ({SAMPLE_RATES.start}-{SAMPLE_RATES.stop - 1})")
    raw_windows = _get(header, "windows", list, "header")
    if not 1 <= len(raw_windows) <= MAX_WINDOWS:
        raise WireError(f"header.windows must hold 1 to {MAX_WINDOWS} windows, not {len(raw_windows)}")
    metas, sizes = [], []
    for i, w in enumerate(raw_windows):
        where = f"header.windows.{i}"
        if not isinstance(w, dict):
            raise WireError(f"{where} must be an object")
        samples = _int(w, "samples", where, 1, max_samples(rate))
        metas.append(WindowMeta(
            source=_text(w, "source", where, MAX_SOURCE_CHARS),
            start_index=_int(w, "start_index", where, 0, 2**62),
            source_rate=_int(w, "source_rate", where, SAMPLE_RATES.start, SAMPLE_RATES.stop - 1),
            valid=_int(w, "valid", where, 0, samples),
            wall_start=_time(w, "wall_start", where),
            ready_at=_time(w, "ready_at", where),
        ))
        sizes.append(samples)
    expected = sum(sizes) * dtype.itemsize
    if len(payload) != expected:
        what = "truncated" if len(payload) < expected else "too long"
        raise WireError(f"payload {what}: the header describes {expected} bytes of {pcm} PCM, the body holds {len(payload)}")
    audio = []
    offset = 0
    for n in sizes:
        pcm_values = np.frombuffer(payload, dtype=dtype, count=n, offset=offset)
        offset += n * dtype.itemsize
        samples = pcm_values.astype(np.float32) / INT16_SCALE if pcm == "int16" else pcm_values.astype(np.float32)
        if not np.isfinite(samples).all():
            raise WireError(f"window {len(audio)} holds NaN or Inf samples (the capture node cleans them; this is not its PCM)")
        audio.append(samples)
    return ScoreRequest(request_id, model, fingerprint, rate, tuple(metas), tuple(audio), pcm, attempt)


# responses


def encode_response(response: ScoreResponse) -> bytes:
    probabilities = np.ascontiguousarray(response.probabilities, dtype="<f8")
    embeddings = None if response.embeddings is None else np.ascontiguousarray(response.embeddings, dtype="<f4")
    header = {"request_id": response.request_id, "model": response.model, "labels": list(response.labels),
              "windows": [list(w) for w in response.windows],
              "embedding_dim": 0 if embeddings is None else int(embeddings.shape[1]),
              "batch_sizes": list(response.batch_sizes), "replica": response.replica, "replayed": response.replayed,
              "server_ms": round(response.server_ms, 3), "forward_ms": round(response.forward_ms, 3)}
    return _frame(KIND_RESPONSE, header, [probabilities.tobytes(), b"" if embeddings is None else embeddings.tobytes()])


def decode_response(body: bytes) -> ScoreResponse:
    """As strict as the server is with requests: a proxy's or a stranger's body is refused, never guessed at."""
    header, payload = _unframe(body, KIND_RESPONSE)
    labels = _get(header, "labels", list, "header")
    if not 1 <= len(labels) <= MAX_LABELS or not all(isinstance(label, str) for label in labels):
        raise WireError("header.labels must be a list of 1 or more strings")
    raw_ids = _get(header, "windows", list, "header")
    ids = []
    for i, pair in enumerate(raw_ids):
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], int) and not isinstance(pair[1], bool)):
            raise WireError(f"header.windows.{i} must be [source, start_index]")
        ids.append((pair[0], pair[1]))
    n = len(ids)
    if not 1 <= n <= MAX_WINDOWS:
        raise WireError(f"header.windows must hold 1 to {MAX_WINDOWS} windows")
    dim = _int(header, "embedding_dim", "header", 0, MAX_EMBEDDING_DIM)
    batch_sizes = _get(header, "batch_sizes", list, "header")
    if len(batch_sizes) != n or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes):
        raise WireError("header.batch_sizes must hold one positive integer per window")
    expected = n * len(labels) * 8 + n * dim * 4
    if len(payload) != expected:
        raise WireError(f"payload holds {len(payload)} bytes; {n} windows x {len(labels)} labels and {dim}-d embeddings need {expected}")
    probabilities = np.frombuffer(payload, dtype="<f8", count=n * len(labels)).reshape(n, len(labels)).astype(np.float64)
    if not np.isfinite(probabilities).all() or (probabilities < 0).any() or (probabilities > 1 + 1e-6).any():
        raise WireError("payload: probabilities must be finite and within [0, 1]")
    embeddings = None
    if dim:
        embeddings = np.frombuffer(payload, dtype="<f4", offset=n * len(labels) * 8).reshape(n, dim).astype(np.float32)
        if not np.isfinite(embeddings).all():
            raise WireError("payload: embeddings must be finite")
    return ScoreResponse(
        request_id=_text(header, "request_id", "header", MAX_ID_CHARS), model=_text(header, "model", "header", 64),
        labels=tuple(labels), windows=tuple(ids), probabilities=probabilities, embeddings=embeddings,
        batch_sizes=tuple(batch_sizes), replica=str(header.get("replica", "")), replayed=bool(header.get("replayed", False)),
        server_ms=_time(header, "server_ms", "header") if "server_ms" in header else 0.0,
        forward_ms=_time(header, "forward_ms", "header") if "forward_ms" in header else 0.0,
    )


# model definitions


def model_name(ref: str) -> str:
    """How a model is compared between machines: the last part of its hub id or path (paths differ)."""
    return PurePath(ref.rstrip("/")).name or ref


def definition(config: Any) -> dict[str, Any]:
    """The part of a model's config entry that changes its scores, as JSON-able data."""
    data = config.model_dump(mode="json", exclude=set(NOT_SCORE_AFFECTING))
    if "model" in data:
        data["model"] = model_name(data["model"])
    if data.get("kind") == "yamnet":
        data.pop("class_map", None)
        data["classes"] = hashlib.sha256("\n".join(yamnet_class_names(config.class_map)).encode()).hexdigest()[:16]
    return data


def fingerprint(config: Any) -> str:
    canonical = json.dumps(definition(config), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two definitions, for an error a person can act on."""
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))


# windows


def window_meta(window: Any, sample_rate: int, samples: int) -> WindowMeta:
    """A window's metadata for a request whose PCM is at ``sample_rate`` and ``samples`` long."""
    valid = round(window.valid * sample_rate / window.sample_rate)
    return WindowMeta(window.source, int(window.start_index), int(window.sample_rate), max(0, min(samples, valid)),
                      float(window.wall_start), float(window.ready_at))


def make_window(meta: WindowMeta, samples: np.ndarray, sample_rate: int):
    """The one place a Window is built from the wire: at the model's rate, so ``at_rate`` hands the
    model these very samples. The gate's facts stay on the capture node (models do not read them)."""
    from monitord.types import Window, WindowFacts

    start = round(meta.start_index * sample_rate / meta.source_rate)
    facts = WindowFacts(rms_dbfs=0.0, peak_frame_dbfs=0.0, median_frame_dbfs=0.0, clipped_ratio=0.0, non_finite=0, dc_offset=0.0)
    return Window(meta.source, start, sample_rate, samples, meta.valid, meta.wall_start, meta.ready_at, facts)
