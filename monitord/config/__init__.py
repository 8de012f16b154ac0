"""YAML configuration: parsed, validated and frozen before anything starts.

Every problem is reported as ``path.to.key: what is wrong (line N)``; the daemon and
``check-config`` exit with status 2 when there is any.

- ``schema``: the sections and keys (pydantic models, frozen, unknown keys refused);
- ``errors``: pydantic's and YAML's errors mapped to key paths and lines, with "did you mean";
- ``checks``: what spans keys (labels against vocabularies, cascades, addresses, files).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError

from monitord.config.checks import check_serve, cross_check, inactive_without, model_vocabulary, yamnet_class_names  # noqa: F401 (re-exported)
from monitord.config.errors import ConfigError, Problem, error_path, line_of, merge, problem_from_pydantic
from monitord.config.schema import *  # noqa: F401,F403  (the public names of every section)
from monitord.config.schema import BUILTIN, ID_PATTERN, Config, ModelConfig, ServeConfig, _Strict


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and resolve a YAML config file; raises ConfigError."""
    path = Path(path)
    return parse_config(_read(path), base_dir=path.resolve().parent)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem("config", f"file not found: {path}")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("config", f"cannot read {path}: {exc}")]) from None


def _compose(text: str) -> tuple[yaml.Node | None, Any]:
    """The YAML's node tree (for line numbers) and its data; ConfigError for invalid YAML."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem("config", f"invalid YAML: {problem}", line)]) from None


def parse_config(text: str, base_dir: Path) -> Config:
    root_node, data = _compose(text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("config", f"top level must be a mapping of sections, not {type(data).__name__}")])

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
        raise ConfigError([Problem(p.path, p.message, line_of(root_node, p.path)) for p in problems])
    return config


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
    return config.model_copy(update={"sources": sources, "models": models, "publish": publish, "clips": clips,
                                     "inference": inference, "serve": _resolve_serve(config.serve, base_dir), "notify": notify})


def _resolve_model(model: Any, base_dir: Path) -> Any:
    if model.kind == "anomaly":
        return model.model_copy(update={
            "bank": None if model.bank is None else _resolve(base_dir, model.bank),
            "banks": {source: _resolve(base_dir, path) for source, path in model.banks.items()},
        })
    if model.kind == "yamnet" and model.model == BUILTIN:
        local, looks_like_path = None, False
    else:
        local = Path(_resolve(base_dir, model.model))
        looks_like_path = model.kind == "yamnet" or model.model.startswith((".", "/", "~")) or local.exists()
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
    return served
