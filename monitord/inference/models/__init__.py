"""Models behind one narrow interface: ``score(windows) -> list[Scores]``.

torch and transformers are imported only when a model is built, so the CLI and config
checks start fast.
"""

from __future__ import annotations

from monitord.inference.models.base import LabelsFixed, Model, ModelBase, ModelUnavailable


FIRST_LOADED = {"clap": "CLAP processor", "emotion": "emotion feature extractor"}
"""What each kind that reads a checkpoint loads first (what a ModelUnavailable about its files names)."""


def check_weights(config, probe: bool = True) -> None:
    """Raise the ModelUnavailable that building ``config``'s model would, where that is sure without
    importing torch or transformers (a directory that is not there; an id not in the Hugging Face
    cache, offline or, with ``probe``, with the hub unreachable). A few milliseconds; a second or
    more only where it probes the hub."""
    if config.kind in FIRST_LOADED:
        from monitord.inference.models.loading import check_available

        check_available(config.model, FIRST_LOADED[config.kind], probe=probe)


def build_model(name: str, config) -> Model:
    """The model a config entry describes, loaded and ready (ModelUnavailable, before torch and
    transformers are imported where it can be, when its files are not there)."""
    check_weights(config)
    if config.kind == "clap":
        from monitord.inference.models.clap import ClapZeroShot

        return ClapZeroShot(name, config)
    if config.kind == "emotion":
        from monitord.inference.models.emotion import EmotionClassifier

        return EmotionClassifier(name, config)
    if config.kind == "yamnet":
        from monitord.inference.models.yamnet import YamnetClassifier

        return YamnetClassifier(name, config)
    raise ValueError(f"unknown model kind {config.kind!r}")


__all__ = ["LabelsFixed", "Model", "ModelBase", "ModelUnavailable", "build_model", "check_weights"]
