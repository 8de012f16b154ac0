"""CLAP zero-shot audio classification, computed the way transformers' pipeline computes it.

The pipeline scores one clip per call and re-encodes the label prompts every time. Here the
prompt embeddings are computed once per label set, and audio is encoded in batches; the
probabilities are the same: ``softmax(exp(logit_scale_a) * cos(audio, text))`` over the
model's candidate labels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from monitord.config import ClapModelConfig
from monitord.models.base import Scores
from monitord.models.loading import load_pretrained, pick_device, pick_dtype
from monitord.windows import Window

log = logging.getLogger(__name__)


class ClapZeroShot:
    """``score(windows)`` -> label probabilities per window, batched."""

    def __init__(self, name: str, config: ClapModelConfig):
        import torch
        from transformers import ClapModel, ClapProcessor

        self._torch = torch
        self.name = name
        self.model_id = config.model
        self.labels = config.labels
        self.prompt = config.prompt
        self.batch_max = config.batch_max
        self.batch_wait_ms = config.batch_wait_ms
        self.gated_by = config.gated_by
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)

        self.processor = load_pretrained(ClapProcessor, config.model, "CLAP processor")
        model = load_pretrained(ClapModel, config.model, "CLAP model")
        self.model = model.to(self.device).eval()
        self.feature_extractor = self.processor.feature_extractor
        self.sample_rate = int(self.feature_extractor.sampling_rate)
        self.text_embeddings = self._embed_labels(self.labels)
        # Two forward-pass constants, fixed once the model is loaded.
        self.logit_scale = float(self.model.logit_scale_a.detach().exp())
        if self.dtype != torch.float32:
            self.model.audio_model.to(self.dtype)
            self.model.audio_projection.to(self.dtype)
        log.info("model %s: CLAP %s on %s (%s), %d labels", name, self.model_id, self.device, self.dtype, len(self.labels))

    def set_labels(self, labels: Sequence[str], prompt: str) -> None:
        """New candidate labels or prompt: their text embeddings are computed once, here."""
        self.prompt = prompt
        self.text_embeddings = self._embed_labels(labels)
        self.labels = tuple(labels)

    def _embed_labels(self, labels: Sequence[str]):
        """L2-normalised text embeddings of the label prompts (float32, on the model's device)."""
        torch = self._torch
        prompts = [self.prompt.format(label=label) for label in labels]
        tokens = self.processor.tokenizer(prompts, padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.get_text_features(**tokens)
        return out.pooler_output.float()

    def features(self, windows: Sequence[Window]):
        """Feature-extractor output for a batch, one window per call as the pipeline does.

        Calling per window keeps each window's features independent of its batch-mates:
        a fused checkpoint's extractor marks a random short clip of a batch ``is_longer``;
        alone, a short clip is always marked, exactly as in a one-clip pipeline call.
        """
        torch = self._torch
        feats, longer = [], []
        for window in windows:
            out = self.feature_extractor(
                [window.at_rate(self.sample_rate)], sampling_rate=self.sample_rate, return_tensors="pt"
            )
            feats.append(out["input_features"])
            longer.append(out["is_longer"])
        return torch.cat(feats), torch.cat(longer)

    def audio_embeddings(self, windows: Sequence[Window]):
        torch = self._torch
        input_features, is_longer = self.features(windows)
        with torch.inference_mode():
            out = self.model.get_audio_features(
                input_features=input_features.to(self.device, self.dtype), is_longer=is_longer.to(self.device)
            )
        return out.pooler_output.float()

    def score(self, windows: Sequence[Window]) -> list[Scores]:
        if not windows:
            return []
        torch = self._torch
        audio = self.audio_embeddings(windows)
        with torch.inference_mode():
            probs = (self.logit_scale * audio @ self.text_embeddings.T).softmax(dim=-1).cpu().numpy()
        embeddings = audio.cpu().numpy()
        return [
            Scores(
                window=window,
                model=self.name,
                model_id=self.model_id,
                probabilities={label: float(p) for label, p in zip(self.labels, row)},
                embedding=np.asarray(emb),
            )
            for window, row, emb in zip(windows, probs, embeddings)
        ]
