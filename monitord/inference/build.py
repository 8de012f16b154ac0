"""Build the models a config names: the one place that does (the daemon, ``classify``, ``teach``,
``eval``, ``serve`` and ``bench`` all call it).

``load_models`` builds each configured model (remote ones as clients of a ``monitord serve``
application), models on embeddings (anomaly, examples) last on the model they read; an optional
model that cannot be loaded is left out with its reason. ``model_inputs`` is what the windowing
stage needs of each model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from monitord.config import Config
from monitord.inference.models import Model, ModelUnavailable, build_model
from monitord.windowing.tiling import ModelInput

log = logging.getLogger(__name__)


class LoadedModels(dict):
    """The models that loaded, by name; ``unavailable``: the optional ones that could not be, and why."""

    def __init__(self, models: Mapping[str, Model] = (), unavailable: Mapping[str, ModelUnavailable] | None = None):
        super().__init__(models)
        self.unavailable: dict[str, ModelUnavailable] = dict(unavailable or {})


def load_models(config: Config, only: set[str] | None = None) -> LoadedModels:
    """Build the configured models (or ``only`` these). A required model that cannot be loaded
    raises ModelUnavailable with a readable reason; an ``optional`` one is left out and its reason
    kept in ``unavailable`` (with those of the models that cannot work without it). Anomaly models
    are built last, on the embedding model they use."""
    from monitord.inference.models.anomaly import AnomalyDetector

    wanted = {n: m for n, m in config.models.items() if only is None or n in only}
    models = LoadedModels()
    remote = set(config.inference.models) if config.inference is not None else set()

    def build(name: str) -> None:
        try:
            if name in remote:  # scored by a `monitord serve` application; no weights here
                from monitord.inference.remote import RemoteModel

                models[name] = RemoteModel(name, config.models[name], config.inference)
            else:
                models[name] = build_model(name, config.models[name])
        except ModelUnavailable as exc:
            if not config.models[name].optional:
                raise
            log.debug("optional model %s not loaded: %s", name, exc)  # said once, by whoever reports it (daemon: a warning with the fix)
            models.unavailable[name] = exc

    on_embeddings = ("anomaly", "examples")
    for name, m in wanted.items():
        if m.kind not in on_embeddings:
            build(name)
    for name, m in wanted.items():
        if m.kind not in on_embeddings:
            continue
        if m.embedding_model not in models and m.embedding_model not in models.unavailable:
            build(m.embedding_model)
        if m.embedding_model in models.unavailable:
            if not m.optional:
                raise models.unavailable[m.embedding_model]
            models.unavailable[name] = ModelUnavailable(
                f"model {name}: its embedding model {m.embedding_model} is not loaded",
                missing=f"its embedding model {m.embedding_model}", fix=models.unavailable[m.embedding_model].fix)
            continue
        try:
            if m.kind == "examples":
                from monitord.inference.models.examples import ExamplesModel

                models[name] = ExamplesModel(name, m, models[m.embedding_model], config.window.seconds)
            else:
                models[name] = AnomalyDetector(name, m, models[m.embedding_model], config.window.seconds, config.window.hop_s)
        except ModelUnavailable as exc:
            if not m.optional:
                raise
            log.debug("optional model %s not loaded: %s", name, exc)  # said once, by whoever reports it (daemon: a warning with the fix)
            models.unavailable[name] = exc
    return models


def model_inputs(config: Config, models: Mapping[str, Model]) -> dict[str, ModelInput]:
    """What the windowing stage needs of each model: its rate and its own gate."""
    return {name: ModelInput(model.sample_rate, config.models[name].gate if name in config.models else None)
            for name, model in models.items()}
