"""YAMNet on CPU: Google's TFLite classification export, run with ai-edge-litert.

The export ships inside monitord (``yamnet.tflite`` beside this module, 3.9 MB, Apache-2.0; see
NOTICE.md): ``model: builtin``, or no ``model:`` at all, uses it.

The export takes 0.975 s of 16 kHz mono (15,600 samples) and returns 521 independent
(sigmoid) AudioSet class scores. A window is scored frame by frame at YAMNet's own hop
(0.48 s), plus one frame aligned to the window's end, and the frames are pooled (max by
default) so that rules and events look the same as for CLAP. A few ms per frame on one core.

Each window also carries its embedding: the mean of its sounding frames' 1024-d embeddings (the
``EMBEDDING_TENSOR`` of the export, read through the interpreter's preserved tensors, so the same
pass gives both), L2-normalised. ``kind: examples`` models and rules' ``not_like`` banks compare
these. Reading it costs next to nothing: 2.00 vs 2.08 ms per frame beside the plain interpreter on
one core (``python bench/teach.py`` measures it side by side).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from monitord.config import BUILTIN, YamnetModelConfig, yamnet_class_names
from monitord.inference.models.base import ModelBase, ModelUnavailable
from monitord.types import Scores, Window, frozen_mapping
from monitord.windowing.tiling import window_starts

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FRAME = 15600
HOP = 7680
EMBEDDING_TENSOR = "yamnet_frames/global_average_pooling2d/Mean"

BUILTIN_FILE = Path(__file__).with_name("yamnet.tflite")
BUILTIN_ID = "yamnet:builtin"
"""The model id events carry when the shipped file is used."""

WHERE_TO_GET = (
    "monitord ships YAMNet: leave `model:` out (or write `model: builtin`) to use it. Another copy of "
    "the TFLite classification export comes from Google's official YAMNet distribution (Kaggle Models / "
    "TensorFlow Hub: google/yamnet, variant 'tflite/classification', Apache-2.0)."
)


RUNTIME_LEVELS = {"INFO": logging.DEBUG, "WARNING": logging.WARNING, "ERROR": logging.ERROR}
"""The TFLite runtime's own lines ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.") and
the level they are logged at: its INFO is only news to someone debugging."""


@contextmanager
def runtime_stderr_logged() -> Iterator[None]:
    """What native code writes on stderr (fd 2) meanwhile goes through logging instead of around it:
    the TFLite runtime's ``LEVEL: ...`` lines at RUNTIME_LEVELS; anything else (another thread's log
    line) is written back to stderr as it was."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
    for line in lines:
        level = RUNTIME_LEVELS.get(line.split(":", 1)[0])
        if level is not None:
            log.log(level, "tflite: %s", line.rstrip())
        elif line.strip():
            os.write(2, line.encode())


def model_file(config: YamnetModelConfig) -> Path:
    """The .tflite file a config entry means (the shipped one for ``builtin``)."""
    return BUILTIN_FILE if config.model == BUILTIN else Path(config.model)


