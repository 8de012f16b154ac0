"""Per-frame logits of a sequence classifier from the forward pass that scores the window.

The ``...ForSequenceClassification`` heads of wav2vec2, HuBERT, WavLM and their relatives are, in
transformers 5.x (read from its source)::

    h = last_hidden_state                      # or a softmax-weighted sum of all hidden states
    logits = classifier(mean_t(projector(h)))  # projector, classifier: nn.Linear; no attention mask

Both layers are affine, so ``classifier(projector(h_t))`` for each encoder frame t gives frame
logits whose mean over the window's frames is the window's logits exactly (up to float
rounding). ``FrameTap`` keeps the projector's output of the forward pass and applies the
classifier to it: no second pass, and the frames see the same context as the window did.

A head of another form (attention pooling, a non-linearity after pooling, a class not known to be
of this form) is refused at load, and the identity is checked numerically on a probe batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from monitord.inference.models.base import ModelUnavailable

log = logging.getLogger(__name__)

LINEAR_HEADS = (
    "Wav2Vec2ForSequenceClassification",
    "HubertForSequenceClassification",
    "WavLMForSequenceClassification",
    "Data2VecAudioForSequenceClassification",
    "UniSpeechForSequenceClassification",
    "UniSpeechSatForSequenceClassification",
    "Wav2Vec2ConformerForSequenceClassification",
    "SEWForSequenceClassification",
    "SEWDForSequenceClassification",
)
"""transformers classes whose forward is exactly projector -> mean over frames -> classifier, on a
raw-waveform conv encoder (Wav2Vec2Bert has the same head but a spectrogram front end: not here)."""

PROBE_TOLERANCE = 1e-3
"""Largest |mean of frame logits - window logits| accepted on the float32 probe, relative to 1 + max |logit|."""


class FrameHeadError(ModelUnavailable):
    """The checkpoint's head cannot give frame scores equal on average to its window scores."""


