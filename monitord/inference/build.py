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
from monitord.inference.models import Model, ModelUnavailable, build_model, check_weights
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

    on_embeddings = ON_EMBEDDINGS
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
            models.unavailable[name] = _without_embedder(name, m, models.unavailable[m.embedding_model])
            continue
        try:
            models[name] = _on_embeddings(config, name, models[m.embedding_model])
        except ModelUnavailable as exc:
            if not m.optional:
                raise
            log.debug("optional model %s not loaded: %s", name, exc)  # said once, by whoever reports it (daemon: a warning with the fix)
            models.unavailable[name] = exc
    return models


ON_EMBEDDINGS = ("anomaly", "examples")
"""Kinds that score another model's embeddings (built after it, on it)."""


def _on_embeddings(config: Config, name: str, embedder: Model) -> Model:
    m = config.models[name]
    if m.kind == "examples":
        from monitord.inference.models.examples import ExamplesModel

        return ExamplesModel(name, m, embedder, config.window.seconds)
    from monitord.inference.models.anomaly import AnomalyDetector

    return AnomalyDetector(name, m, embedder, config.window.seconds, config.window.hop_s)


def _without_embedder(name: str, m, reason: ModelUnavailable | None) -> ModelUnavailable:
    return ModelUnavailable(f"model {name}: its embedding model {m.embedding_model} is not loaded",
                            missing=f"its embedding model {m.embedding_model}", fix=reason.fix if reason else None)


def load_later(config: Config) -> list[str]:
    """The optional models ``monitord run`` loads after the start, on a background thread, in the order
    to load them (models on embeddings after the model they read): the local optional ones that no
    model loaded before the start builds on. None where a source is a file read as fast as it is
    scored (it is judged whole with every model, so all are loaded first)."""
    if any(s.file is not None and not s.realtime for s in config.sources):
        return []
    remote = set(config.inference.models) if config.inference is not None else set()
    later = {n for n, m in config.models.items() if m.optional and n not in remote}
    changed = True
    while changed:  # what a model loaded first builds on is loaded first too
        changed = False
        for name, m in config.models.items():
            if name not in later and m.kind in ON_EMBEDDINGS and m.embedding_model in later:
                later.discard(m.embedding_model)
                changed = True
    first = [n for n, m in config.models.items() if n in later and m.kind not in ON_EMBEDDINGS]
    return first + [n for n, m in config.models.items() if n in later and m.kind in ON_EMBEDDINGS]


def check_later(config: Config, names: list[str], unavailable: dict[str, ModelUnavailable]) -> list[str]:
    """Of the models to load later, those that may load: the others (their files surely absent, found
    without importing torch or transformers, or built on one of those) go into ``unavailable`` with
    their reason, as ``load_models`` would put them."""
    pending = []
    for name in names:
        m = config.models[name]
        if m.kind in ON_EMBEDDINGS:
            if m.embedding_model in unavailable:
                unavailable[name] = _without_embedder(name, m, unavailable[m.embedding_model])
                continue
        else:
            try:
                check_weights(m, probe=False)  # the hub's probe (seconds, where it hangs) is the background load's
            except ModelUnavailable as exc:
                log.debug("optional model %s not loaded: %s", name, exc)
                unavailable[name] = exc
                continue
        pending.append(name)
    return pending


def load_one(config: Config, name: str, loaded: Mapping[str, Model],
             unavailable: Mapping[str, ModelUnavailable] | None = None) -> Model:
    """Build one configured model, a model on embeddings on the one of ``loaded`` it reads
    (ModelUnavailable where that is not loaded; ``unavailable``: why): the background load of ``monitord run``."""
    m = config.models[name]
    if m.kind not in ON_EMBEDDINGS:
        return build_model(name, m)
    if m.embedding_model not in loaded:
        raise _without_embedder(name, m, (unavailable or {}).get(m.embedding_model))
    return _on_embeddings(config, name, loaded[m.embedding_model])


def model_inputs(config: Config, models: Mapping[str, Model]) -> dict[str, ModelInput]:
    """What the windowing stage needs of each model: its rate and its own gate."""
    return {name: ModelInput(model.sample_rate, config.models[name].gate if name in config.models else None)
            for name, model in models.items()}
