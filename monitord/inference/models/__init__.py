"""Models behind one narrow interface: ``score(windows) -> list[Scores]``.

torch and transformers are imported only when a model is built, so the CLI and config
checks start fast.
"""

from __future__ import annotations

from monitord.inference.models.base import LabelsFixed, Model, ModelBase, ModelUnavailable


def build_model(name: str, config) -> Model:
    """The model a config entry describes, loaded and ready."""
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


__all__ = ["LabelsFixed", "Model", "ModelBase", "ModelUnavailable", "build_model"]
