"""Checks that span keys: ids, labels against each model's vocabulary, cascades, addresses, files."""

from __future__ import annotations

import collections
import difflib
import functools
import re
from pathlib import Path
from collections.abc import Collection
from typing import Any

from monitord.config.errors import Problem
from monitord.config.memory import check_memory
from monitord.config.schema import EMOTIONS, HA_BINARY_SENSOR_CLASSES, ID_PATTERN, Config, PublishConfig, RuleConfig, ServeConfig
from monitord.classmap import yamnet_class_names
from monitord.net import is_loopback, split_host_port
from monitord.secrets import TokenFileError, read_token, too_open


def _is_file(path: str) -> bool:
    """Path.is_file, False also where the path cannot even be looked at (a name too long for the
    file system raises there): the key is then reported as a missing file, not a traceback."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return False


def _is_dir(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def cross_check(config: Config) -> list[Problem]:
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
            if not _is_file(source.file):
                add(f"{where}.file", f"file not found: {source.file}")
        if source.device is not None and source.realtime:
            add(f"{where}.realtime", "only file and url sources take 'realtime' (devices are always real time)")
        if source.file is not None and source.retry:
            add(f"{where}.retry", "only device sources take 'retry'")

    window = config.window
    if window.hop_s > window.seconds:
        add("window.hop_s", f"hop ({window.hop_s} s) is longer than the window ({window.seconds} s): audio would be skipped; "
                            "shorten it or lengthen window.seconds")
    needed = window.seconds + max(window.hop_s, FILE_BLOCK_S)
    if config.pipeline.ring_seconds < needed - 1e-9:  # 1.3 + 0.1 is 1.4000000000000001
        add("pipeline.ring_seconds", f"must be at least {needed:g} s (window.seconds + the longer of window.hop_s "
                                     f"and the {FILE_BLOCK_S:g} s a file source decodes at a time)")
    if config.metrics.bind is not None:
        problem = _check_bind(config.metrics.bind, remote_ok=config.metrics.allow_remote,
                              remote_hint=": set metrics.allow_remote: true if you mean it")
        if problem:
            add("metrics.bind", problem)

    vocabularies: dict[str, tuple[str, ...]] = {}
    for name, model in config.models.items():
        labels, model_problems = model_vocabulary(name, model)
        problems.extend(model_problems)
        if labels is not None:
            vocabularies[name] = labels
    problems.extend(_check_cascades(config, vocabularies))
    for name, model in config.models.items():
        if model.kind == "examples":
            target = config.models.get(model.embedding_model)
            if target is None or target.kind not in ("yamnet", "clap"):
                add(f"models.{name}.embedding_model", f"{model.embedding_model!r} is not a yamnet or clap model of this config")
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
            add(f"{where}.release", f"release ({rule.release}) must not exceed threshold ({rule.threshold}): lower it or "
                                    f"raise {where}.threshold")
        if rule.min_windows > rule.of_windows:
            add(f"{where}.min_windows", f"min_windows ({rule.min_windows}) exceeds of_windows ({rule.of_windows}): lower it "
                                        f"or raise {where}.of_windows")
        if rule.is_frame_rule:
            problems.extend(_check_frame_rule(where, rule, config.models.get(rule.model)))
        rule_model = config.models.get(rule.model)
        if rule.not_like is not None and (rule.is_frame_rule or (rule_model is not None and rule_model.kind not in
                                                                 ("yamnet", "clap", "examples"))):
            add(f"{where}.not_like", "needs a window rule on a yamnet, clap or examples model (the window's embedding)")
        for j, source_id in enumerate(rule.sources or ()):
            if source_id not in seen_ids and source_id not in {s.id for s in config.sources}:
                add(f"{where}.sources.{j}", f"no source named {source_id!r}")

    for name in config.models:
        if not re.match(ID_PATTERN, name):
            add(f"models.{name}", f"{name!r} is not a valid model name: use letters, digits, '-' and '_'")

    problems.extend(_check_endpoint(config.publish))
    problems.extend(_check_inference(config))
    problems.extend(check_serve(config.serve))
    if config.http.bind is not None:
        problem = _check_bind(config.http.bind, remote_ok=config.http.token is not None,
                              remote_hint=" without a token: set http.token (16+ characters)")
        if problem:
            add("http.bind", problem)
    if isinstance(config.publish.scores, tuple):
        names = set(config.models) | {s.id for s in config.sources}
        for j, name in enumerate(config.publish.scores):
            if name not in names:
                add(f"publish.scores.{j}", f"{name!r} is neither a model nor a source")
    problems.extend(_check_mqtt(config))
    problems.extend(_check_notify(config))
    problems.extend(check_memory(config))
    curve = config.publish.curve
    if curve is not None:
        if not _is_file(curve.server_secret_key):
            add("publish.curve.server_secret_key", f"file not found: {curve.server_secret_key} (monitord keys DIR --name server)")
        if not _is_dir(curve.authorized_clients):
            add("publish.curve.authorized_clients", f"not a folder: {curve.authorized_clients}")
    return problems


def _check_frame_rule(where: str, rule: RuleConfig, model: Any) -> list[Problem]:
    key = f"{where}.{'hold_s' if rule.hold_s is not None else 'smooth_s'}"
    if model is None:
        return []  # the unknown model is reported already
    if getattr(model, "granularity", None) != "frame":
        if model.kind == "emotion":
            why = f"model {rule.model!r} scores whole windows (set models.{rule.model}.granularity: frame)"
        else:
            why = f"model {rule.model!r} is a {model.kind} model, which scores whole windows only"
        return [Problem(key, f"needs a frame-level model: {why}")]
    return [Problem(f"{where}.{key}", "a frame rule holds with hold_s, not min_windows/of_windows: drop them")
            for key in ("min_windows", "of_windows") if getattr(rule, key) != 1]


@functools.lru_cache(maxsize=4096)  # a YAML alias can repeat one list of unknown names a thousand times
def _unknown_label(label: str, vocabulary: tuple[str, ...], model: str) -> str | None:
    if label in vocabulary:
        return None
    close = difflib.get_close_matches(label, vocabulary, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{label!r} is not a label of model {model!r}{hint}"


FILE_BLOCK_S = 0.1
"""Seconds a file source decodes at a time. It waits for room for a whole block in its ring, and
the windowing stage frees a window's samples only once the window is whole: a ring shorter than a
window and a block holds them both up, for good."""

NEGATIVE = "not:"
"""How a bank names a rule's false alarms (``not:<rule>``, as monitord.teaching.bank does): no label
a rule can have may start so, or "yes, this" on it would teach another rule's false alarm, and that
rule's real sound alike would be suppressed."""


