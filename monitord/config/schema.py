"""The configuration's schema: sections, keys, units and bounds (pydantic, frozen, unknown keys refused)."""

from __future__ import annotations

import string
from collections import Counter
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from monitord.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]*$"
DEFAULT_CLAP_MODEL = "laion/clap-htsat-unfused"
BUILTIN = "builtin"
"""``model: builtin`` (or no ``model:``) on a yamnet model: the YAMNet file shipped inside monitord."""


class _Strict(BaseModel):
    # no key means infinity or NaN (null says "never" where a key allows it), and every number has
    # an upper bound: beyond it a value cannot be slept on, allocated or handed to a C int
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_or_no_for_numbers(cls, value: Any, info: Any) -> Any:
        # YAML reads yes, no, on, off as true and false, and pydantic took those as 1 and 0:
        # `device: off` was the device at index 0, `seconds: true` a 1 s window
        if isinstance(value, bool) and not _takes_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(value).lower()} (YAML reads yes, no, on and off so) is not a number or a name "
                             f"here: write the value itself, in quotes if it is a name")
        return value


def _takes_bool(annotation: Any) -> bool:
    """Whether a field's type lets a YAML yes/no through as what it is (bool, or Any)."""
    import typing

    if annotation is bool or annotation is Any:
        return True
    return any(_takes_bool(a) for a in typing.get_args(annotation))


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
    sample_rate: int | None = Field(None, ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE)
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
    seconds: float = Field(2.0, ge=0.1, le=60.0)
    hop_s: float = Field(0.5, ge=0.01, le=60.0)
    """At least 10 ms, finer than any model's own frames: a hop of 1e-9 s was one sample, 48,000 windows a second."""


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
    optional: bool = False
    """Start without this model when it cannot be loaded (no hub, no cache, a bad directory): its
    rules, and models gated by it, are then inactive, and a status event says what to do."""


