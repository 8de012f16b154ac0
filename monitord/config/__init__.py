"""YAML configuration: parsed, validated and frozen before anything starts.

Every problem is reported as ``path.to.key: what is wrong (line N)``; the daemon and
``check-config`` exit with status 2 when there is any.

- ``schema``: the sections and keys (pydantic models, frozen, unknown keys refused);
- ``errors``: pydantic's and YAML's errors mapped to key paths and lines, with "did you mean";
- ``checks``: what spans keys (labels against vocabularies, cascades, addresses, files).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError

from monitord.config.checks import check_serve, config_warnings, cross_check, inactive_without, model_vocabulary, yamnet_class_names  # noqa: F401 (re-exported)
from monitord.config.errors import ConfigError, Problem, error_path, line_of, merge, problem_from_pydantic
from monitord.config.schema import *  # noqa: F401,F403  (the public names of every section)
from monitord.config.schema import BUILTIN, BUILTIN_REFERENCES, ID_PATTERN, Config, ModelConfig, ServeConfig, _Strict
from monitord.secrets import too_open

log = logging.getLogger(__name__)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and resolve a YAML config file; raises ConfigError."""
    path = Path(path)
    config = parse_config(_read(path), base_dir=path.resolve().parent)
    if config.http.token is not None and (reason := too_open(path)):  # the config file itself holds a secret
        log.warning("%s", Problem("http.token", f"the token is written in the config, and {reason}"))
    return config