def _negative_name(label: str) -> str:
    return (f"{label!r} may not start with {NEGATIVE!r}: a not_like bank keeps a rule's false alarms under "
            f"'not:<rule id>', so \"yes, this\" on a rule with this label would teach another rule's false alarm")


def model_vocabulary(name: str, model: Any) -> tuple[tuple[str, ...] | None, list[Problem]]:
    """Every label a rule may name on this model, and any problems with the model's own names."""
    if model.kind == "clap":
        return model.labels, [Problem(f"models.{name}.labels", _negative_name(label)) for label in model.labels
                              if label.startswith(NEGATIVE)]
    if model.kind == "anomaly":
        return ("anomaly",), []
    if model.kind == "examples":
        duplicates = sorted(label for label, n in collections.Counter(model.labels).items() if n > 1)
        bad = [label for label in model.labels if not label.strip() or label.startswith(NEGATIVE)]
        return model.labels, ([Problem(f"models.{name}.labels", f"duplicate labels: {', '.join(duplicates)}")] if duplicates else []) + \
            [Problem(f"models.{name}.labels", f"{label!r} is not a label to teach (empty, or not:..., which names a rule's false alarms)")
             for label in bad]
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
        if group.startswith(NEGATIVE):
            problems.append(Problem(f"{where}.groups.{group}", _negative_name(group)))
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
    address = match.group(2)
    try:
        host, _ = split_host_port(address.replace(":*", ":1") if address.endswith(":*") else address)
    except ValueError:
        return [Problem(key, f"{endpoint!r}: expected tcp://HOST:PORT")]
    if not is_loopback(host) and not publish.allow_insecure_remote and publish.curve is None:
        return [
            Problem(
                key,
                f"binds a non-loopback address ({host}) without encryption: events would be readable on the "
                "network; bind 127.0.0.1, configure publish.curve, or set publish.allow_insecure_remote: true",
            )
        ]
    return []



