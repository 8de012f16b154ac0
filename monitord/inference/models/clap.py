"""CLAP zero-shot audio classification, computed the way transformers' pipeline computes it.

The pipeline scores one clip per call, re-encodes the label prompts every time and runs the
numpy feature extractor. Here the prompt embeddings are computed once per label set (then
the text tower is dropped: only the audio tower stays resident), features are computed in
torch for the whole batch, and audio is encoded in batches, in bfloat16 where the hardware
makes that faster. The probabilities are the pipeline's:
``softmax(exp(logit_scale_a) * cos(audio, text))`` over the model's candidate labels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from monitord.config import ClapModelConfig
from monitord.inference.models.base import ModelBase
from monitord.inference.models.clap_features import ClapFeatures
from monitord.inference.engines import encoder_for, engine_device
from monitord.inference.models.encoders import clap_audio_spec
from monitord.inference.models.loading import TorchPlacement, load_pretrained
from monitord.types import Scores, Window, frozen_mapping

log = logging.getLogger(__name__)

LABELS_PER_PASS = 256
"""Label prompts embedded by one pass of the text tower (its activations grow with them: 100000
labels at once would take gigabytes)."""


class ClapZeroShot(TorchPlacement, ModelBase):
    """``score(windows)`` -> label probabilities per window, batched."""

    def __init__(self, name: str, config: ClapModelConfig, model=None, processor=None, engine_cache=None):
        """Loads ``config.model`` unless a loaded ClapModel and ClapProcessor are given
        (the benchmark shares one full-size random model with the pipeline). ``engine_cache``: where
        an engine's converted model is kept, instead of beside the model (the benchmark's random one)."""
        import torch
        from transformers import ClapModel, ClapProcessor

        self._torch = torch
        super().__init__(name, config)
        self.model_id = config.model
        self.note_weights(config.model)  # before reading them: a change while they are read shows on SIGHUP
        self.labels = config.labels
        self.prompt = config.prompt
        self.device = engine_device(config)

        self.processor = processor or load_pretrained(ClapProcessor, config.model, "CLAP processor")
        model = (model or load_pretrained(ClapModel, config.model, "CLAP model")).to(self.device).eval()
        self.feature_extractor = self.processor.feature_extractor
        self.sample_rate = int(self.feature_extractor.sampling_rate)
        self.torch_features = ClapFeatures(self.feature_extractor, self.device)
        self.logit_scale = float(model.logit_scale_a.detach().exp())
        self.text_embeddings = self._embed_labels(self.labels, model)
        # The audio tower on another engine (torch where none): converted once, then cached.
        self.encoder = encoder_for(name, config, self.device, lambda: clap_audio_spec(
            model.audio_model, model.audio_projection, model.config, config.model, self.torch_features.frames,
            int(self.feature_extractor.feature_size)), engine_cache)
        self.engine = "torch" if self.encoder is None else self.encoder.engine
        # Once the prompts are embedded only the audio side is needed (a third of the weights); with
        # another engine, not even that.
        self.audio_model = model.audio_model if self.encoder is None else None
        self.audio_projection = model.audio_projection if self.encoder is None else None
        del model
        if self.encoder is None:
            features, is_longer = self.torch_features(np.zeros((2, self.sample_rate * 2), dtype=np.float32))
            self.place(config.dtype, lambda: self._encode(features, is_longer))
        else:
            self.dtype, self.dtype_reason = getattr(torch, self.encoder.precision), f"{self.engine}: {self.encoder.reason}"
        log.info("model %s: CLAP %s on %s, %s, %s (%s), %d labels", name, self.model_id, self.device, self.engine, self.dtype,
                 self.dtype_reason, len(self.labels))

    def torch_modules(self) -> list:
        return [m for m in (self.audio_model, self.audio_projection) if m is not None]

    def _moved_to_cpu(self) -> None:
        self.text_embeddings = self.text_embeddings.to("cpu")
        self.torch_features = ClapFeatures(self.feature_extractor, "cpu")

    def probabilities_with(self, windows: Sequence[Window], text_embeddings) -> np.ndarray:
        """(windows, labels) probabilities against other labels' embeddings (from ``prepare_labels``:
        the dashboard's try-it panel); the live labels are untouched."""
        audio = self.audio_embeddings(windows)
        with self._torch.inference_mode():
            return (self.logit_scale * audio @ text_embeddings.to(audio.device).T).softmax(dim=-1).cpu().numpy()

    def prepare_labels(self, labels: Sequence[str], prompt: str) -> tuple[tuple[str, ...], str, object]:
        """Text embeddings for new candidate labels or a new prompt: the text tower is loaded
        again, used once and dropped. Runs off the inference thread; raises ModelUnavailable."""
        from transformers import ClapModel

        model = load_pretrained(ClapModel, self.model_id, "CLAP model").to(self.device).eval()
        embeddings = self._embed_labels(labels, model, prompt)
        del model
        return tuple(labels), prompt, embeddings

    def use_labels(self, prepared: tuple[tuple[str, ...], str, object]) -> None:
        self.labels, self.prompt, self.text_embeddings = prepared

    def set_labels(self, labels: Sequence[str], prompt: str) -> None:
        self.use_labels(self.prepare_labels(labels, prompt))

    def _embed_labels(self, labels: Sequence[str], model, prompt: str | None = None):
        """L2-normalised text embeddings of the label prompts (float32, on the model's device)."""
        torch = self._torch
        prompts = [(prompt or self.prompt).format(label=label) for label in labels]
        # truncated to what the text tower has positions for: a longer label (a config's, or one typed
        # into the try-it panel) would otherwise index past them and fail the load, a reload or the request
        parts = []
        for i in range(0, len(prompts), LABELS_PER_PASS):  # the text tower's memory grows with the labels at once
            tokens = self.processor.tokenizer(prompts[i : i + LABELS_PER_PASS], padding=True, truncation=True,
                                              return_tensors="pt").to(self.device)
            with torch.inference_mode():
                parts.append(model.get_text_features(**tokens).pooler_output.float())
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def features(self, windows: Sequence[Window]):
        """(input_features, is_longer) for a batch of windows, each independent of its batch-mates.

        Torch features for windows up to 10 s (equal to the feature extractor's within 1e-5);
        otherwise the extractor itself, one window per call as the pipeline does (a fused
        checkpoint's extractor marks a random short clip of a multi-clip call ``is_longer``).
        """
        torch = self._torch
        audio = [window.at_rate(self.sample_rate) for window in windows]
        if len({len(a) for a in audio}) == 1 and self.torch_features.supports(len(audio[0])):
            return self.torch_features(np.stack(audio))
        feats, longer = [], []
        for samples in audio:
            out = self.feature_extractor([samples], sampling_rate=self.sample_rate, return_tensors="pt")
            feats.append(out["input_features"])
            longer.append(out["is_longer"])
        return torch.cat(feats), torch.cat(longer)

    def _encode(self, input_features, is_longer):
        """Normalised audio embeddings (float32) from features: ``get_audio_features`` without the text tower."""
        torch = self._torch
        if self.encoder is not None:
            return torch.from_numpy(self.encoder(input_features.float().cpu().numpy())[0])
        with torch.inference_mode():
            out = self.audio_model(input_features=input_features.to(self.device, self.dtype), is_longer=is_longer.to(self.device))
            embeddings = self.audio_projection(out.pooler_output)
            return torch.nn.functional.normalize(embeddings.float(), dim=-1)

    def audio_embeddings(self, windows: Sequence[Window]):
        input_features, is_longer = self.features(windows)
        return self._encode(input_features, is_longer)

    def score(self, windows: Sequence[Window], upstream: Sequence[Scores] | None = None) -> list[Scores]:
        if not windows:
            return []
        torch = self._torch
        labels, text = self.labels, self.text_embeddings  # one consistent pair, whatever a reload does
        audio = self.audio_embeddings(windows)
        with torch.inference_mode():
            probs = (self.logit_scale * audio @ text.T).softmax(dim=-1).cpu().numpy()
        embeddings = audio.cpu().numpy()
        return [
            Scores(
                window=window,
                model=self.name,
                model_id=self.model_id,
                probabilities=frozen_mapping({label: float(p) for label, p in zip(labels, row)}),
                embedding=emb,
            )
            for window, row, emb in zip(windows, probs, embeddings)
        ]
