"""YAML configuration: parsed, validated and frozen before anything starts.

Every problem is reported as ``path.to.key: what is wrong (line N)``; the daemon and
``check-config`` exit with status 2 when there is any.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]*$"
DEFAULT_CLAP_MODEL = "laion/clap-htsat-unfused"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class GateConfig(_Strict):
    """Which windows are worth scoring."""

    mode: Literal["energy", "speech", "periodic", "always"] = "energy"
    """energy: sound above the threshold (or an onset); speech: that and a share of speech frames;
    periodic: sound, sampled once every ``every_s`` unless an onset comes first (steady machines);
    always: every window."""
    threshold_dbfs: float = Field(-50.0, ge=-120.0, le=0.0)
    onset_db: float = Field(10.0, gt=0.0, le=60.0)
    """A 20 ms frame this much louder than the window's median frame counts as an onset."""
    speech_ratio: float = Field(0.3, ge=0.0, le=1.0)
    """speech mode: share of the window's VAD frames that must be speech."""
    vad: Literal["silero", "webrtc"] = "silero"
    """silero tells speech from other sound; webrtc only tells sound from silence."""
    vad_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    """silero: speech probability above which a 32 ms frame counts as speech."""
    vad_aggressiveness: int = Field(2, ge=0, le=3)
    """webrtc: its mode, 0-3."""
    every_s: float = Field(10.0, gt=0.0, le=86400.0)
    """periodic: seconds of stream time between sampled windows."""


class SourceConfig(_Strict):
    id: str = Field(pattern=ID_PATTERN, max_length=64)
    device: Union[int, str, None] = None
    """sounddevice index, a substring of the device name, or "default"."""
    file: str | None = None
    url: str | None = None
    """Any ffmpeg input: rtmp://, rtsp://, https://...m3u8, http://...; decoded by an ffmpeg subprocess."""
    sample_rate: int | None = Field(None, ge=8000, le=384000)
    """Capture/decode rate for devices and urls (default 48000); files play at their own rate."""
    channels: int = Field(1, ge=1, le=64)
    """Channels opened on a device; mixed down to mono."""
    blocksize: int = Field(0, ge=0, le=65536)
    """Frames per capture callback; 0 lets PortAudio choose."""
    realtime: bool = False
    """File sources: pace like a live source instead of running as fast as the worker goes."""
    retry: bool = False
    """Devices: if missing at start, keep trying (with a status event) instead of exiting 2."""
    reconnect: bool = True
    """Devices: reopen a lost stream with exponential backoff."""
    watchdog_s: float = Field(2.0, gt=0.0, le=600.0)
    """Devices: no block for this long means the stream is lost."""
    backoff_max_s: float = Field(30.0, gt=0.0, le=3600.0)
    gate: GateConfig | None = None

    @property
    def kind(self) -> str:
        return "file" if self.file is not None else "url" if self.url is not None else "device"


class WindowConfig(_Strict):
    seconds: float = Field(2.0, gt=0.0, le=60.0)
    hop_s: float = Field(0.5, gt=0.0, le=60.0)


class CascadeConfig(_Strict):
    """Score a window with this model only where another model already heard something relevant."""

    model: str
    labels: tuple[str, ...] = Field(min_length=1)
    threshold: float = Field(ge=0.0, le=1.0)
    """The window goes on when the best of ``labels`` reaches this."""


class _ModelSettings(_Strict):
    """What every model kind takes: batching, an optional cascade and an optional gate of its own."""

    batch_max: int = Field(8, ge=1, le=4096)
    """Windows per forward pass."""
    batch_wait_ms: float = Field(20.0, ge=0.0, le=5000.0)
    """How long the worker waits to fill a batch."""
    gated_by: CascadeConfig | None = None
    gate: GateConfig | None = None
    """This model's own gate (e.g. speech for an emotion model); the source's gate when absent."""