@dataclass(frozen=True)
class FrameGeometry:
    """Where the encoder's frames sit in the samples it was given (from its conv layers)."""

    sample_rate: int
    kernels: tuple[int, ...]
    strides: tuple[int, ...]

    @property
    def hop(self) -> int:
        """Samples between frames: the product of the strides (320 at 16 kHz = 20 ms)."""
        out = 1
        for s in self.strides:
            out *= s
        return out

    @property
    def receptive(self) -> int:
        """Samples one frame's conv stack sees (400 = 25 ms for wav2vec2-base)."""
        size, jump = 1, 1
        for k, s in zip(self.kernels, self.strides):
            size += (k - 1) * jump
            jump *= s
        return size

    @property
    def hop_s(self) -> float:
        return self.hop / self.sample_rate

    @property
    def offset_s(self) -> float:
        """Time of the first frame's centre after the first sample."""
        return self.receptive / 2 / self.sample_rate

    def frames(self, samples: int) -> int:
        """Frames the encoder makes of ``samples`` samples."""
        for k, s in zip(self.kernels, self.strides):
            samples = max(0, (samples - k) // s + 1)
        return samples

    def frames_before(self, samples: int, total_frames: int) -> int:
        """How many of the first frames have their centre inside the first ``samples`` samples."""
        n = -(-(2 * samples - self.receptive) // (2 * self.hop))  # ceil((samples - receptive/2) / hop)
        return max(0, min(total_frames, n))


def check_linear_head(model: Any, name: str) -> FrameGeometry:
    """The frame geometry of a model whose head is linear after the encoder; FrameHeadError otherwise."""
    import torch
    import transformers

    cls = type(model)
    what = f"model {name!r}: granularity: frame needs a head that is linear after the encoder " \
           f"(projector, mean over frames, classifier)"
    known = getattr(transformers, cls.__name__, None) if cls.__name__ in LINEAR_HEADS else None
    if known is not cls:
        raise FrameHeadError(f"{what}; its head class {cls.__module__}.{cls.__name__} is not one known to be "
                             f"(known: {', '.join(LINEAR_HEADS)}). Use granularity: window.")
    for part in ("projector", "classifier"):
        module = getattr(model, part, None)
        if type(module) is not torch.nn.Linear:
            found = "missing" if module is None else _describe(module)
            raise FrameHeadError(f"{what}; its {part} is {found}, not a single Linear layer "
                                 f"(a non-linearity or pooling there breaks the identity). Use granularity: window.")
    if model.projector.out_features != model.classifier.in_features:
        raise FrameHeadError(f"{what}; its projector gives {model.projector.out_features} features but its classifier "
                             f"takes {model.classifier.in_features}")
    expected = {model.base_model_prefix, "projector", "classifier"}
    extra = sorted(n for n, _ in model.named_children() if n not in expected)
    if extra:
        raise FrameHeadError(f"{what}; it has modules beside the encoder, projector and classifier: {', '.join(extra)} "
                             f"(attention pooling?). Use granularity: window.")
    config = model.config
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if not kernels or not strides or len(kernels) != len(strides):
        raise FrameHeadError(f"{what}; its config has no conv_kernel/conv_stride to place the frames in time")
    rate = getattr(config, "sampling_rate", None) or 16000
    return FrameGeometry(int(rate), tuple(int(k) for k in kernels), tuple(int(s) for s in strides))


def _describe(module: Any) -> str:
    children = [type(c).__name__ for c in module.children()]
    return f"{type(module).__name__}({', '.join(children)})" if children else type(module).__name__


class FrameTap:
    """Keeps the projector's output of each forward pass; ``logits()`` turns it into frame logits."""

    def __init__(self, model: Any):
        self._classifier = model.classifier
        self._taken = None
        self._handle = model.projector.register_forward_hook(self._keep)

    def _keep(self, _module: Any, _inputs: Any, output: Any) -> None:
        self._taken = output

    @property
    def ready(self) -> bool:
        """Whether a forward pass ran since the last ``logits()``."""
        return self._taken is not None

    def logits(self):
        """(batch, frames, labels) float32 logits of the last forward pass's frames."""
        import torch

        projected, self._taken = self._taken, None
        if projected is None:
            raise RuntimeError("no forward pass since the last frame logits were taken")
        weight, bias = self._classifier.weight, self._classifier.bias
        with torch.no_grad():  # the projector's output may be an inference-mode tensor
            return torch.nn.functional.linear(projected.float(), weight.float(), None if bias is None else bias.float())

    def remove(self) -> None:
        self._handle.remove()


def attach(model: Any, name: str, sample_rate: int) -> tuple[FrameTap, FrameGeometry]:
    """Check the head, tap it, and check on a float32 probe that the frame logits average to the window's."""
    import torch

    geometry = check_linear_head(model, name)
    if geometry.sample_rate != sample_rate:
        geometry = FrameGeometry(sample_rate, geometry.kernels, geometry.strides)
    tap = FrameTap(model)
    dtype = next(model.parameters()).dtype
    model.float()
    try:
        generator = torch.Generator().manual_seed(0)
        probe = 0.1 * torch.randn(2, 2 * sample_rate, generator=generator)
        param = next(model.parameters())
        with torch.inference_mode():
            window = model(probe.to(param.device)).logits.float()
            frames = tap.logits() if tap.ready else None
        if frames is None:
            tap.remove()
            raise FrameHeadError(f"model {name!r}: granularity: frame needs a head that is linear after the encoder, "
                                 "but its forward never ran the projector. Use granularity: window.")
        error = float((frames.mean(dim=1) - window).abs().max())
        scale = 1.0 + float(window.abs().max())
    finally:
        model.to(dtype)
    if frames.shape[1] != geometry.frames(probe.shape[1]):
        tap.remove()
        raise FrameHeadError(f"model {name!r}: its encoder made {frames.shape[1]} frames of {probe.shape[1]} samples, "
                             f"not the {geometry.frames(probe.shape[1])} its conv layers imply")
    if not error <= PROBE_TOLERANCE * scale:
        tap.remove()
        raise FrameHeadError(f"model {name!r}: granularity: frame needs a head that is linear after the encoder, but "
                             f"the mean of its frame logits differs from its window logits by {error:.3g} on a probe: "
                             f"its forward pools or transforms otherwise. Use granularity: window.")
    log.info("model %s: frame scores every %.1f ms (receptive field %.1f ms); probe error %.2g",
             name, geometry.hop_s * 1000, geometry.receptive / sample_rate * 1000, error)
    return tap, geometry
