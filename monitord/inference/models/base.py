"""The contract between the inference stage and a model, declared once.

Every model kind (CLAP, speech emotion, YAMNet, anomaly, a remote model) implements ``Model``;
``ModelBase`` gives the defaults most of them want, from their config entry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from monitord.types import Scores, Window

if TYPE_CHECKING:
    from monitord.config import CascadeConfig


class ModelUnavailable(Exception):
    """Weights or processor files cannot be found; the message says where to get them.

    ``missing`` says in a few words what is not there, ``fix`` the command (or config change) that
    provides it: an optional model's status event carries both."""

    def __init__(self, message: str, missing: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.missing = missing
        self.fix = fix


class LabelsFixed(Exception):
    """The model's labels cannot be changed (they are fixed by its checkpoint or its kind)."""


@runtime_checkable
class Model(Protocol):
    name: str
    """The model's name in the config."""
    model_id: str
    """HF id or local path the weights came from."""
    sample_rate: int
    """The rate its windows are resampled to (0: it scores embeddings, not audio)."""
    labels: tuple[str, ...]
    batch_max: int
    batch_wait_ms: float
    gated_by: CascadeConfig | None
    """Score only windows where another model's listed labels reached a threshold."""
    depends_on: str | None
    """A model whose Scores (its embedding) this one scores from, e.g. anomaly on CLAP."""
    device: str
    """Where it runs: "cpu", "cuda", "cuda:1", or "remote"."""

    def score(self, windows: Sequence[Window], upstream: Sequence[Scores] | None = None) -> list[Scores]:
        """One Scores per window, in order; ``upstream`` (aligned with ``windows``) holds the
        ``depends_on`` model's Scores. Raises on failure (the stage splits the batch and retries)."""
        ...

    def accepts(self, window: Window) -> bool:
        """Whether this model has anything to say about the window (an anomaly model without a
        bank for its source has not)."""
        ...

    def prepare_labels(self, labels: Sequence[str], prompt: str) -> Any:
        """The expensive part of changing labels (text embeddings), done off the inference thread;
        raises LabelsFixed where labels are fixed."""
        ...

    def use_labels(self, prepared: Any) -> None:
        """Swap to prepared labels: cheap, done by the inference thread between two batches."""
        ...

    def fall_back_to_cpu(self) -> None:
        """Move to the CPU after repeated failures on an accelerator (no-op on the CPU)."""
        ...


class ModelBase:
    """Defaults for the parts of ``Model`` most kinds do not need, and the settings every kind
    carries over from its config entry (batching, cascade)."""

    depends_on: str | None = None
    device: str = "cpu"
    weights_path: str | None = None
    """The directory or file the weights were loaded from; None: not from local files (a hub id, remote)."""
    weights_fingerprint: str | None = None
    """How those files looked just before they were read (``folder_fingerprint``)."""

    def __init__(self, name: str, config: Any):
        self.name = name
        self.batch_max: int = config.batch_max
        self.batch_wait_ms: float = config.batch_wait_ms
        self.gated_by = config.gated_by

    def note_weights(self, path: str) -> None:
        """Remember how the files at ``path`` look before they are read (see ``weights_changed``)."""
        self.weights_fingerprint = folder_fingerprint(path)
        self.weights_path = path if self.weights_fingerprint is not None else None

    def weights_changed(self) -> bool:
        """Whether the files the weights came from were replaced or changed since (a SIGHUP reloads them)."""
        return self.weights_path is not None and folder_fingerprint(self.weights_path) != self.weights_fingerprint

    def use_weights(self, loaded: ModelBase) -> None:
        """Take over ``loaded``'s state (the same kind, built from the files as they are now): this
        object, which the pipeline's stages and cascades hold, scores with the new weights from then
        on. Cheap: done by the inference thread between two batches."""
        if type(loaded) is not type(self) or loaded.name != self.name:
            raise TypeError(f"model {self.name}: cannot take the weights of {type(loaded).__name__} {loaded.name}")
        self.__dict__.update(vars(loaded))

    def accepts(self, window: Window) -> bool:
        return True

    def prepare_labels(self, labels: Sequence[str], prompt: str) -> Any:
        raise LabelsFixed(f"model {self.name}: its labels are fixed by the model")

    def use_labels(self, prepared: Any) -> None:
        raise LabelsFixed(f"model {self.name}: its labels are fixed by the model")

    def fall_back_to_cpu(self) -> None:
        return None

def folder_fingerprint(ref: str) -> str | None:
    """What a model's files look like on disk (name, size, inode, change times of each file of a
    directory, or of one model file), to tell on SIGHUP whether they were replaced; None for a hub
    id (the cache's files are never rewritten in place) or a path that is not there."""
    path = Path(ref)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
    else:
        return None
    parts = []
    for file in files:
        try:
            st = file.stat()
        except OSError:
            continue
        parts.append(f"{file.name}:{st.st_size}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    return "|".join(parts)