def _check_bind(bind: str, remote_ok: bool, remote_hint: str) -> str | None:
    """What is wrong with an HTTP server's HOST:PORT, if anything."""
    try:
        host, _ = split_host_port(bind)
    except ValueError as exc:
        return str(exc)
    if not is_loopback(host) and not remote_ok:
        return f"binds a non-loopback address ({host}){remote_hint}"
    return None


# Inference on a Ray Serve application (monitord.serve): the capture node's section, and the
# server's own reading of a config (only its models and serve section).



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
    elif inference.token_file is None and not is_loopback(url.hostname):
        problems.append(Problem("inference.token_file", f"required: {url.hostname} is not a loopback address, and the "
                                                        "server refuses requests without its token"))
    seen: set[str] = set()
    for j, name in enumerate(inference.models):
        model = config.models.get(name)
        if model is None:
            close = difflib.get_close_matches(name, list(config.models), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (models: {', '.join(config.models)})"
            problems.append(Problem(f"inference.models.{j}", f"no model named {name!r}{hint}"))
        elif model.kind in ("anomaly", "examples"):
            problems.append(Problem(f"inference.models.{j}", f"{name!r} is an {model.kind} model: it runs on the capture node "
                                                             f"(its banks are local); list its embedding_model instead"))
        elif name in seen:
            problems.append(Problem(f"inference.models.{j}", f"{name!r} is listed twice"))
        seen.add(name)
    problems.extend(_check_token_file("inference.token_file", inference.token_file))
    if inference.ca_file is not None and not _is_file(inference.ca_file):
        problems.append(Problem("inference.ca_file", f"file not found: {inference.ca_file}"))
    return problems


def check_serve(serve: ServeConfig) -> list[Problem]:
    problems = _check_token_file("serve.token_file", serve.token_file)
    if (serve.ssl_certfile is None) != (serve.ssl_keyfile is None):
        problems.append(Problem("serve.ssl_keyfile" if serve.ssl_keyfile is None else "serve.ssl_certfile",
                                "give both ssl_certfile and ssl_keyfile, or neither"))
    for key in ("ssl_certfile", "ssl_keyfile"):
        path = getattr(serve, key)
        if path is not None and not _is_file(path):
            problems.append(Problem(f"serve.{key}", f"file not found: {path}"))
    return problems


def _check_token_file(key: str, path: str | None) -> list[Problem]:
    if path is None:
        return []
    try:
        read_token(path)
    except TokenFileError as exc:
        return [Problem(key, str(exc))]
    return []


def config_warnings(config: Config) -> list[Problem]:
    """What is allowed but unwise: an MQTT broker reached in clear text, secrets others can read."""
    warnings: list[Problem] = []
    mqtt = config.publish.mqtt
    if mqtt is not None and mqtt.allow_insecure and mqtt.tls is None and not is_loopback(mqtt.host):
        warnings.append(Problem("publish.mqtt.allow_insecure", f"events{' and the password' if mqtt.username else ''} "
                                f"go to {mqtt.host} in clear text: anyone on the network can read them"))
    for key, path in _secret_files(config):
        reason = too_open(path)
        if reason:
            warnings.append(Problem(key, reason))
    return warnings


def _secret_files(config: Config) -> list[tuple[str, str]]:
    """(key, path) of every configured file that holds a secret."""
    mqtt, curve, inference, serve = config.publish.mqtt, config.publish.curve, config.inference, config.serve
    files = [
        ("publish.mqtt.password_file", mqtt and mqtt.password_file),
        ("publish.mqtt.tls.key", mqtt and mqtt.tls and mqtt.tls.key),
        ("publish.curve.server_secret_key", curve and curve.server_secret_key),
        ("inference.token_file", inference and inference.token_file),
        ("serve.token_file", serve.token_file),
        ("serve.ssl_keyfile", serve.ssl_keyfile),
        *((f"notify.{i}.url_file", n.url_file) for i, n in enumerate(config.notify)),
    ]
    return [(key, path) for key, path in files if path]


def inactive_without(config: Config, absent: set[str], loading: Collection[str] = ()) -> tuple[dict[str, str], dict[str, str]]:
    """What cannot work while the models in ``absent`` are not loaded: {model: why} for the absent
    models and those built on them (cascades gated by one, anomaly models on its embeddings), and
    {rule id: why} for the rules on any of those. Absent models in ``loading`` are said to be
    loading (in the background, after the start) instead of not loaded."""
    def state(name: str) -> str:
        return ("loading" if name in loading else "not loaded") if name in absent else "inactive"

    models: dict[str, str] = {name: state(name) for name in absent if name in config.models}

    changed = True
    while changed:
        changed = False
        for name, model in config.models.items():
            if name in models:
                continue
            gate = model.gated_by.model if model.gated_by is not None else None
            if gate in models:
                models[name] = f"gated by {gate}, which is {state(gate)}"
            elif model.kind in ("anomaly", "examples") and model.embedding_model in models:
                models[name] = f"scores the embeddings of {model.embedding_model}, which is {state(model.embedding_model)}"
            else:
                continue
            changed = True
    rules = {rule.id: f"model {rule.model} is {models[rule.model]}" for rule in config.rules if rule.model in models}
    return models, rules


def extra_missing(module: str) -> bool:
    """Whether an optional dependency (an extra) is not installed."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


MQTT_RESERVED_IDS = ("level", "status", "state")
"""Rule ids that would share a topic with a source's level or status topic."""


def _check_mqtt(config: Config) -> list[Problem]:
    mqtt = config.publish.mqtt
    if mqtt is None:
        return []
    where = "publish.mqtt"
    problems = []
    if extra_missing("paho.mqtt"):
        problems.append(Problem(where, "needs paho-mqtt, which is not installed: pip install 'monitord[mqtt]'"))
    if mqtt.password_file is not None:
        if mqtt.username is None:
            problems.append(Problem(f"{where}.password_file", "give username too"))
        if not _is_file(mqtt.password_file):
            problems.append(Problem(f"{where}.password_file", f"file not found: {mqtt.password_file}"))
    if mqtt.tls is None and not mqtt.allow_insecure and not is_loopback(mqtt.host):
        problems.append(Problem(f"{where}.host", f"{mqtt.host} is not a loopback address and the connection has no TLS: "
                                "events (and the password) would cross the network in clear text; configure "
                                f"{where}.tls, or set {where}.allow_insecure: true if you mean it"))
    if mqtt.tls is not None:
        for key in ("ca", "cert", "key"):
            path = getattr(mqtt.tls, key)
            if path is not None and not _is_file(path):
                problems.append(Problem(f"{where}.tls.{key}", f"file not found: {path}"))
        if (mqtt.tls.cert is None) != (mqtt.tls.key is None):
            problems.append(Problem(f"{where}.tls", "give cert and key together"))
    rule_ids = [r.id for r in config.rules]
    for rule, device_class in mqtt.device_classes.items():
        if rule not in rule_ids:
            close = difflib.get_close_matches(rule, rule_ids, n=1, cutoff=0.5)
            problems.append(Problem(f"{where}.device_classes.{rule}", f"no rule named {rule!r}" + (f"; did you mean {close[0]!r}?" if close else "")))
        if device_class not in HA_BINARY_SENSOR_CLASSES:
            close = difflib.get_close_matches(device_class, HA_BINARY_SENSOR_CLASSES, n=1, cutoff=0.5)
            problems.append(Problem(f"{where}.device_classes.{rule}", f"{device_class!r} is not a Home Assistant binary_sensor "
                                    "device class" + (f"; did you mean {close[0]!r}?" if close else "")))
    if mqtt.discovery:  # Home Assistant object ids are "<source>_<rule>": two pairs may spell the same one
        sources = [s.id for s in config.sources]
        seen: dict[str, tuple[str, str]] = {}
        for rule in config.rules:
            for source in rule.sources or sources:
                object_id = f"{source}_{rule.id}"
                other = seen.setdefault(object_id, (source, rule.id))
                if other != (source, rule.id):
                    problems.append(Problem(f"{where}.discovery", f"source {source!r} with rule {rule.id!r} and source "
                                            f"{other[0]!r} with rule {other[1]!r} would be one Home Assistant entity "
                                            f"({object_id}): rename one of them"))
    for i, rule in enumerate(config.rules):
        if rule.id in MQTT_RESERVED_IDS:
            problems.append(Problem(f"rules.{i}.id", f"{rule.id!r} is taken by an MQTT topic of each source "
                                    f"({mqtt.topic_prefix}/<source>/{rule.id}): pick another id"))
    return problems


def _check_notify(config: Config) -> list[Problem]:
    problems = []
    rule_ids = [r.id for r in config.rules]
    if config.notify and extra_missing("apprise"):
        problems.append(Problem("notify", "needs apprise, which is not installed: pip install 'monitord[notify]'"))
    for i, target in enumerate(config.notify):
        where = f"notify.{i}"
        if (target.url is None) == (target.url_file is None):
            problems.append(Problem(where, "give exactly one of 'url' or 'url_file'"))
        if target.url_file is not None and not _is_file(target.url_file):
            problems.append(Problem(f"{where}.url_file", f"file not found: {target.url_file}"))
        if target.url is not None and not extra_missing("apprise"):
            if not _apprise_accepts(target.url):
                problems.append(Problem(f"{where}.url", "not an Apprise URL that this Apprise supports "
                                        "(see https://github.com/caronc/apprise/wiki)"))
        for j, rule in enumerate(target.rules or ()):
            if rule not in rule_ids:
                close = difflib.get_close_matches(rule, rule_ids, n=1, cutoff=0.5)
                problems.append(Problem(f"{where}.rules.{j}", f"no rule named {rule!r}" + (f"; did you mean {close[0]!r}?" if close else "")))
        if target.attach_clip and not config.clips.enabled:
            problems.append(Problem(f"{where}.attach_clip", "needs clips.enabled: true (no clip is written otherwise)"))
        try:
            target.title.format(rule="r", source="s", label="l", host="h")
        except (KeyError, IndexError, ValueError) as exc:
            problems.append(Problem(f"{where}.title", f"not a valid template ({exc}); use {{rule}}, {{source}}, {{label}}, {{host}}"))
    return problems


def _apprise_accepts(url: str) -> bool:
    """Whether Apprise knows what to do with a URL (its own complaint stays out of the output)."""
    import logging

    import apprise

    logger = logging.getLogger("apprise")
    level, logger.level = logger.level, logging.CRITICAL
    try:
        return bool(apprise.Apprise().add(url))
    finally:
        logger.setLevel(level)