EMOTIONS = ("angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "unknown")
"""The one emotion vocabulary every emotion checkpoint is mapped onto."""


class ClapModelConfig(_ModelSettings):
    kind: Literal["clap"] = "clap"
    model: str = DEFAULT_CLAP_MODEL
    """Hugging Face model id or local directory."""
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    engine: Literal["auto", "torch", "openvino", "onnxruntime"] = "auto"
    """What runs the audio tower: auto = torch on CUDA, OpenVINO on CPU where installed, else torch."""
    labels: tuple[str, ...] = Field(min_length=2)
    prompt: str = "This is a sound of {label}."

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(label.strip() for label in labels)
        if any(not label for label in cleaned):
            raise ValueError("labels must not be empty strings")
        duplicates = sorted(label for label, n in Counter(cleaned).items() if n > 1)  # not .count(): 30000 labels took 40 s
        if duplicates:
            raise ValueError(f"duplicate labels: {', '.join(duplicates)}")
        return cleaned

    @field_validator("prompt")
    @classmethod
    def _prompt_has_label(cls, prompt: str) -> str:
        if "{label}" not in prompt:
            raise ValueError('prompt must contain "{label}"')
        try:  # only {label} itself: "{label:>999999999}" is a gigabyte per label, "{label.__class__}" no label
            fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(prompt)
                      if name is not None]
        except ValueError as exc:
            raise ValueError(f"prompt is not a valid template ({exc}); only {{label}} may be used") from None
        if any(field != ("label", "", None) for field in fields):
            raise ValueError("prompt may use only {label} itself (no other field, format spec or conversion; "
                             "write {{ and }} for braces)")
        try:
            prompt.format(label="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"prompt is not a valid template ({exc}); only {{label}} may be used") from None
        return prompt


class YamnetModelConfig(_ModelSettings):
    """Google's YAMNet (TFLite classification export, 521 AudioSet classes) on CPU."""

    kind: Literal["yamnet"]
    model: str = BUILTIN
    """Path to the .tflite classification export; ``builtin`` (the default): the file shipped with monitord."""
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
    engine: Literal["auto", "torch", "openvino", "onnxruntime"] = "auto"
    """What runs the classifier: auto = torch on CUDA, OpenVINO on CPU where installed, else torch."""
    label_map: dict[str, str] = {}
    """Checkpoint label -> emotion (angry, disgusted, fearful, happy, neutral, other, sad, surprised,
    unknown), on top of the built-in aliases (ang, hap, neu, calm, ...); unmapped labels go to other."""
    granularity: Literal["window", "frame"] = "window"
    """frame: also score every encoder frame (20 ms) from the same forward pass; needs a head that is
    linear after the encoder (wav2vec2 / HuBERT / WavLM ...ForSequenceClassification)."""


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


class ExamplesModelConfig(_ModelSettings):
    """Labels taught by example (``monitord teach``): kNN cosine scores against a bank of embeddings."""

    kind: Literal["examples"]
    bank: str
    """The bank ``monitord teach --bank`` writes; read again whenever it changes (no restart)."""
    labels: tuple[str, ...] = Field(min_length=1)
    """The taught labels rules may name; a label with no examples yet scores 0."""
    embedding_model: str
    """The model (kind yamnet or clap) whose window embeddings are compared."""
    k: int = Field(5, ge=1, le=100)
    """Nearest examples averaged per label."""
    batch_max: int = Field(64, ge=1, le=4096)
    batch_wait_ms: float = Field(0.0, ge=0.0, le=5000.0)


MODEL_KINDS = ("clap", "yamnet", "emotion", "anomaly", "examples")


def _model_kind(value: Any) -> str:
    kind = value.get("kind", "clap") if isinstance(value, dict) else getattr(value, "kind", "clap")
    return kind if kind in MODEL_KINDS else "clap"


ModelConfig = Annotated[
    Union[
        Annotated[ClapModelConfig, Tag("clap")],
        Annotated[YamnetModelConfig, Tag("yamnet")],
        Annotated[EmotionModelConfig, Tag("emotion")],
        Annotated[AnomalyModelConfig, Tag("anomaly")],
        Annotated[ExamplesModelConfig, Tag("examples")],
    ],
    Discriminator(_model_kind),
]


BUILTIN_REFERENCES = ("glass", "smoke-alarm")
"""Reference sounds shipped with monitord (``monitord.teaching.references``)."""
MARGIN_WITH_REFERENCE = 0.25
MARGIN_WITHOUT_REFERENCE = 0.15
"""The default ``not_like.margin``s, chosen by ``bench/detect.py`` on real glass breaks in real
background (YAMNet embeddings): the largest at which teaching 10 false alarms cost at most 2 points of
recall at every level, with the references guarding, and without any."""


class NotLikeConfig(_Strict):
    """A rule's taught false alarms ("not this"): a window like one of them does not count toward the
    rule, unless it is nearer to the rule's own sound (its ``reference`` and every "yes, this")."""

    bank: str = "taught.npz"
    """The bank "not this" and ``monitord teach --not RULE`` teach to; read again when it changes.
    Left out: ``taught-<model>.npz`` in the state directory (``<model>``: the rule's). Relative: to
    the config file's folder (and so is ``teach --bank``)."""
    margin: float = Field(MARGIN_WITH_REFERENCE, gt=0.0, le=2.0)
    """Cosine distance within which a taught false alarm suppresses a window (and it must be nearer
    to it than to every reference and every example of the rule's own label). Left out: 0.25 with a
    ``reference``, 0.15 without (nothing but "yes, this" guards recall then)."""
    reference: str | None = Field(None, min_length=1, max_length=4096)
    """Recordings of the rule's own sound that guard its recall: ``glass`` or ``smoke-alarm`` (shipped
    with monitord), or a folder of your own (relative: to the config file's folder)."""

    @model_validator(mode="before")
    @classmethod
    def _margin_by_guard(cls, data: Any) -> Any:
        if isinstance(data, dict) and "margin" not in data and data.get("reference") is None:
            return {**data, "margin": MARGIN_WITHOUT_REFERENCE}
        return data


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
    cooldown_s: float = Field(0.0, ge=0.0, le=31_536_000.0)
    smooth_s: float | None = Field(None, ge=0.0, le=600.0)
    """Frame rules: moving average of the frame scores over this many seconds."""
    hold_s: float | None = Field(None, ge=0.0, le=3600.0)
    """Frame rules: the (smoothed) frame score must stay at or above the threshold this long.
    Either key makes the rule a frame rule, which needs a model with ``granularity: frame``."""
    not_like: NotLikeConfig | None = None
    """Taught false alarms (``monitord teach --not RULE``) that do not count toward this rule."""

    @property
    def is_frame_rule(self) -> bool:
        return self.smooth_s is not None or self.hold_s is not None

    @property
    def release_level(self) -> float:
        return self.threshold if self.release is None else self.release


class CurveConfig(_Strict):
    """ZeroMQ CURVE: encryption, and only the listed clients may connect."""

    server_secret_key: str
    """The server's secret certificate (``monitord keys DIR --name server`` writes DIR/server.key_secret)."""
    authorized_clients: str
    """A folder of client public certificates (NAME.key) allowed to subscribe and replay."""


HA_BINARY_SENSOR_CLASSES = (
    "battery", "battery_charging", "carbon_monoxide", "cold", "connectivity", "door", "garage_door", "gas", "heat",
    "light", "lock", "moisture", "motion", "moving", "occupancy", "opening", "plug", "power", "presence", "problem",
    "running", "safety", "smoke", "sound", "tamper", "update", "vibration", "window",
)
"""Home Assistant's binary_sensor device classes (what ``publish.mqtt.device_classes`` may name)."""


class MqttTlsConfig(_Strict):
    """TLS to the broker."""

    ca: str | None = None
    """CA certificate(s) (PEM) the broker's certificate is checked against; the system's when absent."""
    cert: str | None = None
    """Client certificate (PEM), for brokers that require one."""
    key: str | None = None
    """The client certificate's private key (PEM)."""
    insecure: bool = False
    """Do not check that the broker's certificate names ``host`` (a self-signed test broker)."""


class MqttConfig(_Strict):
    """Events to an MQTT broker, with Home Assistant discovery (pip install 'monitord[mqtt]')."""

    host: str = Field(min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password_file: str | None = None
    """A file holding the password (its first line), owner-only; never the password itself in the config."""
    tls: MqttTlsConfig | None = None
    allow_insecure: bool = False
    """Allow a non-loopback broker without TLS (events, and the password, readable on the network)."""
    topic_prefix: str = Field("monitord", min_length=1)
    """Events on <prefix>/<source>/<rule>; alert state on .../<rule>/state; availability on <prefix>/availability.
    Give each monitord host on one broker its own prefix."""
    client_id: str | None = None
    """MQTT client id; monitord-<host> when absent."""
    qos: Literal[0, 1, 2] = 1
    """QoS of events and states; with 1 or 2 an event counts as delivered once the broker acknowledged it."""
    keepalive_s: int = Field(30, ge=5, le=3600)
    discovery: bool = False
    """Publish Home Assistant MQTT discovery configs (retained): a binary_sensor per source and rule, an
    input level sensor per source, all under one device per monitord host."""
    discovery_prefix: str = "homeassistant"
    device_classes: dict[str, str] = {}
    """Rule id -> Home Assistant binary_sensor device class (e.g. glass-break: safety, smoke-alarm: smoke);
    ``sound`` for rules not listed."""
    level_interval_s: float = Field(10.0, ge=1.0, le=3600.0)
    """Seconds between two input level readings per source."""
    backoff_max_s: float = Field(60.0, ge=1.0, le=3600.0)
    """Longest wait between two connection attempts."""

    @field_validator("topic_prefix", "discovery_prefix")
    @classmethod
    def _topic_level(cls, prefix: str) -> str:
        if any(c in prefix for c in "#+") or any(c.isspace() for c in prefix):
            raise ValueError("no wildcards (# +) or spaces in a topic prefix")
        if prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
            raise ValueError("no leading, trailing or doubled '/' in a topic prefix")
        return prefix


class NotifyConfig(_Strict):
    """Push notifications for alert onsets through Apprise (pip install 'monitord[notify]')."""

    url: str | None = None
    """Any Apprise URL (ntfy://, tgram://, mailto://, json://, ...)."""
    url_file: str | None = None
    """A file holding the URL (first line): for URLs that carry a secret."""
    rules: tuple[str, ...] | None = None
    """Rules that notify; every rule when absent."""
    attach_clip: bool = False
    """Attach the alert's clip (needs clips.enabled): the message is sent once the clip is written."""
    title: str = "monitord: {rule} on {source}"
    """Message title; {rule}, {source}, {label}, {host} are filled in."""
    clip_wait_s: float = Field(60.0, ge=0.0, le=3600.0)
    """How long to wait for the clip before sending without it."""
    retries: int = Field(4, ge=0, le=100)
    """Further attempts after a failed send, with exponential backoff."""


class PublishConfig(_Strict):
    endpoint: str = "tcp://127.0.0.1:5556"
    event_log: str | None = "events.jsonl"
    event_log_max_mb: float | None = Field(64.0, gt=0.0, le=1_048_576.0)
    """Rotate the log at this size (events.jsonl -> events.jsonl.1 ...); null: never."""
    event_log_keep: int = Field(5, ge=1, le=1000)
    """Rotated files kept."""
    fsync: bool = False
    """fsync the event log after every event (durable across power loss; slower)."""
    replay_endpoint: str | None = None
    """ROUTER socket answering {"since": N} from the log, so subscribers can fill gaps (tcp://127.0.0.1:5557)."""
    send_hwm: int = Field(10000, ge=1, le=2**31 - 1)
    """ZeroMQ send high-water mark per subscriber: bounds memory held for slow subscribers."""
    scores: bool | tuple[str, ...] = False
    """Also publish every scored window's scores on ``scores.<source>.<model>`` (not logged): a live
    tag stream. true: all; a list: only these models and/or sources."""
    curve: CurveConfig | None = None
    allow_insecure_remote: bool = False
    """Allow a non-loopback bind without CURVE (events readable by anyone on the network)."""
    host: str | None = None
    """Host name stamped on events; the machine's name when absent."""
    mqtt: MqttConfig | None = None
    """Also send every event to an MQTT broker (Home Assistant discovery optional)."""


class PipelineConfig(_Strict):
    queue_max_windows: int = Field(64, ge=1, le=100000)
    """Bounded window queue; live sources drop the oldest window when it is full."""
    shutdown_timeout_s: float = Field(5.0, ge=0.0, le=600.0)
    overload_status_interval_s: float = Field(10.0, ge=0.0, le=86400.0)
    ring_seconds: float = Field(10.0, ge=1.0, le=3600.0)
    """Ring buffer length per source (at least window + hop; with clips on, monitord makes it long
    enough for the pre-roll to survive the window queue's worst lag)."""
    inference_stall_s: float = Field(60.0, gt=0.0, le=3600.0)
    """The inference stage is unhealthy (no watchdog ping) when one batch takes longer than this."""
    overlap_tiers: bool = True
    """A cascade's second tier (a model gated by another, CLAP behind YAMNet) scores on a thread of
    its own: batch k's second tier while the first scores batch k+1. Off: one thread scores both."""
    memory_budget_mb: float = Field(512.0, gt=0.0, le=16_777_216.0)
    """The most the config's own buffers may take (ring buffers, the window queue, windows waiting
    for remote inference, events held for slow subscribers); a config needing more is refused."""


class ClipsConfig(_Strict):
    """Audio around each alert onset, from the ring buffer (so the pre-roll is real). Off: privacy."""

    enabled: bool = False
    dir: str = "clips"
    pre_s: float = Field(2.0, ge=0.0, le=600.0)
    """Seconds before the alerting window's start."""
    post_s: float = Field(2.0, ge=0.0, le=600.0)
    """Seconds after the alerting window's end."""
    format: Literal["flac", "wav"] = "flac"
    max_age_days: float | None = Field(30.0, gt=0.0, le=36500.0)
    max_total_mb: float | None = Field(1024.0, gt=0.0, le=1_073_741_824.0)


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
    max_upload_mb: float = Field(20.0, gt=0.0, le=1024.0)
    """The try-it panel refuses larger uploads (413) without reading them whole."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names (or addresses) the dashboard answers to besides loopback ones: any other ``Host``
    header gets 421, so a DNS-rebinding page cannot reach a loopback dashboard."""

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress
        import re

        label = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
        cleaned = []
        for host in hosts:
            name = host.strip().lower().removesuffix(".")
            try:
                cleaned.append(str(ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))))
                continue
            except ValueError:
                pass
            if not name or len(name) > 253 or not all(label.match(part) for part in name.split(".")):
                raise ValueError(f"{host!r} is not a host name or address (no port, no wildcard)")
            cleaned.append(name)
        return tuple(cleaned)


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
    max_waiting_windows: int = Field(128, ge=1, le=100000)
    """Windows that may wait for remote scoring (cluster down or slow); past it a live source's oldest
    waiting window is not scored remotely (UNAVAILABLE, an overload status) and a file waits."""
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
    notify: tuple[NotifyConfig, ...] = ()
    """Push notifications of alert onsets (Apprise URLs)."""

    def gate_for(self, source: SourceConfig) -> GateConfig:
        return source.gate if source.gate is not None else self.gate

    def model_gates(self) -> dict[str, GateConfig]:
        """Gates of the models that have their own."""
        return {name: m.gate for name, m in self.models.items() if m.gate is not None}
