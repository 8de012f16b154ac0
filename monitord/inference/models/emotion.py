"""Speech emotion: any AutoModelForAudioClassification checkpoint, mapped onto one vocabulary.

The checkpoint's labels (``id2label``) are mapped onto the nine emotions of
``monitord.config.EMOTIONS`` by the config's ``label_map`` over built-in aliases; a label that
maps nowhere counts as ``other``. The probability of an emotion is the sum of the softmax
probabilities of the checkpoint labels mapped onto it, so the nine always sum to 1.

Runs at the checkpoint's own rate (16 kHz for wav2vec2/HuBERT/WavLM). Fixed-length windows
need no padding, and base models with group norm must not get an attention mask, so none is
passed; the feature extractor applies the checkpoint's own ``do_normalize``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from monitord.config import EMOTIONS, EmotionModelConfig
from monitord.inference.models.base import ModelBase
from monitord.inference.engines import encoder_for, engine_device
from monitord.inference.models.encoders import emotion_spec
from monitord.inference.models.loading import TorchPlacement, load_pretrained
from monitord.types import FrameScores, Scores, Window, frozen_mapping

log = logging.getLogger(__name__)

ALIASES = {
    "ang": "angry", "anger": "angry", "angry": "angry", "mad": "angry",
    "dis": "disgusted", "disgust": "disgusted", "disgusted": "disgusted",
    "fea": "fearful", "fear": "fearful", "fearful": "fearful", "afraid": "fearful", "scared": "fearful",
    "hap": "happy", "happy": "happy", "happiness": "happy", "joy": "happy", "exc": "happy", "excited": "happy",
    "neu": "neutral", "neutral": "neutral", "calm": "neutral",
    "sad": "sad", "sadness": "sad",
    "sur": "surprised", "surprise": "surprised", "surprised": "surprised",
    "oth": "other", "other": "other", "unk": "unknown", "unknown": "unknown", "<unk>": "unknown",
}


def map_label(label: str, label_map: dict[str, str]) -> str:
    """The emotion a checkpoint label stands for: the config's map first, then the aliases
    (also for the "中文/english" labels of emotion2vec-style checkpoints), else "other"."""
    if label in label_map:
        return label_map[label]
    key = label.strip().lower()
    if key in ALIASES:
        return ALIASES[key]
    tail = key.rsplit("/", 1)[-1]
    return ALIASES.get(tail, "other")


class EmotionClassifier(TorchPlacement, ModelBase):
    labels = EMOTIONS

    def __init__(self, name: str, config: EmotionModelConfig, model=None, extractor=None, engine_cache=None):
        import torch
        from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

        self._torch = torch
        super().__init__(name, config)
        self.model_id = config.model
        self.note_weights(config.model)  # before reading them: a change while they are read shows on SIGHUP
        self.device = engine_device(config)
        self.extractor = extractor or load_pretrained(AutoFeatureExtractor, config.model, "emotion feature extractor")
        self.model = (model or load_pretrained(AutoModelForAudioClassification, config.model, "emotion model")).to(self.device).eval()
        self.sample_rate = int(self.extractor.sampling_rate)
        self.architecture = type(self.model).__name__
        id2label = self.model.config.id2label
        self.checkpoint_labels = [id2label[i] for i in range(len(id2label))]
        mapped = [map_label(label, config.label_map) for label in self.checkpoint_labels]
        self.mapping = {label: emotion for label, emotion in zip(self.checkpoint_labels, mapped)}
        self._index = torch.tensor([EMOTIONS.index(e) for e in mapped], device=self.device)
        self.granularity = config.granularity
        self.frame_geometry = None
        self._tap = None
        if config.granularity == "frame":  # frame scores from the same pass (see monitord.inference.models.frame_head)
            from monitord.inference.models.frame_head import attach

            self._tap, self.frame_geometry = attach(self.model, name, self.sample_rate)
        self.encoder = encoder_for(name, config, self.device, self._engine_spec, engine_cache)
        self.engine = "torch" if self.encoder is None else self.encoder.engine
        if self.encoder is None:
            silent = np.zeros((2, self.sample_rate * 2), dtype=np.float32)
            self.place(config.dtype, lambda: self._forward(silent))
        else:
            self.model = None  # the engine holds its own copy of the weights
            self.dtype, self.dtype_reason = getattr(torch, self.encoder.precision), f"{self.engine}: {self.encoder.reason}"
        log.info("model %s: emotion %s on %s, %s, %s (%s); labels %s", name, self.model_id, self.device, self.engine,
                 self.dtype, self.dtype_reason, self.mapping)

    def _engine_spec(self):
        if self._tap is not None:
            raise ValueError("frame scores (granularity: frame) are read inside the torch pass: torch only")
        return emotion_spec(self.model, self.model_id, self.sample_rate)

    def torch_modules(self) -> list:
        return [self.model] if self.model is not None else []

    def _moved_to_cpu(self) -> None:
        self._index = self._index.to("cpu")

    def _forward(self, audio: np.ndarray):
        """(probabilities over the checkpoint's labels, mean-pooled last hidden state, per-frame
        probabilities or None), float32."""
        torch = self._torch
        inputs = self.extractor(list(audio), sampling_rate=self.sample_rate, return_tensors="pt", return_attention_mask=False)
        if self.encoder is not None:
            logits, pooled = self.encoder(inputs["input_values"].numpy())
            return torch.from_numpy(logits).softmax(dim=-1), torch.from_numpy(pooled), None
        with torch.inference_mode():
            out = self.model(inputs["input_values"].to(self.device, self.dtype), output_hidden_states=True)
            frames = self._tap.logits().softmax(dim=-1) if self._tap is not None else None
        return out.logits.float().softmax(dim=-1), out.hidden_states[-1].float().mean(dim=1), frames

    def score(self, windows: Sequence[Window], upstream: Sequence[Scores] | None = None) -> list[Scores]:
        if not windows:
            return []
        torch = self._torch
        audio = np.stack([w.at_rate(self.sample_rate) for w in windows])
        probs, pooled, frames = self._forward(audio)
        emotions = torch.zeros(len(windows), len(EMOTIONS), device=probs.device).index_add_(1, self._index, probs)
        emotions, pooled = emotions.cpu().numpy(), pooled.cpu().numpy()
        per_window = self._frame_scores(windows, frames) if frames is not None else [None] * len(windows)
        return [
            Scores(window=w, model=self.name, model_id=self.model_id,
                   probabilities=frozen_mapping({e: float(p) for e, p in zip(EMOTIONS, row)}), embedding=emb, frames=f)
            for w, row, emb, f in zip(windows, emotions, pooled, per_window)
        ]

    def _frame_scores(self, windows: Sequence[Window], frames) -> list[FrameScores]:
        """Each window's frames mapped onto the nine emotions; frames centred in a file's padding dropped."""
        torch, geometry = self._torch, self.frame_geometry
        shape = (*frames.shape[:2], len(EMOTIONS))
        emotions = torch.zeros(shape, device=frames.device).index_add_(2, self._index, frames).cpu().numpy()
        out = []
        for w, values in zip(windows, emotions):
            valid = round(w.valid * self.sample_rate / w.sample_rate)
            n = geometry.frames_before(valid, len(values))
            out.append(FrameScores(w.stream_start + geometry.offset_s, geometry.hop_s, np.ascontiguousarray(values[:n])))
        return out