MAX_CONFIG_BYTES = 8 * 2**20
"""A config file past this is refused, not read (/dev/zero, a log given by mistake): a real one is KBs."""
MAX_PROBLEMS = 100
"""Problems a refused config lists; a YAML alias repeated a thousand times can make a million."""


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError([Problem("config", f"{path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a config file")])
        return data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem("config", f"file not found: {path}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("config", f"cannot read {path}: {exc}")]) from None


def _compose(text: str) -> tuple[yaml.Node | None, Any]:
    """The YAML's node tree (for line numbers) and its data; ConfigError for invalid YAML or a
    key given twice in one mapping (YAML would keep the last silently)."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            duplicates = duplicate_keys(root)
            if duplicates:
                raise ConfigError(duplicates)
            return root, None if root is None else loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem("config", f"invalid YAML: {problem}", line)]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError([Problem("config", "invalid YAML: collections nested too deeply")]) from None


MERGE_TAG = "tag:yaml.org,2002:merge"


def duplicate_keys(node: yaml.Node | None, path: str = "", seen: set[int] | None = None) -> list[Problem]:
    """``path.key: duplicate key 'key' (line N; first at line M)`` for every key that a mapping
    holds twice, at any depth. Merge keys (``<<``) are not duplicates: a key written beside one
    overrides the merged value, as YAML intends."""
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:  # an alias is checked once, where its anchor is
        return []
    seen.add(id(node))
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            if key.tag == MERGE_TAG or not isinstance(key, yaml.ScalarNode):
                continue
            where = f"{path}.{key.value}" if path else str(key.value)
            line = key.start_mark.line + 1
            if key.value in first:
                problems.append(Problem(where, f"duplicate key {key.value!r} (line {line}; first at line {first[key.value]})"))
            else:
                first[key.value] = line
            problems.extend(duplicate_keys(value, where, seen))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems.extend(duplicate_keys(item, f"{path}.{i}" if path else str(i), seen))
    return problems


def parse_config(text: str, base_dir: Path) -> Config:
    root_node, data = _compose(text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("config", f"top level must be a mapping of sections, not {type(data).__name__}")])
    nul = _with_nul(data)
    if nul:  # no path, name or URL holds one: the OS refuses it wherever it comes to be used (ValueError)
        raise ConfigError([Problem(where, "a NUL character (\\0) in a value", line_of(root_node, where)) for where in nul])

    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A list whose item failed also reports itself "too short": the item's error says it all.
        paths = {error_path(err) for err in errors}
        errors = [e for e in errors if not (e["type"] == "too_short" and any(p.startswith(error_path(e) + ".") for p in paths))]
        raise ConfigError(merge([problem_from_pydantic(err, root_node) for err in errors])) from None

    config = _resolve_paths(config, base_dir)
    problems = cross_check(config)
    if problems:
        shown = [Problem(p.path, p.message, line_of(root_node, p.path)) for p in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            shown.append(Problem("config", f"and {len(problems) - MAX_PROBLEMS} more problems (the first {MAX_PROBLEMS} "
                                           f"are above)"))
        raise ConfigError(shown)
    for warning in config_warnings(config):
        log.warning("%s", Problem(warning.path, warning.message, line_of(root_node, warning.path)))
    return config


def _resolve(base_dir: Path, value: str) -> str:
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def state_dir() -> Path:
    """Where monitord keeps what it writes (event log, clips, MQTT state) when the config does not
    say: systemd's ``$STATE_DIRECTORY`` (``StateDirectory=monitord``), else the XDG state
    directory, ``$XDG_STATE_HOME/monitord`` (``~/.local/state/monitord`` by default)."""
    systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd and Path(systemd).is_absolute():  # systemd's always is; a relative one would follow the working directory
        return Path(systemd)
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"  # the spec ignores a relative one
    return base / "monitord"


def _with_nul(data: Any, path: str = "", seen: set[int] | None = None) -> list[str]:
    """The dotted paths of the strings (values or keys) in ``data`` holding a NUL character."""
    seen = set() if seen is None else seen
    if id(data) in seen:  # an alias: checked where its anchor is
        return []
    seen.add(id(data))
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and "\0" in key:
                found.append(where)
            found += _with_nul(value, where, seen)
    elif isinstance(data, list):
        for i, item in enumerate(data):
            found += _with_nul(item, f"{path}.{i}" if path else str(i), seen)
    elif isinstance(data, str) and "\0" in data:
        found.append(path)
    return found


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long to look up, a NUL byte: no local folder
        return False


def _state_path(section: _Strict, key: str, base_dir: Path) -> str | None:
    """A path monitord writes: as the config gives it (relative: to the config's folder), or, when
    the config leaves the key out, its default name in the state directory (never the config's
    folder, which may be a checkout or /etc)."""
    value = getattr(section, key)
    if key not in section.model_fields_set and value is not None:
        return str(state_dir() / value)
    return None if value is None else _resolve(base_dir, value)


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    sources = tuple(
        s.model_copy(update={"file": _resolve(base_dir, s.file)}) if s.file is not None else s for s in config.sources
    )
    models = {name: _resolve_model(model, base_dir) for name, model in config.models.items()}
    rules = tuple(r.model_copy(update={"not_like": _resolve_not_like(r, base_dir)}) if r.not_like is not None else r
                  for r in config.rules)
    clips = config.clips.model_copy(update={"dir": _state_path(config.clips, "dir", base_dir)})
    publish = config.publish.model_copy(update={"event_log": _state_path(config.publish, "event_log", base_dir)})
    if publish.curve is not None:
        curve = publish.curve.model_copy(update={
            "server_secret_key": _resolve(base_dir, publish.curve.server_secret_key),
            "authorized_clients": _resolve(base_dir, publish.curve.authorized_clients),
        })
        publish = publish.model_copy(update={"curve": curve})
    mqtt = publish.mqtt
    if mqtt is not None:
        tls = mqtt.tls
        if tls is not None:
            tls = tls.model_copy(update={k: _resolve(base_dir, getattr(tls, k)) for k in ("ca", "cert", "key")
                                         if getattr(tls, k) is not None})
        update = {"tls": tls}
        if mqtt.password_file is not None:
            update["password_file"] = _resolve(base_dir, mqtt.password_file)
        publish = publish.model_copy(update={"mqtt": mqtt.model_copy(update=update)})
    notify = tuple(n.model_copy(update={"url_file": _resolve(base_dir, n.url_file)}) if n.url_file is not None else n
                   for n in config.notify)
    inference = config.inference
    if inference is not None:
        inference = inference.model_copy(update={k: _resolve(base_dir, getattr(inference, k)) for k in ("token_file", "ca_file")
                                                 if getattr(inference, k) is not None})
    notify = tuple(n.model_copy(update={"url_file": _resolve(base_dir, n.url_file)}) if n.url_file is not None else n
                   for n in config.notify)
    return config.model_copy(update={"sources": sources, "models": models, "rules": rules, "publish": publish, "clips": clips,
                                     "inference": inference, "serve": _resolve_serve(config.serve, base_dir), "notify": notify})


def _resolve_not_like(rule: Any, base_dir: Path) -> Any:
    """The bank as a path monitord writes: relative to the config's folder, or, left out,
    ``taught-<model>.npz`` in the state directory (one bank per embedding model: the rules of one
    model share it); a reference of one's own relative to the config's folder."""
    not_like = rule.not_like
    reference = not_like.reference
    if reference is not None and reference not in BUILTIN_REFERENCES:
        reference = _resolve(base_dir, reference)
    bank = _resolve(base_dir, not_like.bank) if "bank" in not_like.model_fields_set else \
        str(state_dir() / f"taught-{rule.model}.npz")
    return not_like.model_copy(update={"bank": bank, "reference": reference})


def _resolve_model(model: Any, base_dir: Path) -> Any:
    if model.kind == "examples":
        return model.model_copy(update={"bank": _resolve(base_dir, model.bank)})
    if model.kind == "anomaly":
        return model.model_copy(update={
            "bank": None if model.bank is None else _resolve(base_dir, model.bank),
            "banks": {source: _resolve(base_dir, path) for source, path in model.banks.items()},
        })
    if model.kind == "yamnet" and model.model == BUILTIN:
        local, looks_like_path = None, False
    else:
        local = Path(_resolve(base_dir, model.model))
        looks_like_path = model.kind == "yamnet" or model.model.startswith((".", "/", "~")) or _exists(local)
    update: dict[str, Any] = {"model": str(local)} if looks_like_path else {}
    if getattr(model, "class_map", None) is not None:
        update["class_map"] = _resolve(base_dir, model.class_map)
    return model.model_copy(update=update)


def _resolve_serve(serve: ServeConfig, base_dir: Path) -> ServeConfig:
    keys = ("token_file", "ssl_certfile", "ssl_keyfile")
    return serve.model_copy(update={k: _resolve(base_dir, getattr(serve, k)) for k in keys if getattr(serve, k) is not None})


class ServeFile(_Strict):
    """What ``monitord serve`` reads from a config: its models and its serve section. A capture
    node's config may be served as it is: its other sections are not read here."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=False)
    models: dict[str, ModelConfig] = Field(min_length=1)
    serve: ServeConfig = ServeConfig()


def load_serve_config(path: str | os.PathLike[str]) -> ServeFile:
    """The models and serve section of a config file, validated and resolved; raises ConfigError."""
    path = Path(path)
    root_node, data = _compose(_read(path))
    if not isinstance(data, dict):
        raise ConfigError([Problem("config", "top level must be a mapping of sections with a models: section")])
    try:
        served = ServeFile.model_validate({k: v for k, v in data.items() if k in ("models", "serve")})
    except ValidationError as exc:
        raise ConfigError(merge([problem_from_pydantic(err, root_node) for err in exc.errors()])) from None
    base_dir = path.resolve().parent
    served = served.model_copy(update={
        "models": {name: _resolve_model(m, base_dir) for name, m in served.models.items()},
        "serve": _resolve_serve(served.serve, base_dir),
    })
    problems = []
    for name, model in served.models.items():
        if not re.match(ID_PATTERN, name):
            problems.append(Problem(f"models.{name}", f"{name!r} is not a valid model name: use letters, digits, '-' and '_'"))
        problems.extend(model_vocabulary(name, model)[1])
    if all(m.kind == "anomaly" for m in served.models.values()):
        problems.append(Problem("models", "nothing to serve: anomaly models run on capture nodes (serve their embedding model)"))
    problems.extend(check_serve(served.serve))
    if problems:
        raise ConfigError([Problem(p.path, p.message, line_of(root_node, p.path)) for p in problems])
    for key in ("token_file", "ssl_keyfile"):
        path = getattr(served.serve, key)
        if path is not None and (reason := too_open(path)):
            log.warning("%s", Problem(f"serve.{key}", reason, line_of(root_node, f"serve.{key}")))
    return served