class YamnetClassifier(ModelBase):
    """``score(windows)`` -> pooled class scores, plus a score per configured group."""

    sample_rate = SAMPLE_RATE

    def __init__(self, name: str, config: YamnetModelConfig):
        super().__init__(name, config)
        path = model_file(config)
        self.model_id = BUILTIN_ID if config.model == BUILTIN else config.model
        self.note_weights(str(path))
        self.pool = config.pool
        self.classes = yamnet_class_names(config.class_map)
        self.groups = {group: [self.classes.index(c) for c in members] for group, members in config.groups.items()}
        self.labels = self.classes + tuple(self.groups)
        if not path.is_file():
            raise ModelUnavailable(f"YAMNet model: {path} does not exist. {WHERE_TO_GET}",
                                   missing=f"the file {path}", fix=f"remove `model: {config.model}` (the built-in YAMNet)")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ModelUnavailable(
                "kind: yamnet needs Google's TFLite runtime: pip install 'monitord[edge]' (ai-edge-litert)"
            ) from None
        try:
            with warnings.catch_warnings(), runtime_stderr_logged():  # preserving tensors is "for debugging": measured, it costs ~nothing here
                warnings.simplefilter("ignore")
                # from bytes in memory: with model_path TFLite maps the file, and a file rewritten under
                # a running daemon would change the model or kill the process with SIGBUS
                self._interpreter = Interpreter(model_content=path.read_bytes(), num_threads=config.threads,
                                                experimental_preserve_all_tensors=True)
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelUnavailable(f"YAMNet model: {path} is not a usable TFLite model ({exc}). {WHERE_TO_GET}",
                                   missing=f"a usable TFLite model at {path}",
                                   fix=f"remove `model: {config.model}` (the built-in YAMNet)") from None
        inputs, outputs = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        if list(inputs[0]["shape"]) != [FRAME] or outputs[0]["shape"][-1] != len(self.classes):
            raise ModelUnavailable(
                f"YAMNet model: {path} takes {list(inputs[0]['shape'])} and gives {list(outputs[0]['shape'])}; "
                f"expected the classification export ([{FRAME}] -> [1, {len(self.classes)}]). {WHERE_TO_GET}"
            )
        self._input = inputs[0]["index"]
        self._output = outputs[0]["index"]
        self._embedding = next((t["index"] for t in self._interpreter.get_tensor_details()
                                if t["name"].split(";")[0] == EMBEDDING_TENSOR), None)
        if self._embedding is None:
            log.warning("model %s: %s has no tensor %s: its windows carry no embedding (examples and not_like "
                        "cannot use it)", name, path, EMBEDDING_TENSOR)
        log.info("model %s: YAMNet %s, %d classes, %d groups", name, self.model_id, len(self.classes), len(self.groups))

    def frame_scores(self, audio: np.ndarray) -> np.ndarray:
        """(frames, 521) scores over 16 kHz audio: YAMNet's hop, plus a final frame aligned to the end."""
        return self.frames(audio)[0]

    def frames(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(frames, 521) scores and (frames, 1024) embeddings (None where the model has no
        embedding tensor) over 16 kHz audio, frame by frame as ``frame_scores``."""
        if len(audio) < FRAME:
            audio = np.pad(audio, (0, FRAME - len(audio)))
        rows, embeddings = [], []
        for start in window_starts(len(audio), FRAME, HOP):
            self._interpreter.set_tensor(self._input, np.ascontiguousarray(audio[start : start + FRAME], dtype=np.float32))
            self._interpreter.invoke()
            rows.append(self._interpreter.get_tensor(self._output)[0].copy())
            if self._embedding is not None:
                embeddings.append(self._interpreter.get_tensor(self._embedding)[0].copy())
        return np.stack(rows), (np.stack(embeddings) if embeddings else None)

    def score(self, windows: Sequence[Window], upstream: Sequence[Scores] | None = None) -> list[Scores]:
        out = []
        for window in windows:
            frames, embeddings = self.frames(window.at_rate(SAMPLE_RATE)[: _valid_at(window, SAMPLE_RATE)])
            pooled = frames.max(axis=0) if self.pool == "max" else frames.mean(axis=0)
            probabilities = {name: float(p) for name, p in zip(self.classes, pooled)}
            for group, indices in self.groups.items():
                probabilities[group] = float(pooled[indices].max())
            embedding = None
            if embeddings is not None:
                embedding = mean_embedding(embeddings, frame_levels(window.at_rate(SAMPLE_RATE)[: _valid_at(window, SAMPLE_RATE)]))
            out.append(Scores(window=window, model=self.name, model_id=self.model_id, probabilities=frozen_mapping(probabilities),
                              embedding=embedding))
        return out


SOUNDING_DB = 30.0
"""Frames this far below the window's loudest frame are left out of its embedding."""


def frame_levels(audio: np.ndarray) -> np.ndarray:
    """RMS level (dBFS) of each frame ``frames`` cuts from 16 kHz audio."""
    if len(audio) < FRAME:
        audio = np.pad(audio, (0, FRAME - len(audio)))
    rms = [float(np.sqrt(np.mean(np.square(audio[s : s + FRAME], dtype=np.float64)))) for s in window_starts(len(audio), FRAME, HOP)]
    return 20 * np.log10(np.maximum(rms, 1e-10))


def mean_embedding(frames: np.ndarray, levels: np.ndarray | None = None) -> np.ndarray:
    """The window's embedding: the mean of its sounding frames' embeddings, L2-normalised (float32).

    With ``levels``, frames more than SOUNDING_DB below the loudest are left out: a window that
    is half silence would otherwise embed mostly its silence (measured on YAMNet: a window of 1 s
    of silence and 1 s of thunder lay 0.68 from windows of another thunder and 0.04 from half-silent
    speech) and look like nothing that was taught."""
    if levels is not None and len(levels) == len(frames):
        frames = frames[levels >= levels.max() - SOUNDING_DB]
    mean = frames.mean(axis=0, dtype=np.float64)
    norm = np.linalg.norm(mean)
    return (mean / norm if norm > 0 else mean).astype(np.float32)


def _valid_at(window: Window, rate: int) -> int:
    """Samples of real sound at ``rate`` (the padding at the end of a file is left out)."""
    return max(1, round(window.valid * rate / window.sample_rate))
