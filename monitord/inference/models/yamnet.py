"""YAMNet on CPU: Google's TFLite classification export, run with ai-edge-litert.

The export ships inside monitord (``yamnet.tflite`` beside this module, 3.9 MB, Apache-2.0; see
NOTICE.md): ``model: builtin``, or no ``model:`` at all, uses it.

The export takes 0.975 s of 16 kHz mono (15,600 samples) and returns 521 independent
(sigmoid) AudioSet class scores. A window is scored frame by frame at YAMNet's own hop
(0.48 s), plus one frame aligned to the window's end, and the frames are pooled (max by
default) so that rules and events look the same as for CLAP. A few ms per frame on one core.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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

BUILTIN_FILE = Path(__file__).with_name("yamnet.tflite")
BUILTIN_ID = "yamnet:builtin"
"""The model id events carry when the shipped file is used."""

WHERE_TO_GET = (
    "monitord ships YAMNet: leave `model:` out (or write `model: builtin`) to use it. Another copy of "
    "the TFLite classification export comes from Google's official YAMNet distribution (Kaggle Models / "
    "TensorFlow Hub: google/yamnet, variant 'tflite/classification', Apache-2.0)."
)


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
            self._interpreter = Interpreter(model_path=str(path), num_threads=config.threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
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
        log.info("model %s: YAMNet %s, %d classes, %d groups", name, self.model_id, len(self.classes), len(self.groups))

    def frame_scores(self, audio: np.ndarray) -> np.ndarray:
        """(frames, 521) scores over 16 kHz audio: YAMNet's hop, plus a final frame aligned to the end."""
        if len(audio) < FRAME:
            audio = np.pad(audio, (0, FRAME - len(audio)))
        rows = []
        for start in window_starts(len(audio), FRAME, HOP):
            self._interpreter.set_tensor(self._input, np.ascontiguousarray(audio[start : start + FRAME], dtype=np.float32))
            self._interpreter.invoke()
            rows.append(self._interpreter.get_tensor(self._output)[0].copy())
        return np.stack(rows)

    def score(self, windows: Sequence[Window], upstream: Sequence[Scores] | None = None) -> list[Scores]:
        out = []
        for window in windows:
            frames = self.frame_scores(window.at_rate(SAMPLE_RATE)[: _valid_at(window, SAMPLE_RATE)])
            pooled = frames.max(axis=0) if self.pool == "max" else frames.mean(axis=0)
            probabilities = {name: float(p) for name, p in zip(self.classes, pooled)}
            for group, indices in self.groups.items():
                probabilities[group] = float(pooled[indices].max())
            out.append(Scores(window=window, model=self.name, model_id=self.model_id, probabilities=frozen_mapping(probabilities)))
        return out


def _valid_at(window: Window, rate: int) -> int:
    """Samples of real sound at ``rate`` (the padding at the end of a file is left out)."""
    return max(1, round(window.valid * rate / window.sample_rate))