EMOTIONS = ("angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "unknown")
"""The one emotion vocabulary every emotion checkpoint is mapped onto."""


class ClapModelConfig(_ModelSettings):
    kind: Literal["clap"] = "clap"
    model: str = DEFAULT_CLAP_MODEL
    """Hugging Face model id or local directory."""
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    labels: tuple[str, ...] = Field(min_length=2)
    prompt: str = "This is a sound of {label}."

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(label.strip() for label in labels)
        if any(not label for label in cleaned):
            raise ValueError("labels must not be empty strings")
        duplicates = sorted({label for label in cleaned if cleaned.count(label) > 1})
        if duplicates:
            raise ValueError(f"duplicate labels: {', '.join(duplicates)}")
        return cleaned

    @field_validator("prompt")
    @classmethod
    def _prompt_has_label(cls, prompt: str) -> str:
        if "{label}" not in prompt:
            raise ValueError('prompt must contain "{label}"')
        try:
            prompt.format(label="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"prompt is not a valid template ({exc}); only {{label}} may be used") from None
        return prompt


class YamnetModelConfig(_ModelSettings):
    """Google's YAMNet (TFLite classification export, 521 AudioSet classes) on CPU."""

    kind: Literal["yamnet"]
    model: str
    """Path to the .tflite file."""
    class_map: str | None = None
    """CSV of class names in output order; the AudioSet map shipped with monitord when absent."""
    groups: dict[str, tuple[str, ...]] = {}
    """Named groups of classes; a group's score is the best of its members."""
    pool: Literal["max", "mean"] = "max"
    """How the 0.975 s frames inside a window are combined."""
    threads: int = Field(1, ge=1, le=64)
    batch_max: int = Field(16, ge=1, le=4096)


class EmotionModelConfig(_ModelSettings):
    """Any AutoModelForAudioClassification speech-emotion checkpoint (wav2vec2 / HuBERT / WavLM style)."""

    kind: Literal["emotion"]
    model: str
    """Hugging Face model id or local directory."""
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    label_map: dict[str, str] = {}
    """Checkpoint label -> emotion (angry, disgusted, fearful, happy, neutral, other, sad, surprised,
    unknown), on top of the built-in aliases (ang, hap, neu, calm, ...); unmapped labels go to other."""


class AnomalyModelConfig(_ModelSettings):
    """Machine health: distance of a window's embedding to enrolled normal ones (label ``anomaly``)."""

    kind: Literal["anomaly"]
    embedding_model: str
    """The model (kind clap) whose audio embeddings are compared."""
    bank: str | None = None
    """Bank for every source (``monitord enroll`` writes it)."""
    banks: dict[str, str] = {}
    """Per-source banks (source id -> bank), over ``bank``."""
    batch_max: int = Field(64, ge=1, le=4096)
    batch_wait_ms: float = Field(0.0, ge=0.0, le=5000.0)


MODEL_KINDS = ("clap", "yamnet", "emotion", "anomaly")


def _model_kind(value: Any) -> str:
    kind = value.get("kind", "clap") if isinstance(value, dict) else getattr(value, "kind", "clap")
    return kind if kind in MODEL_KINDS else "clap"


ModelConfig = Annotated[
    Union[
        Annotated[ClapModelConfig, Tag("clap")],
        Annotated[YamnetModelConfig, Tag("yamnet")],
        Annotated[EmotionModelConfig, Tag("emotion")],
        Annotated[AnomalyModelConfig, Tag("anomaly")],
    ],
    Discriminator(_model_kind),
]


class RuleConfig(_Strict):
    id: str = Field(pattern=ID_PATTERN, max_length=64)
    model: str
    label: str
    sources: tuple[str, ...] | None = None
    """Sources this rule watches; all when absent."""
    threshold: float = Field(ge=0.0, le=1.0)
    release: float | None = Field(None, ge=0.0, le=1.0)
    """Score below which an active alert ends; defaults to the threshold."""
    min_windows: int = Field(1, ge=1, le=1000)
    of_windows: int = Field(1, ge=1, le=1000)
    cooldown_s: float = Field(0.0, ge=0.0)

    @property
    def release_level(self) -> float:
        return self.threshold if self.release is None else self.release


class CurveConfig(_Strict):
    """ZeroMQ CURVE: encryption, and only the listed clients may connect."""

    server_secret_key: str
    """The server's secret certificate (``monitord keys DIR --name server`` writes DIR/server.key_secret)."""
    authorized_clients: str
    """A folder of client public certificates (NAME.key) allowed to subscribe and replay."""


class PublishConfig(_Strict):
    endpoint: str = "tcp://127.0.0.1:5556"
    event_log: str | None = "events.jsonl"
    event_log_max_mb: float | None = Field(64.0, gt=0.0)
    """Rotate the log at this size (events.jsonl -> events.jsonl.1 ...); null: never."""
    event_log_keep: int = Field(5, ge=1, le=1000)
    """Rotated files kept."""
    fsync: bool = False
    """fsync the event log after every event (durable across power loss; slower)."""
    replay_endpoint: str | None = None
    """ROUTER socket answering {"since": N} from the log, so subscribers can fill gaps (tcp://127.0.0.1:5557)."""
    send_hwm: int = Field(10000, ge=1)
    """ZeroMQ send high-water mark per subscriber: bounds memory held for slow subscribers."""
    scores: bool | tuple[str, ...] = False
    """Also publish every scored window's scores on ``scores.<source>.<model>`` (not logged): a live
    tag stream. true: all; a list: only these models and/or sources."""
    curve: CurveConfig | None = None
    allow_insecure_remote: bool = False
    """Allow a non-loopback bind without CURVE (events readable by anyone on the network)."""
    host: str | None = None
    """Host name stamped on events; the machine's name when absent."""


class PipelineConfig(_Strict):
    queue_max_windows: int = Field(64, ge=1, le=100000)
    """Bounded window queue; live sources drop the oldest window when it is full."""
    shutdown_timeout_s: float = Field(5.0, ge=0.0, le=600.0)
    overload_status_interval_s: float = Field(10.0, ge=0.0)
    ring_seconds: float = Field(10.0, ge=1.0, le=3600.0)
    """Ring buffer length per source (must exceed the window)."""


class ClipsConfig(_Strict):
    """Audio around each alert onset, from the ring buffer (so the pre-roll is real). Off: privacy."""

    enabled: bool = False
    dir: str = "clips"
    pre_s: float = Field(2.0, ge=0.0, le=600.0)
    """Seconds before the alerting window's start."""
    post_s: float = Field(2.0, ge=0.0, le=600.0)
    """Seconds after the alerting window's end."""
    format: Literal["flac", "wav"] = "flac"
    max_age_days: float | None = Field(30.0, gt=0.0)
    max_total_mb: float | None = Field(1024.0, gt=0.0)


class MetricsConfig(_Strict):
    """Prometheus metrics over HTTP; off unless ``bind`` is set."""

    bind: str | None = None
    """HOST:PORT, e.g. 127.0.0.1:9464 (loopback unless allow_remote)."""
    allow_remote: bool = False


class HttpConfig(_Strict):
    """The live dashboard, served by the daemon; off unless ``bind`` is set."""

    bind: str | None = None
    """HOST:PORT, e.g. 127.0.0.1:8080."""
    token: str | None = Field(None, min_length=16)
    """Required on every request when set; a non-loopback bind needs one."""


class InferenceConfig(_Strict):
    """Models scored by a ``monitord serve`` application (Ray Serve) instead of on this machine."""

    url: str
    """The serve application's route, e.g. http://gpu-head:8000/monitord (``monitord serve`` prints it)."""
    models: tuple[str, ...] = Field(min_length=1)
    """Models of this config scored remotely; the others stay local. Their entries here still
    define labels, prompts, gates and cascades, and must match the server's (a fingerprint is checked)."""
    token_file: str | None = None
    """File holding the shared secret (16+ characters); required unless the url is loopback."""
    timeout_s: float = Field(5.0, gt=0.0, le=600.0)
    """How long one batch may take, retries included, before the cluster counts as down."""
    max_in_flight: int = Field(4, ge=1, le=256)
    """Batches in the air per capture node."""
    pcm: Literal["float32", "int16"] = "float32"
    """Audio on the wire; int16 halves the bytes but scores then differ slightly from local ones."""
    ca_file: str | None = None
    """CA certificates (PEM) to verify an https url with; the system's when absent."""


class ServeConfig(_Strict):
    """``monitord serve``: this config's models as a Ray Serve application."""

    route_prefix: str = Field("/monitord", pattern=r"^/[A-Za-z0-9_\-./]*$")
    token_file: str | None = None
    """The shared secret capture nodes send; required to serve on a non-loopback address."""
    replicas: int = Field(1, ge=1, le=1024)
    cpus_per_replica: float = Field(1.0, ge=0.0, le=1024.0)
    gpus_per_replica: float = Field(0.0, ge=0.0, le=64.0)
    max_ongoing_requests: int = Field(32, ge=1, le=100000)
    """Requests one replica holds at once (each carries a batch of windows)."""
    canary_every_s: float = Field(30.0, gt=0.0, le=86400.0)
    """Health: a forward pass on a canary window at most this often (not while real batches succeed)."""
    health_check_period_s: float = Field(10.0, gt=0.0, le=3600.0)
    health_check_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    max_request_mb: float = Field(64.0, gt=0.0, le=4096.0)
    ssl_certfile: str | None = None
    """HTTPS from Serve's own proxy (with ssl_keyfile); or put a TLS-terminating proxy in front."""
    ssl_keyfile: str | None = None


class Config(_Strict):
    sources: tuple[SourceConfig, ...] = Field(min_length=1)
    gate: GateConfig = GateConfig()
    window: WindowConfig = WindowConfig()
    models: dict[str, ModelConfig] = Field(min_length=1)
    rules: tuple[RuleConfig, ...] = ()
    publish: PublishConfig = PublishConfig()
    pipeline: PipelineConfig = PipelineConfig()
    clips: ClipsConfig = ClipsConfig()
    metrics: MetricsConfig = MetricsConfig()
    http: HttpConfig = HttpConfig()
    inference: InferenceConfig | None = None
    serve: ServeConfig = ServeConfig()

    def gate_for(self, source: SourceConfig) -> GateConfig:
        return source.gate if source.gate is not None else self.gate

    def model_gates(self) -> dict[str, GateConfig]:
        """Gates of the models that have their own."""
        return {name: m.gate for name, m in self.models.items() if m.gate is not None}


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line is not None else ""
        return f"{self.path}: {self.message}{where}"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and resolve a YAML config file; raises ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem("config", f"file not found: {path}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("config", f"cannot read {path}: {exc}")]) from None
    return parse_config(text, base_dir=path.resolve().parent)


def parse_config(text: str, base_dir: Path) -> Config:
    try:
        root_node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem("config", f"invalid YAML: {problem}", line)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("config", f"top level must be a mapping of sections, not {type(data).__name__}")])

    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A list whose item failed also reports itself "too short": the item's error says it all.
        paths = {_path(err) for err in errors}
        errors = [e for e in errors if not (e["type"] == "too_short" and any(p.startswith(_path(e) + ".") for p in paths))]
        raise ConfigError(_merge([_problem_from_pydantic(err, root_node) for err in errors])) from None

    config = _resolve_paths(config, base_dir)
    problems = _cross_check(config)
    if problems:
        raise ConfigError([Problem(p.path, p.message, _line_of(root_node, p.path)) for p in problems])
    return config


def _merge(problems: list[Problem]) -> list[Problem]:
    """One line per key: the alternatives of a union ("a valid integer", "a valid string") joined."""
    merged: dict[str, Problem] = {}
    for p in problems:
        if p.path in merged and p.message not in merged[p.path].message:
            first = merged[p.path]
            merged[p.path] = Problem(p.path, f"{first.message}; or {p.message}", first.line)
        else:
            merged.setdefault(p.path, p)
    return list(merged.values())


def _loc(err: dict[str, Any]) -> list[Any]:
    # Unions add their member's name to the location ("device.int", "models.x.clap"): not keys the user wrote.
    loc = list(err["loc"])
    if len(loc) >= 3 and loc[0] == "models" and loc[2] in MODEL_KINDS:
        del loc[2]
    return [part for part in loc if part not in ("int", "str", "none")]


def _path(err: dict[str, Any]) -> str:
    return ".".join(str(part) for part in _loc(err)) or "config"


def _problem_from_pydantic(err: dict[str, Any], root_node: yaml.Node | None) -> Problem:
    loc = _loc(err)
    path = _path(err)
    kind = err["type"]
    if kind == "extra_forbidden":
        message = "unknown key" + _suggestion(loc, raw_loc=err["loc"])
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "value_error":
        message = str(err["msg"]).removeprefix("Value error, ")
    elif kind == "string_pattern_mismatch" and loc and loc[-1] == "id":
        message = f"{err['input']!r} is not a valid id: use letters, digits, '-' and '_'"
    elif kind == "string_pattern_mismatch" and loc and loc[-1] == "device":
        message = f"{err['input']!r} is not a device: use auto, cpu, cuda or cuda:N"
    else:
        message = f"{err['msg']} (got {_short(err.get('input'))})"
    return Problem(path, message, _line_of(root_node, path))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_ALLOWED_KEYS: dict[str, type[BaseModel]] = {
    "": Config,
    "sources": SourceConfig,
    "gate": GateConfig,
    "window": WindowConfig,
    "models": ClapModelConfig,
    "yamnet": YamnetModelConfig,
    "emotion": EmotionModelConfig,
    "anomaly": AnomalyModelConfig,
    "gated_by": CascadeConfig,
    "curve": CurveConfig,
    "rules": RuleConfig,
    "publish": PublishConfig,
    "pipeline": PipelineConfig,
    "clips": ClipsConfig,
    "metrics": MetricsConfig,
    "http": HttpConfig,
    "inference": InferenceConfig,
    "serve": ServeConfig,
}


def _suggestion(loc: list[Any], raw_loc: tuple[Any, ...]) -> str:
    """' (did you mean X?)' for a misspelt key, from the fields of the section it sits in."""
    key = str(loc[-1])
    parents = [str(p) for p in loc[:-1] if not isinstance(p, int)]
    section = parents[-1] if parents else ""
    if len(parents) == 2 and parents[0] == "models":
        section = next((k for k in ("yamnet", "emotion", "anomaly") if k in raw_loc), "models")
    elif len(parents) == 3 and parents[0] == "models":
        section = parents[2]
    model = _ALLOWED_KEYS.get(section)
    if model is None:
        return ""
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (allowed: {', '.join(allowed)})"


def _line_of(root_node: yaml.Node | None, dotted: str) -> int | None:
    """1-based line of the YAML node at a dotted path, or of its nearest existing parent."""
    node = root_node
    line = None
    if node is None:
        return None
    for part in dotted.split("."):
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            key_node = next((k for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                break
            line = key_node.start_mark.line + 1
            node = match
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _resolve(base_dir: Path, value: str) -> str:
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    sources = tuple(
        s.model_copy(update={"file": _resolve(base_dir, s.file)}) if s.file is not None else s for s in config.sources
    )
    models = {name: _resolve_model(model, base_dir) for name, model in config.models.items()}
    clips = config.clips.model_copy(update={"dir": _resolve(base_dir, config.clips.dir)})
    publish = config.publish
    if publish.event_log is not None:
        publish = publish.model_copy(update={"event_log": _resolve(base_dir, publish.event_log)})
    if publish.curve is not None:
        curve = publish.curve.model_copy(update={
            "server_secret_key": _resolve(base_dir, publish.curve.server_secret_key),
            "authorized_clients": _resolve(base_dir, publish.curve.authorized_clients),
        })
        publish = publish.model_copy(update={"curve": curve})
    inference = config.inference
    if inference is not None:
        inference = inference.model_copy(update={k: _resolve(base_dir, getattr(inference, k)) for k in ("token_file", "ca_file")
                                                 if getattr(inference, k) is not None})
    return config.model_copy(update={"sources": sources, "models": models, "publish": publish, "clips": clips,
                                     "inference": inference, "serve": _resolve_serve(config.serve, base_dir)})


def _resolve_model(model: Any, base_dir: Path) -> Any:
    if model.kind == "anomaly":
        return model.model_copy(update={
            "bank": None if model.bank is None else _resolve(base_dir, model.bank),
            "banks": {source: _resolve(base_dir, path) for source, path in model.banks.items()},
        })
    local = Path(_resolve(base_dir, model.model))
    looks_like_path = model.kind == "yamnet" or model.model.startswith((".", "/", "~")) or local.exists()
    update: dict[str, Any] = {"model": str(local)} if looks_like_path else {}
    if getattr(model, "class_map", None) is not None:
        update["class_map"] = _resolve(base_dir, model.class_map)
    return model.model_copy(update=update)


def _resolve_serve(serve: ServeConfig, base_dir: Path) -> ServeConfig:
    keys = ("token_file", "ssl_certfile", "ssl_keyfile")
    return serve.model_copy(update={k: _resolve(base_dir, getattr(serve, k)) for k in keys if getattr(serve, k) is not None})


def _cross_check(config: Config) -> list[Problem]:
    problems: list[Problem] = []
    add = lambda path, message: problems.append(Problem(path, message))  # noqa: E731

    seen_ids: set[str] = set()
    for i, source in enumerate(config.sources):
        where = f"sources.{i}"
        if source.id in seen_ids:
            add(f"{where}.id", f"duplicate source id {source.id!r}")
        seen_ids.add(source.id)
        if sum(x is not None for x in (source.device, source.file, source.url)) != 1:
            add(where, "give exactly one of 'device', 'file' or 'url'")
        if source.file is not None:
            if not Path(source.file).is_file():
                add(f"{where}.file", f"file not found: {source.file}")
        if source.device is not None and source.realtime:
            add(f"{where}.realtime", "only file and url sources take 'realtime' (devices are always real time)")
        if source.file is not None and source.retry:
            add(f"{where}.retry", "only device sources take 'retry'")

    window = config.window
    if window.hop_s > window.seconds:
        add("window.hop_s", f"hop ({window.hop_s} s) is longer than the window ({window.seconds} s): audio would be skipped")
    needed = window.seconds + window.hop_s
    if config.clips.enabled:
        needed += config.clips.pre_s + config.clips.post_s + 1.0
    if config.pipeline.ring_seconds < needed:
        what = "window, hop, clip pre-roll and post-roll, plus 1 s" if config.clips.enabled else "window.seconds + window.hop_s"
        add("pipeline.ring_seconds", f"must be at least {needed:g} s ({what})")
    if config.metrics.bind is not None:
        host, _, port = config.metrics.bind.rpartition(":")
        if not port.isdigit() or not host:
            add("metrics.bind", f"{config.metrics.bind!r}: expected HOST:PORT")
        elif not _is_loopback(host.strip("[]")) and not config.metrics.allow_remote:
            add("metrics.bind", f"binds a non-loopback address ({host}): set metrics.allow_remote: true if you mean it")

    vocabularies: dict[str, tuple[str, ...]] = {}
    for name, model in config.models.items():
        labels, model_problems = _model_vocabulary(name, model)
        problems.extend(model_problems)
        if labels is not None:
            vocabularies[name] = labels
    problems.extend(_check_cascades(config, vocabularies))
    for name, model in config.models.items():
        if model.kind != "anomaly":
            continue
        where = f"models.{name}"
        target = config.models.get(model.embedding_model)
        if target is None or target.kind != "clap":
            add(f"{where}.embedding_model", f"{model.embedding_model!r} is not a clap model of this config")
        if model.bank is None and not model.banks:
            add(where, "give a bank (for every source) or banks (per source): `monitord enroll` records one")
        for source_id in model.banks:
            if source_id not in seen_ids:
                add(f"{where}.banks.{source_id}", f"no source named {source_id!r}")

    seen_rules: set[str] = set()
    for i, rule in enumerate(config.rules):
        where = f"rules.{i}"
        if rule.id in seen_rules:
            add(f"{where}.id", f"duplicate rule id {rule.id!r}")
        seen_rules.add(rule.id)
        if rule.model not in config.models:
            add(f"{where}.model", f"no model named {rule.model!r} (models: {', '.join(config.models)})")
        elif rule.model in vocabularies:
            problem = _unknown_label(rule.label, vocabularies[rule.model], rule.model)
            if problem:
                add(f"{where}.label", problem)
        if rule.release is not None and rule.release > rule.threshold:
            add(f"{where}.release", f"release ({rule.release}) must not exceed threshold ({rule.threshold})")
        if rule.min_windows > rule.of_windows:
            add(f"{where}.min_windows", f"min_windows ({rule.min_windows}) exceeds of_windows ({rule.of_windows})")
        for j, source_id in enumerate(rule.sources or ()):
            if source_id not in seen_ids and source_id not in {s.id for s in config.sources}:
                add(f"{where}.sources.{j}", f"no source named {source_id!r}")

    for name in config.models:
        if not re.match(ID_PATTERN, name):
            add(f"models.{name}", f"{name!r} is not a valid model name: use letters, digits, '-' and '_'")

    problems.extend(_check_endpoint(config.publish))
    problems.extend(_check_inference(config))
    problems.extend(_check_serve(config.serve))
    if config.http.bind is not None:
        host, _, port = config.http.bind.rpartition(":")
        if not port.isdigit() or not host:
            add("http.bind", f"{config.http.bind!r}: expected HOST:PORT")
        elif not _is_loopback(host.strip("[]")) and config.http.token is None:
            add("http.bind", f"binds a non-loopback address ({host}) without a token: set http.token (16+ characters)")
    if isinstance(config.publish.scores, tuple):
        names = set(config.models) | {s.id for s in config.sources}
        for j, name in enumerate(config.publish.scores):
            if name not in names:
                add(f"publish.scores.{j}", f"{name!r} is neither a model nor a source")
    curve = config.publish.curve
    if curve is not None:
        if not Path(curve.server_secret_key).is_file():
            add("publish.curve.server_secret_key", f"file not found: {curve.server_secret_key} (monitord keys DIR --name server)")
        if not Path(curve.authorized_clients).is_dir():
            add("publish.curve.authorized_clients", f"not a folder: {curve.authorized_clients}")
    return problems


def _unknown_label(label: str, vocabulary: tuple[str, ...], model: str) -> str | None:
    if label in vocabulary:
        return None
    close = difflib.get_close_matches(label, vocabulary, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{label!r} is not a label of model {model!r}{hint}"


def yamnet_class_names(class_map: str | None) -> tuple[str, ...]:
    """Display names in output order, from YAMNet's class map CSV (index, mid, display_name)."""
    import csv

    path = Path(class_map) if class_map else Path(__file__).parent / "models" / "yamnet_class_map.csv"
    with path.open(newline="", encoding="utf-8") as f:
        return tuple(row["display_name"] for row in csv.DictReader(f))


def _model_vocabulary(name: str, model: Any) -> tuple[tuple[str, ...] | None, list[Problem]]:
    """Every label a rule may name on this model, and any problems with the model's own names."""
    if model.kind == "clap":
        return model.labels, []
    if model.kind == "anomaly":
        return ("anomaly",), []
    if model.kind == "emotion":
        problems = [
            Problem(f"models.{name}.label_map.{label}", f"{target!r} is not one of the emotions ({', '.join(EMOTIONS)})")
            for label, target in model.label_map.items()
            if target not in EMOTIONS
        ]
        return EMOTIONS, problems
    where = f"models.{name}"
    try:
        classes = yamnet_class_names(model.class_map)
    except (OSError, KeyError, UnicodeDecodeError) as exc:
        return None, [Problem(f"{where}.class_map", f"cannot read the class map: {exc}")]
    problems = []
    for group, members in model.groups.items():
        if group in classes:
            problems.append(Problem(f"{where}.groups.{group}", f"group name {group!r} is also a class name: pick another"))
        if not members:
            problems.append(Problem(f"{where}.groups.{group}", "a group needs at least one class"))
        for j, member in enumerate(members):
            problem = _unknown_label(member, classes, name)
            if problem:
                problems.append(Problem(f"{where}.groups.{group}.{j}", problem.replace("is not a label", "is not a class")))
    return classes + tuple(model.groups), problems


def _check_cascades(config: Config, vocabularies: dict[str, tuple[str, ...]]) -> list[Problem]:
    problems = []
    for name, model in config.models.items():
        cascade = model.gated_by
        if cascade is None:
            continue
        where = f"models.{name}.gated_by"
        if cascade.model == name or cascade.model not in config.models:
            problems.append(Problem(f"{where}.model", f"no other model named {cascade.model!r}"))
            continue
        if config.models[cascade.model].gated_by is not None:
            problems.append(Problem(f"{where}.model", f"{cascade.model!r} is itself gated: cascades are one level deep"))
        for j, label in enumerate(cascade.labels):
            problem = _unknown_label(label, vocabularies.get(cascade.model, (label,)), cascade.model)
            if problem:
                problems.append(Problem(f"{where}.labels.{j}", problem))
    return problems


def _check_endpoint(publish: PublishConfig) -> list[Problem]:
    problems = []
    for key in ("endpoint", "replay_endpoint"):
        endpoint = getattr(publish, key)
        if endpoint is not None:
            problems += _check_one_endpoint(f"publish.{key}", endpoint, publish)
    if publish.replay_endpoint is not None and publish.event_log is None:
        problems.append(Problem("publish.replay_endpoint", "needs publish.event_log: replay reads the log"))
    if publish.replay_endpoint is not None and publish.replay_endpoint == publish.endpoint:
        problems.append(Problem("publish.replay_endpoint", "must differ from publish.endpoint"))
    return problems


def _check_one_endpoint(key: str, endpoint: str, publish: PublishConfig) -> list[Problem]:
    match = re.match(r"^(tcp|ipc|inproc)://(.+)$", endpoint)
    if not match:
        return [Problem(key, f"{endpoint!r} is not a ZeroMQ endpoint (tcp://HOST:PORT, ipc://PATH)")]
    if match.group(1) != "tcp":
        return []
    host, _, port = match.group(2).rpartition(":")
    if not (port.isdigit() or port == "*") or not host:
        return [Problem(key, f"{endpoint!r}: expected tcp://HOST:PORT")]
    if not _is_loopback(host.strip("[]")) and not publish.allow_insecure_remote and publish.curve is None:
        return [
            Problem(
                key,
                f"binds a non-loopback address ({host}) without encryption: events would be readable on the "
                "network; bind 127.0.0.1, configure publish.curve, or set publish.allow_insecure_remote: true",
            )
        ]
    return []


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Inference on a Ray Serve application (monitord.serve): the capture node's section, and the
# server's own reading of a config (only its models and serve section).

MIN_TOKEN_CHARS = 16


def _check_inference(config: Config) -> list[Problem]:
    inference = config.inference
    if inference is None:
        return []
    import urllib.parse

    problems = []
    url = urllib.parse.urlsplit(inference.url)
    try:
        url.port
        port_ok = True
    except ValueError:
        port_ok = False
    if url.scheme not in ("http", "https") or not url.hostname or not port_ok or url.query or url.fragment:
        problems.append(Problem("inference.url", f"{inference.url!r} is not an http(s) URL such as http://HOST:8000/monitord "
                                                 "(the line `monitord serve` prints)"))
    elif inference.token_file is None and not _is_loopback(url.hostname):
        problems.append(Problem("inference.token_file", f"required: {url.hostname} is not a loopback address, and the "
                                                        "server refuses requests without its token"))
    seen: set[str] = set()
    for j, name in enumerate(inference.models):
        model = config.models.get(name)
        if model is None:
            close = difflib.get_close_matches(name, list(config.models), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (models: {', '.join(config.models)})"
            problems.append(Problem(f"inference.models.{j}", f"no model named {name!r}{hint}"))
        elif model.kind == "anomaly":
            problems.append(Problem(f"inference.models.{j}", f"{name!r} is an anomaly model: it runs on the capture node "
                                                             f"(its banks are local); list its embedding_model instead"))
        elif name in seen:
            problems.append(Problem(f"inference.models.{j}", f"{name!r} is listed twice"))
        seen.add(name)
    problems.extend(_check_token_file("inference.token_file", inference.token_file))
    if inference.ca_file is not None and not Path(inference.ca_file).is_file():
        problems.append(Problem("inference.ca_file", f"file not found: {inference.ca_file}"))
    return problems


def _check_serve(serve: ServeConfig) -> list[Problem]:
    problems = _check_token_file("serve.token_file", serve.token_file)
    if (serve.ssl_certfile is None) != (serve.ssl_keyfile is None):
        problems.append(Problem("serve.ssl_keyfile" if serve.ssl_keyfile is None else "serve.ssl_certfile",
                                "give both ssl_certfile and ssl_keyfile, or neither"))
    for key in ("ssl_certfile", "ssl_keyfile"):
        path = getattr(serve, key)
        if path is not None and not Path(path).is_file():
            problems.append(Problem(f"serve.{key}", f"file not found: {path}"))
    return problems


def _check_token_file(key: str, path: str | None) -> list[Problem]:
    if path is None:
        return []
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return [Problem(key, f"file not found: {path}")]
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(key, f"cannot read {path}: {exc}")]
    if len(token) < MIN_TOKEN_CHARS:
        return [Problem(key, f"{path} holds {len(token)} characters; a token needs at least {MIN_TOKEN_CHARS}")]
    return []


class ServeFile(_Strict):
    """What ``monitord serve`` reads from a config: its models and its serve section. A capture
    node's config may be served as it is: its other sections are not read here."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=False)
    models: dict[str, ModelConfig] = Field(min_length=1)
    serve: ServeConfig = ServeConfig()


def load_serve_config(path: str | os.PathLike[str]) -> ServeFile:
    """The models and serve section of a config file, validated and resolved; raises ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem("config", f"file not found: {path}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("config", f"cannot read {path}: {exc}")]) from None
    try:
        root_node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError([Problem("config", f"invalid YAML: {getattr(exc, 'problem', None) or exc}",
                                   mark.line + 1 if mark is not None else None)]) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem("config", "top level must be a mapping of sections with a models: section")])
    try:
        served = ServeFile.model_validate({k: v for k, v in data.items() if k in ("models", "serve")})
    except ValidationError as exc:
        raise ConfigError(_merge([_problem_from_pydantic(err, root_node) for err in exc.errors()])) from None
    base_dir = path.resolve().parent
    served = served.model_copy(update={
        "models": {name: _resolve_model(m, base_dir) for name, m in served.models.items()},
        "serve": _resolve_serve(served.serve, base_dir),
    })
    problems = []
    for name, model in served.models.items():
        if not re.match(ID_PATTERN, name):
            problems.append(Problem(f"models.{name}", f"{name!r} is not a valid model name: use letters, digits, '-' and '_'"))
        problems.extend(_model_vocabulary(name, model)[1])
    if all(m.kind == "anomaly" for m in served.models.values()):
        problems.append(Problem("models", "nothing to serve: anomaly models run on capture nodes (serve their embedding model)"))
    problems.extend(_check_serve(served.serve))
    if problems:
        raise ConfigError([Problem(p.path, p.message, _line_of(root_node, p.path)) for p in problems])
    return served
