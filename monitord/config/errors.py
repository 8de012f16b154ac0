"""Turning pydantic's and YAML's complaints into ``path.to.key: what is wrong (line N)``, with "did you mean"."""

from __future__ import annotations

import difflib
import reprlib
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from monitord.config.schema import (
    MODEL_KINDS, AnomalyModelConfig, CascadeConfig, ExamplesModelConfig, ClapModelConfig, ClipsConfig, Config, CurveConfig, EmotionModelConfig,
    GateConfig, HttpConfig, InferenceConfig, MetricsConfig, PipelineConfig, PublishConfig, RuleConfig, ServeConfig, SourceConfig, WindowConfig,
    YamnetModelConfig,
)


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


def merge(problems: list[Problem]) -> list[Problem]:
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


def error_path(err: dict[str, Any]) -> str:
    return ".".join(str(part) for part in _loc(err)) or "config"


def problem_from_pydantic(err: dict[str, Any], root_node: yaml.Node | None) -> Problem:
    loc = _loc(err)
    path = error_path(err)
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
    return Problem(path, message, line_of(root_node, path))


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60
"""Bounded: a YAML alias bomb is a small text whose data, written out whole, would not fit in memory."""


def _short(value: Any) -> str:
    text = _REPR.repr(value)
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
    "examples": ExamplesModelConfig,
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
        section = next((k for k in ("yamnet", "emotion", "anomaly", "examples") if k in raw_loc), "models")
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


def line_of(root_node: yaml.Node | None, dotted: str) -> int | None:
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
